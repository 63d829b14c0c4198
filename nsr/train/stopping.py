"""Ctrl-C and SIGTERM as a request, not an exception: the training loop stops at a step boundary
and saves.

    with StopRequest() as stop:
        for step ...:
            ...
            if stop.requested: save(); break

SIGTERM is what cluster schedulers (and `kill`) send before they kill a job, so it is treated like
Ctrl-C (SIGINT). The first signal only sets `requested` (and `signal_name`); a second one raises
KeyboardInterrupt at once (for a loop that is stuck), unless the caller is already honoring the
request (`honoring`: saving the checkpoint), which a second signal must not cut short. Outside the
main thread signals cannot be caught, and the block changes nothing.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None   # "SIGINT" or "SIGTERM", once requested
        self.honoring = False                   # set by the caller while it stops and saves
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if self.honoring:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        self._previous = {}
