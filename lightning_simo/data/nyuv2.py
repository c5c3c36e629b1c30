"""NYUv2 in MTAN's preprocessed ``.npy`` layout: 13-class segmentation, depth and normals.

The official split has 795 training and 654 test images. As in the SIMO paper, the 654 test
images are split by a seeded permutation (seed 42) into a labelled validation split (400 images,
used for model selection, alpha search and re-alignment) and the test split (the other 254).
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
    to_vector_map,
)
from lightning_simo.data.base import SPLITS, DenseDataModule
from lightning_simo.data.transforms import build_transform

__all__ = ["NYUv2DataModule", "NYUv2Dataset"]

NUM_CLASSES = 13
TASK_FOLDERS = {"segmentation": "label", "depth": "depth", "normals": "normal"}

LAYOUT = """\
<root>/
  train/                 795 images (the official training set)
    image/0.npy ...      H x W x 3 float in [0, 1]
    label/0.npy ...      H x W class ids 0..12, -1 = ignore (float or int)
    depth/0.npy ...      H x W (or H x W x 1) metres, 0 = invalid
    normal/0.npy ...     H x W x 3 unit vectors, all-zero = invalid
  val/                   654 images (the official test set), same four folders
"""


class NYUv2Dataset(Dataset):
    """One split of NYUv2 as dicts of tensors (``"image"``, the selected tasks, ``"index"``).

    Args:
        root: the folder holding ``train/`` and ``val/`` (see ``LAYOUT``).
        split: ``"train"`` (``root/train``), or ``"val"`` / ``"test"``, the two seeded parts of
            ``root/val``.
        tasks: any of ``segmentation``, ``depth``, ``normals``; only their folders are read.
        transform: applied to the numpy sample (HWC) before conversion to tensors.
        num_val: images of ``root/val`` that form the val split (a count, or a fraction in
            (0, 1)); the rest form the test split.
        split_seed: seed of the val / test permutation (42 reproduces the SIMO split).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] = tuple(TASK_FOLDERS),
        transform: Transform | None = None,
        num_val: int | float = 400,
        split_seed: int = 42,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        unknown = [t for t in tasks if t not in TASK_FOLDERS]
        if unknown:
            raise ValueError(f"NYUv2 has no task {unknown[0]!r}; it carries {list(TASK_FOLDERS)}.")
        self.tasks = list(tasks)
        self.split = split
        self.transform = transform

        root = require_dir("NYUv2", Path(root), LAYOUT)
        base = root / ("train" if split == "train" else "val")
        images = list_files("NYUv2", base / "image", ".npy", LAYOUT)
        targets = {t: list_files("NYUv2", base / TASK_FOLDERS[t], ".npy", LAYOUT) for t in tasks}
        check_same_keys(
            "NYUv2",
            (base / "image", images),
            {base / TASK_FOLDERS[t]: files for t, files in targets.items()},
        )
        keys = sorted_keys(images)
        if split != "train":
            n_val = count_from(num_val, len(keys), "num_val")
            if n_val > len(keys):
                raise ValueError(
                    f"NYUv2: num_val={num_val} exceeds the {len(keys)} images in {str(base)!r}; "
                    f"choose num_val between 1 and {len(keys) - 1}."
                )
            val, test = seeded_split(len(keys), n_val, split_seed)
            chosen = val if split == "val" else test
            if not chosen:
                raise ValueError(
                    f"NYUv2: the {split!r} split is empty: num_val={num_val} of the {len(keys)} "
                    f"images in {str(base)!r}. Choose num_val between 1 and {len(keys) - 1}."
                )
            keys = [keys[i] for i in chosen]
        self.files = [{"image": images[k], **{t: targets[t][k] for t in tasks}} for k in keys]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        paths = self.files[index]
        sample = {"image": to_image(load_npy(paths["image"]), paths["image"])}
        for task in self.tasks:
            array = load_npy(paths[task])
            if task == "segmentation":
                sample[task] = to_labels(array, NUM_CLASSES, paths[task])
            elif task == "depth":
                sample[task] = to_scalar_map(array, paths[task], "depth map", invalid_zero=True)
            else:
                sample[task] = to_vector_map(array, paths[task], "normal map")
        check_same_size(sample, paths)
        return finish_sample(sample, self.transform, index, self.tasks)


class NYUv2DataModule(DenseDataModule):
    """NYUv2 (MTAN ``.npy``): 795 train / 400 val / 254 test images by default.

    Training augmentation follows the SIMO paper: a random scale in ``scales`` (labels nearest,
    depth divided by the scale), a random ``crop`` and a horizontal flip (normal x negated).
    Evaluation uses the full, un-augmented image.

    Args:
        root: dataset folder (layout in ``lightning_simo.data.nyuv2.LAYOUT``, docs/datasets.md).
        tasks: subset of ``segmentation``, ``depth``, ``normals``; ``None`` means all three.
        crop: training crop ``(height, width)``; ``None`` trains on whole (rescaled) images.
        scales: random rescaling factors for training.
        hflip: random horizontal flips for training.
        num_val: images of the official test set used as the val split (count or fraction).
        split_seed: seed of the val / test split of the official test set.
        **kwargs: the loader, budget and seed settings of
            :class:`~lightning_simo.data.base.DenseDataModule` (``batch_size``,
            ``num_workers``, ``train_budget``, ``train_split``, ...).
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "segmentation": NUM_CLASSES,
        "depth": None,
        "normals": None,
    }

    def __init__(
        self,
        root: str = "data/nyuv2",
        tasks: list[str] | None = None,
        crop: tuple[int, int] | None = (280, 378),
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        hflip: bool = True,
        num_val: int | float = 400,
        split_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        self.root = root
        self.crop = tuple(crop) if crop is not None else None
        self.scales = tuple(scales)
        self.hflip = hflip
        self.num_val = num_val
        self.split_seed = split_seed

    def make_dataset(self, split: str, train: bool) -> NYUv2Dataset:
        if train:
            transform = build_transform(True, crop=self.crop, scales=self.scales, hflip=self.hflip)
        else:
            transform = build_transform(False)
        return NYUv2Dataset(self.root, split, self.tasks, transform, self.num_val, self.split_seed)
