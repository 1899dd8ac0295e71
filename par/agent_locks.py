"""One lock per agent: everything done to an agent's unit and files is serialized by it."""

from __future__ import annotations

import threading
from collections import defaultdict


class AgentLocks:
    """The per-agent locks shared by the deploy runner, the actions, reconcile and the
    unit monitor (locks are never dropped: one per agent id ever seen is small)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def of(self, agent: str) -> threading.Lock:
        """The lock serializing everything done to `agent`."""
        with self._guard:
            return self._locks[agent]
