"""``predict`` writes what it predicts: raw values and a viewable picture per image and task.

Layout under ``output_dir`` (``{root}/predictions`` in the configs)::

    <task>/<name>.npy   segmentation: H x W uint8 class ids; edges: H x W float16 probability;
                        depth-like: H x W float16; normals: H x W x 3 float16 unit vectors;
                        other regression tasks: H x W x C float16
    <task>/<name>.png   the picture the loggers show (class palette, depth colour map on the
                        map's own valid range, stored in the PNG's ``min`` / ``max`` text fields;
                        normals as RGB)

``<name>`` is the image's own name for an image folder (:mod:`lightning_simo.data.folder`) and the
sample's index in its split otherwise. Predictions of a letter-boxed image are cropped to the
image and resized back to its own size. Under DDP Lightning's predict sampler hands each sample to
exactly one rank (no padding repeats), and each rank writes only its own samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, PngImagePlugin
from torch import Tensor

from lightning_simo.callbacks.visualize import render, scalar_range
from lightning_simo.io import atomic_write

__all__ = ["PredictionWriter", "raw_prediction"]


def raw_prediction(task: Any, pred: Tensor) -> np.ndarray:
    """A head's ``C x H x W`` output as the array stored on disk (dtype and layout above)."""
    value = task.predict(pred.detach().float().cpu()[None])[0]
    if not value.is_floating_point():  # class ids
        return value.numpy().astype(np.uint8 if task.channels <= 256 else np.uint16)
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    elif value.dim() == 3:
        value = value.permute(1, 2, 0)
    return value.numpy().astype(np.float16)


def _restore_size(pred: Tensor, valid: Sequence[int] | None, size: Sequence[int] | None) -> Tensor:
    """Crop the padded area away and resize to the image's own ``(H, W)``."""
    if valid is not None:
        pred = pred[..., : int(valid[0]), : int(valid[1])]
    if size is not None and tuple(pred.shape[-2:]) != (int(size[0]), int(size[1])):
        pred = F.interpolate(
            pred[None].float(), size=(int(size[0]), int(size[1])), mode="bilinear"
        )[0]
    return pred


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def _save_png(path: Path, rgb: Tensor, text: Mapping[str, str]) -> None:
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


def _column(batch: Mapping[str, Any], key: str, i: int) -> Any:
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[i].tolist()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
        return [int(v[i]) for v in value]  # a collated (H, W) pair
    return value[i]


class PredictionWriter(BasePredictionWriter):
    """Write every predicted image's raw values (``.npy``) and picture (``.png``) per task.

    Args:
        output_dir: the folder that receives ``<task>/<name>.{npy,png}``.
        tasks: which of the model's tasks to write (``None``: all of them).
        png: also write the pictures.
    """

    def __init__(
        self, output_dir: str = "predictions", tasks: list[str] | None = None, png: bool = True
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.tasks = list(tasks) if tasks is not None else None
        self.png = png
        self.written: list[str] = []  # names this rank wrote, in order

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or self.tasks is None:
            return
        known = list(getattr(pl_module, "task_specs", {}))
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(
                f"PredictionWriter: the model has no task {unknown[0]!r}; it predicts "
                f"{', '.join(known)}. Fix the writer's `tasks`."
            )

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        specs = pl_module.task_specs
        tasks = self.tasks if self.tasks is not None else list(prediction)
        count = int(batch["image"].shape[0])
        for i in range(count):
            name = _column(batch, "name", i)
            if name is None:
                index = _column(batch, "index", i)
                name = f"{int(index if index is not None else batch_indices[i]):06d}"
            valid = _column(batch, "valid_size", i)
            size = _column(batch, "original_size", i)
            for task in tasks:
                pred = _restore_size(prediction[task][i], valid, size)
                self._write(specs[task], str(name), pred)
            self.written.append(str(name))

    def _write(self, task: Any, name: str, pred: Tensor) -> None:
        folder = self.output_dir / task.name
        raw = raw_prediction(task, pred)
        _save_npy(folder / f"{name}.npy", raw)
        if not self.png:
            return
        text: dict[str, str] = {"task": task.name}
        if task.colour_mapped:
            value_range = scalar_range(torch.from_numpy(raw.astype(np.float32)))
            text.update(min=f"{value_range[0]:.6g}", max=f"{value_range[1]:.6g}")
            picture = render(task, pred.float(), value_range)
        elif task.geometry.label:
            picture = render(task, torch.from_numpy(raw.astype(np.int64)))
        else:
            picture = render(task, pred)
        _save_png(folder / f"{name}.png", picture, text)
