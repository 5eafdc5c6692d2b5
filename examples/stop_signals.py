"""Stop a training loop at a step boundary on SIGINT (Ctrl-C) or SIGTERM."""

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered, the first SIGINT or SIGTERM sets `received` instead of ending the
    process, so the loop can save and exit at its next step boundary; a second signal
    acts as usual (a second Ctrl-C quits at once, without saving).

    Signal handlers belong to the main thread: elsewhere this does nothing.
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        self._restore()
        print(
            f"\n{self.received.name}: saving at the end of this step "
            "(send it again to quit at once, without saving)",
            file=sys.stderr,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
