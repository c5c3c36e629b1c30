"""Test helper for ``tests/test_faults.py``: a signal delivered at an exact training step.

The run under test loads it by class path (``fault_signal.SignalAtStep``, this folder on
``PYTHONPATH``). The process signals itself, so the interruption lands at the chosen step whatever
the machine's load; ``hold`` instead writes ``marker`` and waits there to be signalled (or
killed) from outside, so another process can be started against the same run folder meanwhile.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L

__all__ = ["SignalAtStep"]


class SignalAtStep(L.Callback):
    """After optimizer step ``step`` of the run whose folder contains ``where``: send ``signal``
    (``SIGTERM``, ``SIGINT``, ``SIGKILL``) to this process, ``hold`` until signalled, or
    ``none`` (the uninterrupted reference run, with the same callback list).

    Fires once: ``marker`` records that it did, so the resumed run trains on undisturbed.
    """

    def __init__(self, signal: str, step: int, marker: str, where: str = "") -> None:
        self.signal = signal
        self.step = step
        self.marker = marker
        self.where = where

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.signal == "none" or trainer.global_step != self.step:
            return
        if self.where not in str(trainer.default_root_dir):
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.write_text(f"{os.getpid()} {trainer.global_step}")
        if self.signal == "hold":
            while not trainer.received_sigterm:
                time.sleep(0.05)
            return
        os.kill(os.getpid(), getattr(signal, self.signal))
        time.sleep(0.5)  # the handler runs in this thread, at the next bytecode boundary
