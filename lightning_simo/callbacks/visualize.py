"""TensorBoard images of input / prediction / target for every task, written by rank 0 only."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

__all__ = ["ImageLogger", "task_panel"]


def task_panel(task: Any, image: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """One row ``[input | prediction | target]`` as a ``3 x H x 3W`` float image in [0, 1]."""
    tiles = [image.detach().float().cpu().clamp(0, 1), task.visualize(pred), task.visualize(target)]
    return torch.cat(tiles, dim=-1)


class ImageLogger(L.Callback):
    """Log the first validation batch's predictions every ``every_n_epochs`` epochs.

    Args:
        num_images: rows per task image.
        every_n_epochs: how often to log.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs != 0:
            return
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        n = min(self.num_images, batch["image"].shape[0])
        for name, pred in outputs["preds"].items():
            task = pl_module.task_specs[name]
            rows = [task_panel(task, batch["image"][i], pred[i], batch[name][i]) for i in range(n)]
            grid = torch.cat(rows, dim=-2)
            for lg in loggers:
                lg.experiment.add_image(f"val/{name}", grid, trainer.global_step)
