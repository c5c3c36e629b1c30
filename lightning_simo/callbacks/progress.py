"""Progress people can read wherever the output goes.

On a terminal this is Lightning's ``RichProgressBar``. Redirected to a file (SLURM logs, CI,
``nohup``) live bars become either nothing or a stream of carriage returns, so there it prints
plain lines instead: ``[fit] epoch 2/20 batch 40/94 (43%) 12s elapsed, ~16s left, loss 0.31``
a few times per loop.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ProgressBar"]


def _count(batches: Any, dataloader_idx: int) -> Any:
    return batches[dataloader_idx] if isinstance(batches, list) else batches


class ProgressBar(RichProgressBar):
    """Rich bars on a terminal, ``lines_per_loop`` plain progress lines per loop otherwise.

    Args:
        lines_per_loop: lines printed per epoch / evaluation when output is not a terminal.
        force_lines: print lines even on a terminal (and no bars).
        **kwargs: ``RichProgressBar`` arguments (``refresh_rate``, ``leave``, ``theme``, ...).
    """

    def __init__(self, lines_per_loop: int = 4, force_lines: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lines_per_loop = max(1, lines_per_loop)
        self.lines = force_lines or not sys.stdout.isatty()
        self._started = 0.0
        if self.lines:
            self.disable()

    # ------------------------------------------------------------------ plain lines
    @rank_zero_only
    def _line(self, stage: str, done: int, total: Any, trainer: L.Trainer, extra: str = "") -> None:
        if not isinstance(total, (int, float)) or total in (0, float("inf")):
            return
        total = int(total)
        step = max(1, total // self.lines_per_loop)
        if done != total and done % step != 0:
            return
        elapsed = time.monotonic() - self._started
        left = elapsed / done * (total - done) if done else 0.0
        epoch = ""
        if stage == "fit":
            epoch = f" epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        print(
            f"[{stage}]{epoch} batch {done}/{total} ({100 * done // total}%) "
            f"{elapsed:.0f}s elapsed, ~{left:.0f}s left{extra}",
            flush=True,
        )

    def _metrics_text(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        shown = []
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key == "v_num":
                continue
            shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return (", " + ", ".join(shown)) if shown else ""

    def _start(self) -> None:
        self._started = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        if self.lines:
            extra = self._metrics_text(trainer, pl_module)
            self._line("fit", idx + 1, self.total_train_batches, trainer, extra)

    def _eval_start(self) -> None:
        if self.lines:
            self._eval_started, self._started = self._started, time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._eval_start()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.lines:
            self._started = getattr(self, "_eval_started", self._started)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._start()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._start()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(
            trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
        )
        if self.lines and not trainer.sanity_checking:
            total = _count(trainer.num_val_batches, dataloader_idx)
            self._line("validate", batch_idx + 1, total, trainer)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.lines:
            total = _count(trainer.num_test_batches, dataloader_idx)
            self._line("test", batch_idx + 1, total, trainer)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.lines:
            total = _count(trainer.num_predict_batches, dataloader_idx)
            self._line("predict", batch_idx + 1, total, trainer)
