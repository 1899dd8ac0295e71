"""Stop signals as data: the main loop waits on a socket the signal handler writes to.

The kernel may deliver a process-directed SIGTERM to any thread (a request
thread, a gRPC thread).  Python then runs its handler in the main thread only
when that thread next runs bytecode, which a thread blocked on a lock does not
do until its timeout.  `signal.set_wakeup_fd` writes the signal number to a
socket from C, whichever thread got it, so `select` on that socket wakes at
once.  The Python-level handler does nothing: no code runs in signal context.
"""

from __future__ import annotations

import select
import signal
import socket

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalWaiter:
    """Catches STOP_SIGNALS; `wait` returns one of them or None after a timeout.

    Must be created in the main thread (set_wakeup_fd's rule).
    """

    def __init__(self, signums: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self._read, self._write = socket.socketpair()
        for sock in (self._read, self._write):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            # A Python handler must be set for the wakeup fd to be written; it has nothing to do.
            signal.signal(signum, _ignore)

    def wait(self, timeout: float) -> signal.Signals | None:
        """The first pending stop signal, waiting up to `timeout` seconds for one."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        if not ready:
            return None
        try:
            data = self._read.recv(64)
        except BlockingIOError:
            return None
        return signal.Signals(data[0]) if data else None


def _ignore(_signum: int, _frame: object) -> None:
    pass
