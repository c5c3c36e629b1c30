"""Cityscapes in MTAN-style ``.npy`` (128 x 256): semantic and part segmentation, disparity.

The official validation set (500 images) has no public test counterpart with labels, so it serves
as the test split, and the official training set (2975 images) is split by a seeded permutation
(seed 42) into train (2380) and a labelled validation split (595), as in the SIMO paper.
Reading is :mod:`lightning_simo.data.mtan`; this module only configures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lightning_simo.data._files import Transform, to_labels, to_scalar_map
from lightning_simo.data.mtan import MTANDataModule, MTANDataset, MTANLayout, SplitRule, TaskReader

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


def _disparity(array: np.ndarray, path: Path) -> np.ndarray:
    disparity = to_scalar_map(array, path, "disparity map")
    disparity[disparity == -1] = 0.0  # Auto-Lambda's files mark invalid with -1
    return disparity


def _check_classes(classes: int) -> None:
    if classes not in CLASS_COUNTS:
        raise ValueError(f"Cityscapes classes must be one of {CLASS_COUNTS}, got {classes}.")


def cityscapes_layout(classes: int) -> MTANLayout:
    """The layout with ``classes`` (19 or 7) semantic classes, read from ``label_<classes>``."""
    _check_classes(classes)
    return MTANLayout(
        name="Cityscapes",
        description=LAYOUT,
        readers={
            "segmentation": TaskReader(f"label_{classes}", lambda a, p: to_labels(a, classes, p)),
            "part_segmentation": TaskReader("part_seg", lambda a, p: to_labels(a, PART_CLASSES, p)),
            "disparity": TaskReader("depth", _disparity),
        },
        split_rule=SplitRule(whole=("test", "val"), divided="train", parts=("train", "val")),
    )


class CityscapesDataset(MTANDataset):
    """One split of Cityscapes: ``"train"`` / ``"val"`` (the two seeded parts of ``root/train``;
    ``num_val``, a count or a fraction, 0.2 of 2975 being the paper's 595) or ``"test"``
    (``root/val``); ``classes`` is 19 (``label_19``) or 7 (``label_7``). Other arguments as
    :class:`~lightning_simo.data.mtan.MTANDataset`."""

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
        layout = cityscapes_layout(classes)
        super().__init__(layout, root, split, tasks, transform, num_val, split_seed)
        self.classes = classes


class CityscapesDataModule(MTANDataModule):
    """Cityscapes (MTAN-style ``.npy``): 2380 train / 595 val / 500 test images by default.

    Args:
        root: dataset folder (layout in ``lightning_simo.data.cityscapes.LAYOUT``).
        classes: 19 or 7 semantic classes (reads ``label_19`` or ``label_7``).
        crop: training crop ``(height, width)``; the stored 128 x 256 by default.
        num_val: images of the official training set used as the val split (count or fraction).
        **kwargs: ``tasks``, ``scales``, ``hflip``, ``split_seed`` of
            :class:`~lightning_simo.data.mtan.MTANDataModule` and the loader settings of
            :class:`~lightning_simo.data.base.DenseDataModule`.
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "segmentation": 19,
        "part_segmentation": PART_CLASSES,
        "disparity": None,
    }

    def __init__(
        self,
        root: str = "data/cityscapes",
        classes: int = 19,
        crop: tuple[int, int] | None = (128, 256),
        num_val: int | float = 0.2,
        **kwargs: Any,
    ) -> None:
        _check_classes(classes)
        super().__init__(root=root, crop=crop, num_val=num_val, **kwargs)
        self.classes = classes

    @property
    def num_classes(self) -> dict[str, int]:
        """Class counts of the selected classification tasks; segmentation follows ``classes``."""
        counts = {**self.dataset_tasks, "segmentation": self.classes}
        return {t: n for t in self.tasks if (n := counts[t]) is not None}

    def dataset(self, split: str, transform: Transform) -> CityscapesDataset:
        return CityscapesDataset(
            self.root, split, self.tasks, transform, self.classes, self.num_val, self.split_seed
        )
