"""Cityscapes in MTAN-style ``.npy`` (128 x 256): semantic and part segmentation, disparity.

The official validation set (500 images) has no public test counterpart with labels, so it serves
as the test split, and the official training set (2975 images) is split by a seeded permutation
(seed 42) into train (2380) and a labelled validation split (595), as in the SIMO paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor
from torch.utils.data import Dataset

from lightning_simo.data._files import (
    Transform,
    check_same_keys,
    check_same_size,
    count_from,
    finish_sample,
    list_files,
    load_npy,
    require_dir,
    seeded_split,
    sorted_keys,
    to_image,
    to_labels,
    to_scalar_map,
)
from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.data.transforms import build_transform

__all__ = ["CityscapesDataModule", "CityscapesDataset"]

CLASS_COUNTS = (7, 19)
PART_CLASSES = 10
TASKS = ("segmentation", "part_segmentation", "disparity")

LAYOUT = """\
<root>/
  train/                  2975 images (the official training set)
    image/0.npy ...       H x W x 3 float in [0, 1] (128 x 256)
    label_19/0.npy ...    H x W class ids 0..18, -1 = ignore  (or label_7/: 0..6)
    part_seg/0.npy ...    H x W part ids 0..9, -1 = ignore
    depth/0.npy ...       H x W (or H x W x 1) disparity, 0 (or -1) = invalid
  val/                    500 images (the official validation set), same folders
"""


def _folders(classes: int) -> dict[str, str]:
    return {
        "segmentation": f"label_{classes}",
        "part_segmentation": "part_seg",
        "disparity": "depth",
    }


class CityscapesDataset(Dataset):
    """One split of Cityscapes as dicts of tensors (``"image"``, the selected tasks, ``"index"``).

    Args:
        root: the folder holding ``train/`` and ``val/`` (see ``LAYOUT``).
        split: ``"train"`` / ``"val"`` (the two seeded parts of ``root/train``) or ``"test"``
            (``root/val``).
        tasks: any of ``segmentation``, ``part_segmentation``, ``disparity``.
        transform: applied to the numpy sample (HWC) before conversion to tensors.
        classes: 19 (``label_19``) or 7 (``label_7``) semantic classes.
        num_val: images of ``root/train`` that form the val split (a count, or a fraction in
            (0, 1); 0.2 of 2975 is the paper's 595).
        split_seed: seed of the train / val permutation (42 reproduces the SIMO split).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        transform: Transform | None = None,
        classes: int = 19,
        num_val: int | float = 0.2,
        split_seed: int = 42,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if classes not in CLASS_COUNTS:
            raise ValueError(f"Cityscapes classes must be one of {CLASS_COUNTS}, got {classes}.")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"Cityscapes has no task {unknown[0]!r}; it carries {list(TASKS)}.")
        self.tasks = list(tasks)
        self.split = split
        self.transform = transform
        self.classes = classes
        folders = _folders(classes)

        root = require_dir("Cityscapes", Path(root), LAYOUT)
        base = root / ("val" if split == "test" else "train")
        images = list_files("Cityscapes", base / "image", ".npy", LAYOUT)
        targets = {t: list_files("Cityscapes", base / folders[t], ".npy", LAYOUT) for t in tasks}
        check_same_keys(
            "Cityscapes",
            (base / "image", images),
            {base / folders[t]: files for t, files in targets.items()},
        )
        keys = sorted_keys(images)
        if split != "test":
            n_val = count_from(num_val, len(keys), "num_val")
            if not 0 < n_val < len(keys):
                raise ValueError(
                    f"Cityscapes: num_val={num_val} leaves an empty train or val split of the "
                    f"{len(keys)} images in {str(base)!r}; choose 1 to {len(keys) - 1} images."
                )
            train, val = seeded_split(len(keys), len(keys) - n_val, split_seed)
            keys = [keys[i] for i in (train if split == "train" else val)]
        self.files = [{"image": images[k], **{t: targets[t][k] for t in tasks}} for k in keys]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        paths = self.files[index]
        sample = {"image": to_image(load_npy(paths["image"]), paths["image"])}
        for task in self.tasks:
            array = load_npy(paths[task])
            if task == "segmentation":
                sample[task] = to_labels(array, self.classes, paths[task])
            elif task == "part_segmentation":
                sample[task] = to_labels(array, PART_CLASSES, paths[task])
            else:
                disparity = to_scalar_map(array, paths[task], "disparity map")
                disparity[disparity == -1] = 0.0  # Auto-Lambda's files mark invalid with -1
                sample[task] = disparity
        check_same_size(sample, paths)
        return finish_sample(sample, self.transform, index, self.tasks)


class CityscapesDataModule(DenseDataModule):
    """Cityscapes (MTAN-style ``.npy``): 2380 train / 595 val / 500 test images by default.

    Training augmentation follows the SIMO paper: a random scale in ``scales`` (labels nearest,
    disparity handled like depth by ``transforms``), a random crop back to ``crop`` (the stored
    128 x 256 by default) and a horizontal flip. Evaluation uses the full, un-augmented image.

    Args:
        root: dataset folder (layout in ``lightning_simo.data.cityscapes.LAYOUT``).
        tasks: subset of ``segmentation``, ``part_segmentation``, ``disparity``; ``None`` = all.
        classes: 19 or 7 semantic classes (reads ``label_19`` or ``label_7``).
        crop: training crop ``(height, width)``; ``None`` keeps the whole rescaled image.
        scales: random rescaling factors for training.
        hflip: random horizontal flips for training.
        num_val: images of the official training set used as the val split (count or fraction).
        split_seed: seed of the train / val split.
        **kwargs: the loader, budget and seed settings of
            :class:`~lightning_simo.data.base.DenseDataModule` (``batch_size``,
            ``num_workers``, ``train_budget``, ``train_split``, ...).
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "segmentation": 19,
        "part_segmentation": PART_CLASSES,
        "disparity": None,
    }

    def __init__(
        self,
        root: str = "data/cityscapes",
        tasks: list[str] | None = None,
        classes: int = 19,
        crop: tuple[int, int] | None = (128, 256),
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        hflip: bool = True,
        num_val: int | float = 0.2,
        split_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        if classes not in CLASS_COUNTS:
            raise ValueError(f"Cityscapes classes must be one of {CLASS_COUNTS}, got {classes}.")
        super().__init__(tasks=tasks, **kwargs)
        self.root = root
        self.classes = classes
        self.crop = tuple(crop) if crop is not None else None
        self.scales = tuple(scales)
        self.hflip = hflip
        self.num_val = num_val
        self.split_seed = split_seed

    @property
    def num_classes(self) -> dict[str, int]:
        """Class counts of the selected classification tasks; segmentation follows ``classes``."""
        counts = {"segmentation": self.classes, "part_segmentation": PART_CLASSES}
        return {t: counts[t] for t in self.tasks if t in counts}

    def make_dataset(self, split: str, train: bool) -> CityscapesDataset:
        if train:
            transform = build_transform(True, crop=self.crop, scales=self.scales, hflip=self.hflip)
        else:
            transform = build_transform(False)
        return CityscapesDataset(
            self.root, split, self.tasks, transform, self.classes, self.num_val, self.split_seed
        )
