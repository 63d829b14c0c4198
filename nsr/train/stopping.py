"""Ctrl-C as a request, not an exception: the training loop stops at a step boundary and saves.

    with StopRequest() as stop:
        for step ...:
            ...
            if stop.requested: save(); break

The first SIGINT only sets `requested`; a second one raises KeyboardInterrupt at once (for a loop
that is stuck). Outside the main thread signals cannot be caught, and the block changes nothing.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
