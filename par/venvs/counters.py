"""The venv counters /metrics reports."""

from __future__ import annotations

import threading


class VenvCounters:
    """Thread-safe counters for /metrics: hits, misses, builds, failures,
    evictions and build_seconds."""

    FIELDS = ("hits", "misses", "builds", "failures", "evictions", "build_seconds")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, amount: float = 1) -> None:
        """Add `amount` to counter `name` (KeyError for a name not in FIELDS)."""
        if name not in self._values:
            raise KeyError(name)
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of all counters."""
        with self._lock:
            out = dict(self._values)
        out["build_seconds"] = round(out["build_seconds"], 3)
        return out
