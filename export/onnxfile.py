"""ONNX files of any size. One protobuf holds at most 2 GiB, so a graph whose tensors pass
``EXTERNAL_DATA_BYTES`` is written with them in one data file beside it (``<name>.data``, the ONNX
external-data convention that onnxruntime loads by itself); intermediate graphs under it stay single
files, and a bundle's final graphs always get a data file (``externalize``: less memory on the device).
Every step of an export that reads or rewrites a graph goes through here, so a stale data file
never outlives the graph it belonged to."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

# protobuf's hard limit is 2 GiB for the whole file; leave room for the graph itself
EXTERNAL_DATA_BYTES = 1_500_000_000


def data_file(path: str | Path) -> Path:
    """Where the external tensors of ``path`` live (whether or not it has any)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def tensor_bytes(model) -> int:
    """Bytes of the initializers held in ``model`` (external ones count as 0)."""
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        elif t.data_location != 1:  # typed fields: element count x element size
            total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def load(path: str | Path, *, with_data: bool = True):
    """The model at ``path``, with its external tensors read in unless ``with_data`` is False."""
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def save(model, path: str | Path, *, external: bool | None = None) -> None:
    """Write ``model`` to ``path``; its tensors go to ``data_file(path)`` when they are too big for
    one file (or when ``external`` says so). Note that writing external data moves the tensors out of
    the in-memory ``model``: save last."""
    import onnx

    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
        )
    else:
        onnx.save_model(model, str(path))


def externalize(path: str | Path) -> None:
    """Rewrite a bundle's graph with its tensors in its data file (a no-op when they already are).

    What a device loads: onnxruntime keeps a single-file graph's bytes while it builds the session
    (SmolLM2-135M: the training session took 725 MB loaded from one file, 443 MB from graph + data
    file; the inference session 281 vs 156 MB), and from a data file it reads each tensor straight
    into its buffer."""
    if not has_external_data(path):
        save(load(path), path, external=True)


def has_external_data(path: str | Path) -> bool:
    """Whether the graph at ``path`` keeps tensors in a data file."""
    return data_file(path).is_file()


def copy(src: str | Path, dst: str | Path) -> None:
    """Copy a graph; one with external data is rewritten so it names its own data file."""
    if has_external_data(src):
        save(load(src), dst, external=True)
    else:
        data_file(dst).unlink(missing_ok=True)
        shutil.copyfile(src, dst)


def remove(path: str | Path) -> None:
    """Delete a graph and its data file."""
    Path(path).unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)


def mb(path: Path) -> str:
    """Human size of a file (a graph with its external data file, if it has one)."""
    data = data_file(path)
    extra = data.stat().st_size if data.is_file() else 0
    return f"{(Path(path).stat().st_size + extra) / 1e6:.1f} MB" + (" (external data)" if extra else "")
