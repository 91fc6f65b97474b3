"""How ``fastcnn bench`` stops on SIGINT or SIGTERM: at once while measuring, never while writing its results.

The handlers are installed explicitly, whatever the process inherited: a job started in the background from a
non-interactive shell starts with SIGINT ignored (SIG_IGN), and SIGTERM's default kills the process before it
writes anything; both must still stop a bench cleanly. While measuring, the first signal raises
``BenchInterrupted`` (a KeyboardInterrupt, as Ctrl-C's default handler would): the configuration being measured
is dropped, the ones measured so far are reported. Outside the measuring (the table, the JSON, the chart), a
signal is recorded and waits until what is being written is complete; only a second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BenchInterrupted(KeyboardInterrupt):
    """A stop signal arrived while a bench was measuring."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager: SIGINT and SIGTERM handlers for one bench command (the previous ones come back after).
    ``signum`` is the first stop signal received (None: none)."""

    def __init__(self):
        self.signum: int | None = None
        self._measuring = False
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    @contextlib.contextmanager
    def measuring(self):
        """Inside: the first stop signal raises BenchInterrupted. One that came before raises on entry."""
        if self.signum is not None:
            raise BenchInterrupted(self.signum)
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self._measuring:
                raise BenchInterrupted(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, even while writing
