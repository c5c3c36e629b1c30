"""The synthetic dataset: procedurally rendered rooms as a torch Dataset and a DataModule.

The scenes come from :mod:`lightning_simo.data.render` (pure numpy); this module caches them,
applies the augmentation pipeline and serves tensors. The renderer's public names are re-exported
here so that ``lightning_simo.data.synthetic`` stays the one import for synthetic data.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_simo.data.base import DenseDataModule
from lightning_simo.data.render import (
    NUM_CLASSES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_TASKS,
    camera_intrinsics,
    render_scene,
    render_scenes,
    scene_rng,
    split_stream,
    write_nyuv2_layout,
)
from lightning_simo.data.transforms import build_transform, to_tensor_sample

__all__ = [
    "NUM_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_TASKS",
    "SyntheticDataModule",
    "SyntheticScenes",
    "camera_intrinsics",
    "render_scene",
    "render_scenes",
    "split_stream",
    "write_nyuv2_layout",
]


# ----------------------------------------------------------------------------- torch dataset
_STORE_DTYPES = {
    # float16 halves memory for the big arrays; its 11-bit mantissa is finer than an 8-bit
    # camera and than 0.05 degrees of normal direction. Depth stays float32 (metric error).
    "image": np.float16,
    "normals": np.float16,
    "depth": np.float32,
    "segmentation": np.int8,
    "edges": np.uint8,
}
_LOAD_DTYPES = {
    "image": np.float32,
    "normals": np.float32,
    "depth": np.float32,
    "segmentation": np.int64,
    "edges": np.float32,
}


class SyntheticScenes(Dataset):
    """Synthetic scenes as a map-style dataset of tensor samples.

    With ``cache=True`` all ``n`` scenes are rendered once in ``__init__`` and kept in compact
    arrays (only the requested tasks); with ``cache=False`` each item is rendered on access,
    which costs no memory and gives the same values (scenes depend only on their index).

    Args:
        n: number of scenes.
        tasks: targets to return (a subset of :data:`SYNTHETIC_TASKS`; may be empty for
            image-only use such as encoder pretraining).
        height, width: image size.
        seed, stream: random stream (see :func:`render_scenes`).
        transform: applied to the numpy HWC sample before conversion to tensors.
        cache: render everything up front.
    """

    def __init__(
        self,
        n: int,
        tasks: Sequence[str],
        height: int = 64,
        width: int = 80,
        seed: int = 0,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        cache: bool = True,
        stream: int = 0,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown:
            raise ValueError(
                f"Synthetic scenes do not carry {unknown}; they carry {list(SYNTHETIC_TASKS)}."
            )
        self.n = n
        self.tasks = tuple(tasks)
        self.height = height
        self.width = width
        self.seed = seed
        self.stream = stream
        self.transform = transform
        self.arrays: dict[str, np.ndarray] | None = None
        if cache:
            self.arrays = self._render_all()

    @property
    def fields(self) -> tuple[str, ...]:
        return ("image", *self.tasks)

    def _render(self, index: int) -> dict[str, np.ndarray]:
        return render_scene(scene_rng(self.seed, self.stream, index), self.height, self.width)

    def _render_all(self) -> dict[str, np.ndarray]:
        if self.n == 0:
            return {}
        rendered = _rendered(self.n, self.height, self.width, self.seed, self.stream)
        return {key: rendered[key] for key in self.fields}

    def with_transform(
        self, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None
    ) -> SyntheticScenes:
        """A view sharing the rendered arrays with another transform (no re-rendering)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """The untransformed numpy sample (HWC) of scene ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"Index {index} out of range for {self.n} scenes.")
        if self.arrays is None:
            scene = self._render(index)
            return {k: scene[k] for k in self.fields}
        return {k: self.arrays[k][index].astype(_LOAD_DTYPES[k]) for k in self.fields}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.sample(int(index))
        if self.transform is not None:
            sample = self.transform(sample)
        out = to_tensor_sample(sample)
        out["index"] = torch.tensor(int(index), dtype=torch.int64)
        return out


# ----------------------------------------------------------------------------- rendered scenes
_RENDERED: OrderedDict[tuple[int, int, int, int], dict[str, np.ndarray]] = OrderedDict()
_RENDERED_KEEP = 4
"""Streams kept rendered in this process. Every stage of a study runs in one process and reads
the same splits (train, val, test, pretrain), so each is rendered once, not once per stage and
seed; a scene depends only on ``(seed, stream, index)``, so a kept rendering of ``n`` scenes also
serves any smaller ``n``. The arrays are shared: nothing writes into them (samples are copies)."""


def _rendered(n: int, height: int, width: int, seed: int, stream: int) -> dict[str, np.ndarray]:
    """Scenes ``0 .. n-1`` of ``(seed, stream)``, every field, in the compact store dtypes."""
    key = (height, width, seed, stream)
    kept = _RENDERED.get(key)
    if kept is not None and len(kept["image"]) >= n:
        _RENDERED.move_to_end(key)
        return {k: v[:n] for k, v in kept.items()}
    arrays: dict[str, np.ndarray] = {}
    for i in range(n):
        scene = render_scene(scene_rng(seed, stream, i), height, width)
        for field_name in ("image", *SYNTHETIC_TASKS):
            if field_name not in arrays:
                shape = (n, *scene[field_name].shape)
                arrays[field_name] = np.empty(shape, _STORE_DTYPES[field_name])
            arrays[field_name][i] = scene[field_name]
    _RENDERED[key] = arrays
    while len(_RENDERED) > _RENDERED_KEEP:
        _RENDERED.popitem(last=False)
    return arrays


# ----------------------------------------------------------------------------- datamodule
class SyntheticDataModule(DenseDataModule):
    """The embedded default: procedural rooms with segmentation, depth, normals and edges.

    Splits (and the optional ``pretrain`` split of images for encoder pretraining) come from
    separate random streams of ``seed``, so they never share a scene. Each split is rendered once
    per datamodule and reused; training augmentation (random rescale from ``scales``, random crop
    back to ``height x width``, horizontal flip) is a view on the same arrays.

    Args:
        tasks: tasks to load (default: all four).
        num_train, num_val, num_test: split sizes.
        num_pretrain: size of the ``pretrain`` split (0: none).
        height, width: image size.
        augment: augment the training split.
        scales: zoom factors for training augmentation.
        hflip: random horizontal flips for training augmentation.
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, train_budget,
            train_split, seed: see :class:`~lightning_simo.data.base.DenseDataModule`.
    """

    dataset_tasks: ClassVar[dict[str, int | None]] = {
        "segmentation": NUM_CLASSES,
        "depth": None,
        "normals": None,
        "edges": None,
    }

    def __init__(
        self,
        tasks: list[str] | None = None,
        num_train: int = 3000,
        num_val: int = 500,
        num_test: int = 500,
        num_pretrain: int = 0,
        height: int = 64,
        width: int = 80,
        augment: bool = True,
        scales: Sequence[float] = (1.0, 1.2),
        hflip: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        sizes = {"train": num_train, "val": num_val, "test": num_test, "pretrain": num_pretrain}
        for split, count in sizes.items():
            if count < 0 or (count == 0 and split != "pretrain"):
                raise ValueError(f"num_{split} must be >= 1, got {count}.")
        if height < 8 or width < 8:
            raise ValueError(f"height and width must be >= 8, got {height}x{width}.")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive zoom factors, got {scales}.")
        self.split_sizes = sizes
        self.height = height
        self.width = width
        self.augment = augment
        self.scales = tuple(float(s) for s in scales)
        self.hflip = hflip
        self._scenes: dict[str, SyntheticScenes] = {}

    def scenes(self, split: str) -> SyntheticScenes:
        """The rendered, un-augmented scenes of ``split`` (rendered on first use)."""
        if split not in self.split_sizes:
            raise ValueError(f"Unknown split {split!r}; choose one of {list(self.split_sizes)}.")
        if self.split_sizes[split] == 0:
            raise ValueError(f"The {split!r} split is empty; set num_{split} >= 1.")
        if split not in self._scenes:
            tasks = () if split == "pretrain" else self.tasks
            self._scenes[split] = SyntheticScenes(
                self.split_sizes[split],
                tasks,
                height=self.height,
                width=self.width,
                seed=self.seed,
                stream=split_stream(split),
            )
        return self._scenes[split]

    def make_dataset(self, split: str, train: bool) -> Dataset:
        scenes = self.scenes(split)
        if train and self.augment:
            transform = build_transform(
                train=True, crop=(self.height, self.width), scales=self.scales, hflip=self.hflip
            )
            return scenes.with_transform(transform)
        return scenes
