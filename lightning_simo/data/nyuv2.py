"""NYUv2 in MTAN's preprocessed ``.npy`` layout: 13-class segmentation, depth and normals.

The official split has 795 training and 654 test images. As in the SIMO paper, the 654 test
images are split by a seeded permutation (seed 42) into a labelled validation split (400 images,
used for model selection, alpha search and re-alignment) and the test split (the other 254).
Reading is :mod:`lightning_simo.data.mtan`; this module only configures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from lightning_simo.data._files import Transform, to_labels, to_scalar_map, to_vector_map
from lightning_simo.data.mtan import MTANDataModule, MTANDataset, MTANLayout, SplitRule, TaskReader

__all__ = ["NYUv2DataModule", "NYUv2Dataset"]

NUM_CLASSES = 13

LAYOUT = """\
<root>/
  train/                 795 images (the official training set)
    image/0.npy ...      H x W x 3 float in [0, 1]
    label/0.npy ...      H x W class ids 0..12, -1 = ignore (float or int)
    depth/0.npy ...      H x W (or H x W x 1) metres, 0 = invalid
    normal/0.npy ...     H x W x 3 unit vectors, all-zero = invalid
  val/                   654 images (the official test set), same four folders
"""

NYUV2 = MTANLayout(
    name="NYUv2",
    description=LAYOUT,
    readers={
        "segmentation": TaskReader("label", lambda a, p: to_labels(a, NUM_CLASSES, p)),
        "depth": TaskReader(
            "depth", lambda a, p: to_scalar_map(a, p, "depth map", invalid_zero=True)
        ),
        "normals": TaskReader("normal", lambda a, p: to_vector_map(a, p, "normal map")),
    },
    split_rule=SplitRule(whole=("train", "train"), divided="val", parts=("val", "test")),
)


class NYUv2Dataset(MTANDataset):
    """One split of NYUv2: ``"train"`` (``root/train``), or ``"val"`` / ``"test"``, the two
    seeded parts of ``root/val`` (``num_val`` images, a count or a fraction, form val;
    ``split_seed`` 42 reproduces the SIMO split). Other arguments as :class:`MTANDataset`."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] = tuple(NYUV2.readers),
        transform: Transform | None = None,
        num_val: int | float = 400,
        split_seed: int = 42,
    ) -> None:
        super().__init__(NYUV2, root, split, tasks, transform, num_val, split_seed)


class NYUv2DataModule(MTANDataModule):
    """NYUv2 (MTAN ``.npy``): 795 train / 400 val / 254 test images by default.

    Args:
        root: dataset folder (layout in ``lightning_simo.data.nyuv2.LAYOUT``, docs/datasets.md).
        crop: training crop ``(height, width)`` (the paper's 280 x 378).
        num_val: images of the official test set used as the val split (count or fraction).
        **kwargs: ``tasks``, ``scales``, ``hflip``, ``split_seed`` of
            :class:`~lightning_simo.data.mtan.MTANDataModule` and the loader settings of
            :class:`~lightning_simo.data.base.DenseDataModule`.
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "segmentation": NUM_CLASSES,
        "depth": None,
        "normals": None,
    }

    def __init__(
        self,
        root: str = "data/nyuv2",
        crop: tuple[int, int] | None = (280, 378),
        num_val: int | float = 400,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, crop=crop, num_val=num_val, **kwargs)

    def dataset(self, split: str, transform: Transform) -> NYUv2Dataset:
        return NYUv2Dataset(self.root, split, self.tasks, transform, self.num_val, self.split_seed)
