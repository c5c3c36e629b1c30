"""A Taskonomy subset as in the SIMO paper: 16 buildings, 256 x 256, up to six dense tasks.

Taskonomy stores one PNG per view and domain: ``root/<domain>/<building>/<view>_domain_<domain>.png``
(for example ``point_0_view_0_domain_rgb.png`` and ``point_0_view_0_domain_depth_zbuffer.png``).
Files are matched across domains by the part of the name before ``_domain_``. Splits are by
building (no building is in two splits); each building contributes at most a fixed number of views,
chosen by a seeded permutation, so the subset is reproducible.

Target encodings (all returned ``float32`` ``C x H x W`` unless a segmentation):

- ``depth``: z-buffer depth ``d`` (16-bit, 1/512 m) as ``log1p(d) / log(2**16)`` in [0, 1];
  pixels where ``mask_valid`` is 0 are set to 0 (the registry's "invalid").
- ``normals``: the 8-bit RGB encoding in [0, 1] mapped to [-1, 1].
- ``keypoints2d``: 16-bit values clipped to [0, 3129], scaled to [-1, 1].
- ``edge_texture``: 16-bit values clipped to [0, 11041], scaled to [-1, 1].
- ``segmentation``: 18 classes, the ``segment_semantic`` values 0..17 with value 0 (unlabelled)
  mapped to -1 = ignore, as the usual Taskonomy multi-task code ignores it (so class 0 never
  occurs as a target; outputs keep 18 channels). Other values are reported as errors.
- ``autoencoder``: the (augmented) input image mapped to [-1, 1], the same range as the other
  regression targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from lightning_simo.data._files import (
    Transform,
    check_same_keys,
    check_same_size,
    finish_sample,
    list_files,
    read_png,
    require_dir,
    seeded_split,
    sorted_keys,
    to_image,
    to_labels,
)
from lightning_simo.data.base import DenseDataModule
from lightning_simo.data.transforms import build_transform

__all__ = [
    "DEFAULT_TASKS",
    "TEST_BUILDINGS",
    "TRAIN_BUILDINGS",
    "TaskonomyDataModule",
    "TaskonomyDataset",
    "VAL_BUILDINGS",
]

TRAIN_BUILDINGS = (
    "allensville",
    "coffeen",
    "collierville",
    "leonardo",
    "merom",
    "pinesdale",
    "ranchester",
    "stockman",
)
VAL_BUILDINGS = ("beechwood", "corozal", "klickitat", "shelbyville")
TEST_BUILDINGS = ("ihlen", "mcdade", "onaga", "tolstoy")

NUM_CLASSES = 18
KEYPOINTS_MAX = 3129.0
EDGE_TEXTURE_MAX = 11041.0
DEPTH_SCALE = math.log(2**16)

# Domain folders read for each task; ``autoencoder`` needs nothing beyond ``rgb``.
TASK_FOLDERS: dict[str, tuple[str, ...]] = {
    "autoencoder": (),
    "depth": ("depth_zbuffer", "mask_valid"),
    "normals": ("normal",),
    "keypoints2d": ("keypoints2d",),
    "edge_texture": ("edge_texture",),
    "segmentation": ("segment_semantic",),
}
DEFAULT_TASKS = ("autoencoder", "depth", "normals", "keypoints2d", "edge_texture")
"""The SIMO paper's five Taskonomy tasks (the authors' code swaps autoencoder for segmentation)."""

LAYOUT = """\
<root>/
  rgb/<building>/point_0_view_0_domain_rgb.png ...      8-bit RGB
  depth_zbuffer/<building>/..._domain_depth_zbuffer.png  16-bit, 1/512 m
  mask_valid/<building>/..._domain_mask_valid.png        8-bit, 0 = invalid depth
  normal/<building>/..._domain_normal.png                8-bit RGB
  keypoints2d/<building>/..._domain_keypoints2d.png      16-bit
  edge_texture/<building>/..._domain_edge_texture.png    16-bit
  segment_semantic/<building>/..._domain_segment_semantic.png   8-bit, 0..17
