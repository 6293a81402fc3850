"""Tiny Prometheus registry: counters, gauges and histograms rendered in the text exposition format."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Thread-safe metric store; names follow Prometheus conventions (edgefm_*)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.hists: dict[tuple[str, tuple], list] = {}
        self.help: dict[str, tuple[str, str]] = {}

    def _key(self, name, labels):
        return name, tuple(sorted((labels or {}).items()))

    def inc(self, name: str, value: float = 1.0, labels: dict | None = None, help: str = "") -> None:
        """Add to a counter."""
        with self._lock:
            self.help.setdefault(name, ("counter", help))
            k = self._key(name, labels)
            self.counters[k] = self.counters.get(k, 0.0) + value

    def set(self, name: str, value: float, labels: dict | None = None, help: str = "") -> None:
        """Set a gauge."""
        with self._lock:
            self.help.setdefault(name, ("gauge", help))
            self.gauges[self._key(name, labels)] = float(value)

    def observe(
        self, name: str, value: float, labels: dict | None = None, help: str = "", buckets: tuple = LATENCY_BUCKETS
    ) -> None:
        """Record one observation in a histogram."""
        with self._lock:
            self.help.setdefault(name, ("histogram", help))
            k = self._key(name, labels)
            h = self.hists.setdefault(k, [buckets, [0] * len(buckets), 0.0, 0])
            i = bisect.bisect_left(h[0], value)
            if i < len(h[1]):
                h[1][i] += 1
            h[2] += value
            h[3] += 1

    def get(self, name: str, labels: dict | None = None) -> float:
        """Current value of a counter or gauge (0 if unset)."""
        k = self._key(name, labels)
        return self.counters.get(k, self.gauges.get(k, 0.0))

    def render(self) -> str:
        """Prometheus text format."""

        def lab(pairs, extra=()):
            items = list(pairs) + list(extra)
            return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""

        out = []
        with self._lock:
            for name, (kind, hlp) in sorted(self.help.items()):
                out.append(f"# HELP {name} {hlp or name}")
                out.append(f"# TYPE {name} {kind}")
                src = self.counters if kind == "counter" else self.gauges if kind == "gauge" else None
                if src is not None:
                    for (n, labels), v in sorted(src.items()):
                        if n == name:
                            out.append(f"{name}{lab(labels)} {v}")
                else:
                    for (n, labels), (buckets, counts, total, count) in sorted(self.hists.items(), key=lambda x: x[0]):
                        if n != name:
                            continue
                        cum = 0
                        for b, c in zip(buckets, counts):
                            cum += c
                            out.append(f"{name}_bucket{lab(labels, [('le', b)])} {cum}")
                        out.append(f"{name}_bucket{lab(labels, [('le', '+Inf')])} {count}")
                        out.append(f"{name}_sum{lab(labels)} {total}")
                        out.append(f"{name}_count{lab(labels)} {count}")
        return "\n".join(out) + "\n"
