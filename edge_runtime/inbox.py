"""The inbox folder: JSON-lines files of training examples dropped by other programs on the device.
A file is stored whole and renamed ``.done``; a file with a bad line is renamed ``.bad`` (the reason
is an event); a file that meets a full store stays and is tried again."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from edge_runtime.errors import EdgefmError
from edge_runtime.store import StoreFull


def watch_inbox(
    folder: Path,
    add_examples: Callable[[list[dict], str], dict],
    on_event: Callable[..., None],
    stop: threading.Event,
    every_s: float = 1.0,
) -> None:
    """Store the examples of each ``*.jsonl`` file in ``folder`` (source ``inbox``) until ``stop`` is set."""
    folder.mkdir(parents=True, exist_ok=True)
    waiting: set[str] = set()
    while not stop.wait(every_s):
        for f in sorted(folder.glob("*.jsonl")):
            try:
                items = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                add_examples(items, "inbox")
                f.rename(f.with_suffix(".jsonl.done"))
                waiting.discard(f.name)
            except StoreFull as exc:  # not the file's fault: it stays and is tried again
                if f.name not in waiting:
                    waiting.add(f.name)
                    on_event("inbox_file_waiting", file=f.name, error=str(exc))
                break
            except (ValueError, EdgefmError) as exc:
                on_event("inbox_file_refused", file=f.name, error=str(exc))
                f.rename(f.with_suffix(".jsonl.bad"))