buildings: train allensville coffeen collierville leonardo merom pinesdale ranchester stockman;
val beechwood corozal klickitat shelbyville; test ihlen mcdade onaga tolstoy
(only the folders of the selected tasks are needed; depth also needs mask_valid)
"""


def view_key(stem: str) -> str:
    """The view name shared by all domains: the file stem up to ``_domain_``."""
    head, sep, _ = stem.partition("_domain_")
    return head if sep else stem


def _resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    out = cv2.resize(array, (size, size), interpolation=interpolation)
    return out[..., None] if array.ndim == 3 and out.ndim == 2 else out


def _gray(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """A single-channel map; 3-channel PNGs of a gray map keep their first channel."""
    if array.ndim == 3:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{str(path)!r}: a {what} must be a gray image, got shape {array.shape}.")
    return array


def _signed(array: np.ndarray, high: float) -> np.ndarray:
    """Clip to [0, high] and scale linearly to [-1, 1]."""
    return (np.clip(array.astype(np.float32), 0.0, high) / high * 2.0 - 1.0).astype(np.float32)


class TaskonomyDataset(Dataset):
    """Taskonomy views of some buildings as dicts of tensors (image, tasks, ``"index"``).

    Args:
        root: the folder holding ``rgb/`` and one folder per domain (see ``LAYOUT``).
        buildings: buildings to read, in order.
        tasks: any of ``autoencoder``, ``depth``, ``normals``, ``keypoints2d``, ``edge_texture``,
            ``segmentation``; only their folders are read.
        transform: applied to the numpy sample (HWC) before conversion to tensors.
        per_building: at most this many views per building, chosen by a seeded permutation
            (``None``: all views).
        image_size: resize every map to ``image_size x image_size`` (``None``: keep the stored
            size). Images and regression maps use area interpolation; labels, depth, its mask
            and normals nearest, so no invalid pixel leaks into a valid one and normals keep
            their stored encoding.
        seed: seed of the per-building view selection.
    """

    def __init__(
        self,
        root: str | Path,
        buildings: Sequence[str],
        tasks: Sequence[str] = DEFAULT_TASKS,
        transform: Transform | None = None,
        per_building: int | None = None,
        image_size: int | None = 256,
        seed: int = 42,
    ) -> None:
        unknown = [t for t in tasks if t not in TASK_FOLDERS]
        if unknown:
            raise ValueError(
                f"Taskonomy has no task {unknown[0]!r}; it carries {list(TASK_FOLDERS)}."
            )
        if not buildings:
            raise ValueError("Taskonomy: no building given; name at least one.")
        if per_building is not None and per_building < 1:
            raise ValueError(f"per_building must be >= 1 or None, got {per_building}.")
        self.tasks = list(tasks)
        self.transform = transform
        self.image_size = image_size
        self.buildings = list(buildings)

        root = require_dir("Taskonomy", Path(root), LAYOUT)
        folders = [f for t in self.tasks for f in TASK_FOLDERS[t]]
        self.files: list[dict[str, Path]] = []
        for building in self.buildings:
            rgb_dir = root / "rgb" / building
            rgb = list_files("Taskonomy", rgb_dir, ".png", LAYOUT, key=view_key)
            domains = {
                f: list_files("Taskonomy", root / f / building, ".png", LAYOUT, key=view_key)
                for f in folders
            }
            check_same_keys(
                "Taskonomy", (rgb_dir, rgb), {root / f / building: d for f, d in domains.items()}
            )
            keys = sorted_keys(rgb)
            if per_building is not None and per_building < len(keys):
                chosen, _ = seeded_split(len(keys), per_building, seed)
                keys = [keys[i] for i in chosen]
            for k in keys:
                self.files.append({"image": rgb[k], **{f: d[k] for f, d in domains.items()}})

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, paths: dict[str, Path], folder: str, nearest: bool) -> np.ndarray:
        array = read_png(paths[folder])
        return array if self.image_size is None else _resize(array, self.image_size, nearest)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        paths = self.files[index]
        image = to_image(self._read(paths, "image", nearest=False), paths["image"])
        sample = {"image": image}
        named = {"image": paths["image"]}
        for task in self.tasks:
            if task in _CONVERTERS:
                folder = TASK_FOLDERS[task][0]
                named[task] = paths[folder]
                sample[task] = _CONVERTERS[task](self, paths, folder)
        check_same_size(sample, named)
        out = finish_sample(sample, self.transform, index, self.tasks)
        for task in self.tasks:
            if task in _FROM_IMAGE:  # derived from the transformed image, so it always aligns
                out[task] = _FROM_IMAGE[task](out["image"])
        return out


Converter = Callable[[TaskonomyDataset, Mapping[str, Path], str], np.ndarray]


def _depth(dataset: TaskonomyDataset, paths: Mapping[str, Path], folder: str) -> np.ndarray:
    raw = _gray(dataset._read(paths, folder, nearest=True), paths[folder], "depth map")
    mask = _gray(dataset._read(paths, "mask_valid", nearest=True), paths["mask_valid"], "mask")
    if mask.shape != raw.shape:
        raise ValueError(
            f"{str(paths['mask_valid'])!r} is {mask.shape} but its depth map "
            f"{str(paths[folder])!r} is {raw.shape}."
        )
    depth = np.log1p(raw.astype(np.float32)) / DEPTH_SCALE
    return np.where(mask > 0, depth, 0.0).astype(np.float32)


def _normals(dataset: TaskonomyDataset, paths: Mapping[str, Path], folder: str) -> np.ndarray:
    encoded = dataset._read(paths, folder, nearest=True)
    if encoded.dtype != np.uint8:
        raise ValueError(
            f"{str(paths[folder])!r}: normals must be an 8-bit RGB PNG, got {encoded.dtype}."
        )
    return to_image(encoded, paths[folder]) * 2.0 - 1.0


def _signed_map(what: str, high: float) -> Converter:
    def convert(dataset: TaskonomyDataset, paths: Mapping[str, Path], folder: str) -> np.ndarray:
        raw = _gray(dataset._read(paths, folder, nearest=False), paths[folder], what)
        return _signed(raw, high)

    return convert


def _segmentation(dataset: TaskonomyDataset, paths: Mapping[str, Path], folder: str) -> np.ndarray:
    raw = _gray(dataset._read(paths, folder, nearest=True), paths[folder], "label map")
    labels = raw.astype(np.int64)
    labels[labels == 0] = -1
    return to_labels(labels, NUM_CLASSES, paths[folder])


_CONVERTERS: dict[str, Converter] = {
    "depth": _depth,
    "normals": _normals,
    "keypoints2d": _signed_map("keypoint map", KEYPOINTS_MAX),
    "edge_texture": _signed_map("edge map", EDGE_TEXTURE_MAX),
    "segmentation": _segmentation,
}
"""How each stored task is read (Taskonomy's storage conventions, one function per task)."""
_FROM_IMAGE: dict[str, Callable[[Tensor], Tensor]] = {"autoencoder": lambda image: image * 2 - 1}
"""Tasks computed from the transformed image instead of read from disk."""


class TaskonomyDataModule(DenseDataModule):
    """The SIMO Taskonomy subset: 8 / 4 / 4 buildings, 2000 / 1000 / 1000 views per building.

    The paper describes no augmentation for Taskonomy, so training uses none by default; ``crop``,
    ``scales`` and ``hflip`` turn the shared pipeline on.

    Args:
        root: dataset folder (layout in ``lightning_simo.data.taskonomy.LAYOUT``).
        tasks: subset of ``autoencoder``, ``depth``, ``normals``, ``keypoints2d``,
            ``edge_texture``, ``segmentation``; ``None`` = the paper's five (no segmentation).
        train_buildings: buildings of the train split.
        val_buildings: buildings of the val split.
        test_buildings: buildings of the test split.
        train_per_building: views per train building (``None``: all).
        eval_per_building: views per val / test building (``None``: all).
        image_size: side of the square maps (``None``: keep the stored size).
        crop: training crop ``(height, width)``; ``None`` = whole image.
        scales: random rescaling factors for training.
        hflip: random horizontal flips for training.
        split_seed: seed of the per-building view selection.
        **kwargs: the loader, budget and seed settings of
            :class:`~lightning_simo.data.base.DenseDataModule` (``batch_size``,
            ``num_workers``, ``train_budget``, ``train_split``, ...).
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "autoencoder": None,
        "depth": None,
        "normals": None,
        "keypoints2d": None,
        "edge_texture": None,
        "segmentation": NUM_CLASSES,
    }

    def __init__(
        self,
        root: str = "data/taskonomy",
        tasks: list[str] | None = None,
        train_buildings: Sequence[str] = TRAIN_BUILDINGS,
        val_buildings: Sequence[str] = VAL_BUILDINGS,
        test_buildings: Sequence[str] = TEST_BUILDINGS,
        train_per_building: int | None = 2000,
        eval_per_building: int | None = 1000,
        image_size: int | None = 256,
        crop: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0,),
        hflip: bool = False,
        split_seed: int = 42,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_size", 32)
        super().__init__(tasks=list(DEFAULT_TASKS) if tasks is None else tasks, **kwargs)
        self.root = root
        self.buildings = {
            "train": list(train_buildings),
            "val": list(val_buildings),
            "test": list(test_buildings),
        }
        shared = set(train_buildings) & (set(val_buildings) | set(test_buildings))
        shared |= set(val_buildings) & set(test_buildings)
        if shared:
            raise ValueError(
                f"Taskonomy buildings {sorted(shared)} are in two splits; splits are by building."
            )
        self.train_per_building = train_per_building
        self.eval_per_building = eval_per_building
        self.image_size = image_size
        self.crop = tuple(crop) if crop is not None else None
        self.scales = tuple(scales)
        self.hflip = hflip
        self.split_seed = split_seed

    def make_dataset(self, split: str, train: bool) -> TaskonomyDataset:
        if train:
            transform = build_transform(True, crop=self.crop, scales=self.scales, hflip=self.hflip)
        else:
            transform = build_transform(False)
        cap = self.train_per_building if split == "train" else self.eval_per_building
        return TaskonomyDataset(
            self.root,
            self.buildings[split],
            self.tasks,
            transform,
            per_building=cap,
            image_size=self.image_size,
            seed=self.split_seed,
        )
