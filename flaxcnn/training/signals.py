"""Stopping cleanly on SIGTERM (preemption, `kill`, a scheduler's time limit) and SIGINT (Ctrl-C).

The handlers only set a flag; the training loop looks at it between steps, saves a checkpoint
of the step it reached and raises `Interrupted`, which the command line turns into a one-line
message and exit code 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as shells
report a process killed by a signal. A second Ctrl-C while stopping raises KeyboardInterrupt at
once, for a user who does not want to wait for the checkpoint.
"""

import signal
import threading
from types import FrameType

import numpy as np
from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint of `step`."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.signal_name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {self.signal_name} at step {step}: checkpoint saved; "
            "rerun the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while inside, SIGTERM and SIGINT request a stop instead of killing.

    `requested` / `signal_name` / `signum` say whether and by which signal a stop was asked;
    the previous handlers come back on exit. Outside the main thread (where Python cannot
    install handlers) it installs nothing and never requests a stop.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Second Ctrl-C: the user does not want to wait.
        if not self.requested:
            self.requested, self.signum = True, signum
            logging.warning(
                "%s received: stopping after this step with a checkpoint "
                "(Ctrl-C again to quit at once)",
                signal.Signals(signum).name,
            )

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            # None: a handler installed outside Python (not restorable); fall back to default.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether any process has been asked to stop. With several processes this is a
        collective (a one-number all-gather): every process must call it at the same steps,
        so that all of them stop, and save, at the same step."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if not self.requested and np.any(signums):
            self.requested, self.signum = True, int(signums[np.flatnonzero(signums)[0]])
        return self.requested

    def interrupted(self, step: int) -> Interrupted:
        """The exception to raise once the checkpoint of `step` is saved."""
        if self.signum is None:
            raise RuntimeError("no stop was requested")
        return Interrupted(self.signum, step)
