"""Interruption is never completion: which signal stopped a run, and which rule ended a fit.

Lightning already turns SIGTERM into ``trainer.received_sigterm`` and a ``SIGTERMException`` at
the next batch boundary (after every rank agreed), and SIGINT into a graceful shutdown ending in
``sys.exit(1)``; under SLURM its requeue signal saves ``hpc_ckpt_<n>.ckpt`` and requeues. Both
interruptions end in a ``SystemExit`` a caller could take for success (``SIGTERMException`` has no
exit code), so the CLI and the study ask :func:`interrupting_signal` what really happened and exit
with 128 + the signal number. :func:`stopping_rule` names the rule that ended a fit that returned
normally, so the study records it and never calls an interrupted fit done.
:func:`sigterm_stops_between_runs` covers the moments where no trainer is running (between study
stages, while a stage loads its inputs): SIGTERM then stops the process the same way.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "RunInterrupted",
    "exit_status",
    "interrupting_signal",
    "signal_name",
    "sigterm_stops_between_runs",
    "stopping_rule",
]


class RunInterrupted(Exception):
    """A run stopped by a signal; ``str()`` is the one line to print (what stopped, how to
    resume)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def interrupting_signal(err: BaseException) -> int | None:
    """The signal behind ``err`` (SIGTERM, SIGINT), or ``None`` when no signal caused it."""
    if isinstance(err, RunInterrupted):
        return err.signum
    if isinstance(err, SIGTERMException):
        return signal.SIGTERM
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    # Lightning's graceful Ctrl+C ends in sys.exit(1) raised while handling the KeyboardInterrupt
    if (
        isinstance(err, SystemExit)
        and err.code == 1
        and isinstance(err.__context__, KeyboardInterrupt)
    ):
        return signal.SIGINT
    return None


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stopping_rule(trainer: Any) -> str | None:
    """Why a fit that returned stopped, or ``None`` when it did not finish by a rule of its own.

    ``max_epochs`` / ``max_steps`` / ``max_time``: the schedule; ``early_stopping``: an
    ``EarlyStopping`` callback; ``callback`` another callback's ``trainer.should_stop``.
    """
    if trainer is None or trainer.state.status != TrainerStatus.FINISHED:
        return None
    if trainer.received_sigterm or trainer.interrupted:
        return None
    if trainer.max_steps not in (-1, None) and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    if trainer.max_epochs not in (-1, None) and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = None if timer is None else timer.time_remaining()
    if remaining is not None and remaining <= 0:
        return "max_time"
    if any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks):
        return "early_stopping"
    if trainer.should_stop:
        return "callback"
    return None


@contextlib.contextmanager
def sigterm_stops_between_runs() -> Iterator[None]:
    """While inside, SIGTERM outside a running trainer raises ``SIGTERMException``.

    Inside a trainer, Lightning's own handler runs first (it keeps the handler it found and calls
    it after its own); this one then does nothing, so Lightning stops at a batch boundary as it
    always does (and under SLURM, keeps its requeue behaviour).
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signal.SIGTERM) is handler:  # no trainer has taken over
            raise SIGTERMException()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: keep the default behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
