"""Test helper for ``tests/test_resume.py``: hold a fit at the start of an epoch until killed.

The subprocess under test imports it by class path (``resume_hold.HoldAtEpoch``), with this
folder on ``PYTHONPATH``. Holding makes the kill point exact whatever the machine's load: the
run has finished (and checkpointed) every epoch before ``epoch``, and has not started that one.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

__all__ = ["HoldAtEpoch"]


class HoldAtEpoch(L.Callback):
    """At the start of ``epoch``, write ``marker`` and sleep until the process is killed."""

    def __init__(self, epoch: int, marker: str) -> None:
        self.epoch = epoch
        self.marker = marker

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        Path(self.marker).write_text(str(trainer.global_step))
        while True:
            time.sleep(1)
