"""A folder of the user's own images (no labels), for ``lightning_simo predict``.

Images of any size and format PIL reads (JPEG, PNG, ...) are letter-boxed into one ``size``
(resized to fit, keeping the aspect ratio, then zero-padded at the bottom and right) so they batch
together; each sample says where the image lies in the box (``valid_size``) and its own size
(``original_size``), and the prediction writer maps predictions back to that size. The encoder
pads further to a multiple of its patch size by itself.

The model's tasks and class counts reach the model through the CLI's links, as with the labelled
datamodules: give them (``tasks``, ``num_classes``) or let them be read from a checkpoint of the
model (``checkpoint``, data only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataModule", "ImageFolderDataset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _letterbox(image: Tensor, size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Fit ``3 x h x w`` into ``size`` keeping the aspect ratio; pad bottom / right with zeros."""
    h, w = image.shape[-2:]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True)[0]
    padded = torch.zeros(3, *size, dtype=image.dtype)
    padded[:, :nh, :nw] = image.clamp(0, 1)
    return padded, (nh, nw)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted), as ``image`` / ``name`` / sizes."""

    def __init__(self, root: str | Path, size: tuple[int, int]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Image folder {str(self.root)!r} does not exist; give a folder of images "
                "(--data.init_args.root)."
            )
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise FileNotFoundError(
                f"Image folder {str(self.root)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})."
            )
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"Cannot read image {str(path)!r}: {err}") from err
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        original = (int(image.shape[1]), int(image.shape[2]))
        boxed, valid = _letterbox(image, self.size)
        name = path.relative_to(self.root).with_suffix("").as_posix()
        return {
            "image": boxed,
            "name": name,
            "index": index,
            "valid_size": torch.tensor(valid),
            "original_size": torch.tensor(original),
        }


class ImageFolderDataModule(L.LightningDataModule):
    """Predict on a folder of unlabelled images.

    Args:
        root: the image folder (searched recursively).
        tasks: the model's tasks; ``None`` reads them from ``checkpoint``.
        num_classes: class counts of its classification tasks; ``None`` reads them from
            ``checkpoint``.
        checkpoint: a checkpoint of the model (``--ckpt_path``'s file): its tasks and class
            counts win over ``tasks`` / ``num_classes`` (which a config written for a labelled
            datamodule still carries when ``--data`` switches to this one).
        size: ``(height, width)`` every image is letter-boxed into.
        batch_size: images per batch.
        num_workers: loader worker processes.
    """

    def __init__(
        self,
        root: str = "images",
        tasks: list[str] | None = None,
        num_classes: dict[str, int] | None = None,
        checkpoint: str | None = None,
        size: tuple[int, int] = (64, 80),
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if checkpoint is not None:  # the model's own facts win over a config's leftovers
            stored = _stored_hparams(checkpoint)
            tasks, num_classes = stored.get("tasks"), stored.get("num_classes")
        if not tasks:
            raise ValueError(
                "ImageFolderDataModule needs the model's tasks: give --data.init_args.tasks or "
                "--data.init_args.checkpoint (the checkpoint to predict with)."
            )
        self.root = root
        self.tasks = list(tasks)
        self.num_classes = dict(num_classes or {})
        self.size = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset: ImageFolderDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage not in ("predict", None):
            raise ValueError(
                "ImageFolderDataModule has no labels: use it with `lightning_simo predict`."
            )
        self.dataset = ImageFolderDataset(self.root, self.size)

    def predict_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def _stored_hparams(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint {path!r} not found (--data.init_args.checkpoint).")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else {}
