"""InterruptionCheckpoint: ``last.ckpt`` is always where training is, stopped or not.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint
is saved at the same step, so once the monitored loss stops improving ``last.ckpt`` stays at the
best epoch: a run resumed after SIGKILL repeats epochs, and every stage that reads ``last.ckpt``
(the foundation's θ0, the re-aligned models the study tests) gets an older model than the fit
ended with. This callback saves ``last.ckpt`` at the end of every epoch and of the fit where its
``ModelCheckpoint`` did not.

Lightning stops a fit on SIGTERM at the end of a training step (after every rank agreed) but saves
nothing there, so the last checkpoint is the last epoch's, and a stop in the first epoch leaves
none. This callback saves each ``ModelCheckpoint``'s ``last.ckpt`` at that point, through the
``ModelCheckpoint`` itself (the same file, state and atomic write as its own saves), and treats a
first Ctrl+C the same way: training finishes the current step, then stops (a second Ctrl+C stops
at once, saving nothing). Resuming with ``--ckpt_path last`` then repeats the uninterrupted run
exactly: the training loader takes up the epoch where it stopped, with the same order and
augmentation (:mod:`lightning_simo.data.sampling`), and ``RNGStateCheckpoint`` restores the random
generators as they were at that step.

Only stops at a step boundary are saved: a stop during validation (the epoch's training is done
but its validation is not) or a second Ctrl+C leaves the previous checkpoint as the one to resume
from. Under DDP, Ctrl+C keeps Lightning's behaviour (every rank receives it at a different point);
SIGTERM is agreed by all ranks first, so it is saved there too. The CLI adds this callback to every
run.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["InterruptionCheckpoint", "received_signal"]


class InterruptionCheckpoint(L.Callback):
    """Keep ``last.ckpt`` at the latest epoch, and save it where SIGTERM or Ctrl+C stopped training."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The signal that stopped training (SIGINT is only known here: Lightning sees a stop)."""
        self._trainer: L.Trainer | None = None
        self._previous_sigint: Any = None
        self._last_saved_step: dict[int, int] = {}
        """Per ``ModelCheckpoint``: the step of the ``last.ckpt`` this callback saved."""

    # ------------------------------------------------------------------ Ctrl+C
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):  # Ctrl+C is ignored here: keep it so
            return
        self._trainer, self._previous_sigint = trainer, previous
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT or self._trainer is None:
            self._restore_sigint()
            raise KeyboardInterrupt
        self.signum = signal.SIGINT
        # Lightning's own stop request: checked at the end of every training step
        self._trainer._signal_connector.received_sigterm = True
        print(
            "Ctrl+C: training stops after this step and saves a checkpoint to resume from "
            "(Ctrl+C again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._trainer, self._previous_sigint = None, None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------ the latest epoch
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in self._stale(trainer):
            # one that saves after validation has made this epoch's decision already; one that
            # saves at the train epoch's end decides after this hook (Lightning runs checkpoint
            # callbacks last), so it gets the step back and its top-k decision runs as usual (an
            # improvement then writes best.ckpt and rewrites last.ckpt)
            decides_later = callback._should_save_on_train_epoch_end(trainer)
            previous = callback._last_global_step_saved
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            self._last_saved_step[id(callback)] = trainer.global_step
            if decides_later:
                callback._last_global_step_saved = previous

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        for callback in self._stale(trainer):  # a fit that ended inside an epoch (max_steps)
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    def _stale(self, trainer: L.Trainer) -> list[ModelCheckpoint]:
        """The checkpoint callbacks whose ``last.ckpt`` is not at the current step."""
        return [
            callback
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint)
            and callback.save_last is True  # "link" points at a top-k file by design
            and not callback._should_skip_saving_checkpoint(trainer)  # saved at this step
            and self._last_saved_step.get(id(callback)) != trainer.global_step
        ]

    # ------------------------------------------------------------------ the interruption
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return  # an error, or a Ctrl+C at an arbitrary point: no consistent state to save
        if self.signum is None:
            self.signum = signal.SIGTERM
        if not trainer.training or trainer.sanity_checking:
            return  # stopped inside validation: its metrics are half gathered
        for callback in self._stale(trainer):
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def received_signal(trainer: L.Trainer | None) -> int | None:
    """The signal an :class:`InterruptionCheckpoint` of ``trainer`` saw stop training."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, InterruptionCheckpoint) and callback.signum is not None:
            return callback.signum
    return None
