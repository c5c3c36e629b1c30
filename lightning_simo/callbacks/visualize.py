"""Pictures of predictions: one rendering shared by the loggers' panels and the prediction PNGs.

A person reads these, so a panel carries what a bare tensor grid does not: column titles, a class
legend for segmentation and a colour bar for depth-like maps, with prediction and target drawn on
the *same* colour scale (normalising each on its own hides the error). The prediction writer
saves the same colour mapping as PNG files, so what is on disk looks like what the dashboards
show.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

__all__ = [
    "DEPTH_COLORMAP",
    "ImageLogger",
    "figure_to_array",
    "log_figure",
    "render",
    "scalar_range",
    "task_panel",
    "task_panel_figure",
]

DEPTH_COLORMAP = "viridis"
"""Colour map of depth-like maps (perceptually ordered; invalid pixels are black)."""


def scalar_range(*maps: Tensor) -> tuple[float, float]:
    """Range of the valid (non-zero) values over several depth-like maps: one scale for all."""
    values = [m.detach().float().flatten() for m in maps]
    valid = torch.cat([v[v != 0] for v in values]) if values else torch.zeros(0)
    if valid.numel() == 0:
        return 0.0, 1.0
    lo, hi = float(valid.min()), float(valid.max())
    return lo, hi if hi > lo else lo + 1e-6


def _colorize(x: Tensor, lo: float, hi: float) -> Tensor:
    """``H x W`` values -> ``3 x H x W`` colours in [0, 1] on the fixed range [lo, hi]."""
    x = x.detach().float().cpu()
    scaled = ((x - lo) / (hi - lo)).clamp(0, 1).numpy()
    rgb = torch.from_numpy(colormaps[DEPTH_COLORMAP](scaled)[..., :3].astype(np.float32))
    return rgb.permute(2, 0, 1) * (x != 0).unsqueeze(0)


def render(task: Any, x: Tensor, value_range: tuple[float, float] | None = None) -> Tensor:
    """One prediction or target as a ``3 x H x W`` float image in [0, 1].

    Depth-like maps use :data:`DEPTH_COLORMAP` on ``value_range`` (their own valid range when
    not given); every other task draws itself (``Task.visualize``: fixed class palette, normals as
    RGB, edges as grey levels).
    """
    if task.colour_mapped:
        x = x.detach().float()
        x = x[0] if x.dim() == 3 else x
        lo, hi = value_range if value_range is not None else scalar_range(x)
        return _colorize(x, lo, hi)
    return task.visualize(x)


def task_panel(task: Any, image: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """One row ``[input | prediction | target]`` as a ``3 x H x 3W`` float image in [0, 1]."""
    shared = scalar_range(target, pred) if task.colour_mapped else None
    tiles = [
        image.detach().float().cpu().clamp(0, 1),
        render(task, pred, shared),
        render(task, target, shared),
    ]
    return torch.cat(tiles, dim=-1)


def _hwc(x: Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def task_panel_figure(
    task: Any, images: Tensor, preds: Tensor, targets: Tensor | None = None
) -> Figure:
    """A titled figure, one row per image: input, prediction, target (when known).

    Segmentation gets a legend of its class colours; depth-like maps one colour bar per row, on
    the range shared by that row's prediction and target.
    """
    columns = ["input", "prediction"] + (["target"] if targets is not None else [])
    rows = images.shape[0]
    h, w = images.shape[-2:]
    tile_w, tile_h = 2.2 * w / max(h, w), 2.2 * h / max(h, w)
    fig = Figure(figsize=(len(columns) * tile_w + 1.6, rows * tile_h + 0.6))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r in range(rows):
        maps = [preds[r]] + ([targets[r]] if targets is not None else [])
        shared = scalar_range(*maps) if task.colour_mapped else None
        tiles = [images[r].detach().float().cpu().clamp(0, 1)] + [
            render(task, m, shared) for m in maps
        ]
        for c, tile in enumerate(tiles):
            ax = axes[r][c]
            ax.imshow(_hwc(tile), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        if shared is not None:
            bar = fig.colorbar(_scalar_mappable(shared), ax=list(axes[r]), fraction=0.03, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(task.name, fontsize=7)
    if task.geometry.label and task.num_classes:
        colours = task.visualize(torch.arange(task.num_classes)[None])[:, 0].T.numpy()
        handles = [Patch(color=tuple(colours[i]), label=str(i)) for i in range(task.num_classes)]
        fig.legend(
            handles=handles,
            title="class",
            loc="center right",
            fontsize=7,
            title_fontsize=8,
            ncol=1 + task.num_classes // 14,
        )
    fig.suptitle(task.name, fontsize=10)
    return fig


def _scalar_mappable(value_range: tuple[float, float]) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(*value_range), cmap=DEPTH_COLORMAP)


def figure_to_array(fig: Figure) -> np.ndarray:
    """The figure as an ``H x W x 3`` uint8 image (for loggers that take arrays)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(trainer: L.Trainer, key: str, fig: Figure, step: int) -> list[str]:
    """Send one figure to every logger of ``trainer`` that takes images; returns their names.

    TensorBoard (``add_image``), MLflow (``log_image`` with key and step), W&B (``log_image``).
    Loggers without images (CSV) are skipped: the scalars reach them separately.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    array = figure_to_array(fig)
    reached = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, array, step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, array, key=key.replace("/", "."), step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[array], step=step)
        else:
            continue
        reached.append(type(logger).__name__)
    return reached


class ImageLogger(L.Callback):
    """Log panels of the first validation batch's predictions every ``every_n_epochs`` epochs.

    One figure per task (input, prediction, target with titles, legend and colour bar), sent to
    every logger that takes images; written by rank 0 only.

    Args:
        num_images: rows per task figure.
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
        if trainer.current_epoch % self.every_n_epochs != 0 or not trainer.loggers:
            return
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        n = min(self.num_images, batch["image"].shape[0])
        images = batch["image"][:n].detach().cpu()
        for name, pred in outputs["preds"].items():
            task = pl_module.task_specs[name]
            fig = task_panel_figure(task, images, pred[:n].cpu(), batch[name][:n].cpu())
            log_figure(trainer, f"val/{name}", fig, trainer.global_step)
