"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM end a run at the next step boundary with a checkpoint.

:class:`StopSignals` is a context manager that installs handlers for SIGINT and SIGTERM (in the main thread only;
elsewhere it does nothing) and restores the previous handlers on exit. A first signal only sets a flag: the training
loop finishes the current step, writes ``checkpoint.pt`` and raises :class:`TrainingInterrupted`, whose message
gives the exact command that resumes the run. A second signal of the same kind acts as without the context manager
(Ctrl-C twice: an immediate ``KeyboardInterrupt``); a signal that the process ignores (``nohup``, a background job
of a non-interactive shell) stays ignored. Under DDP the flag is summed over the ranks at every step, so all
ranks stop at the same step and write one consistent checkpoint.

The exit code convention of shells is 128 + the signal number: 130 for SIGINT, 143 for SIGTERM.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after writing its checkpoint.

    A ``KeyboardInterrupt`` subclass, so code that catches Ctrl-C keeps working.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        step: the step of the checkpoint written.
        total: the run's budget in steps.
        output: the run folder.
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, total: int, output: str) -> None:
        self.signal_name = signal.Signals(signum).name
        self.step, self.total, self.output = step, total, output
        self.exit_code = 128 + int(signum)
        super().__init__(self.message)

    @property
    def resume_command(self) -> str:
        import shlex

        return f"torchsphere train --output {shlex.quote(self.output)} --resume"

    @property
    def message(self) -> str:
        return (f"interrupted by {self.signal_name} at step {self.step}/{self.total}; checkpoint saved in "
                f"{self.output}. Resume with:\n  {self.resume_command}")


class StopSignals:
    """Context manager turning SIGINT / SIGTERM into a stop request read by :attr:`requested`.

    Example::

        with StopSignals() as stop:
            while not done:
                step()
                if stop.requested:
                    save_checkpoint(); raise TrainingInterrupted(stop.signum, ...)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once
        # the loop checks the flag after the current step

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:  # an ignored signal stays ignored (nohup, background jobs)
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
