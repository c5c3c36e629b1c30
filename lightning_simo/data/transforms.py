"""Augmentation pipelines that move every dense target with the image and keep its physics right.

Geometry (resize, pad, crop, flip) is done by albumentations, with every dense map registered as a
``"mask"`` target so it gets the same crop window and flip as the image and nearest-neighbour
resampling (class ids stay integers, unit normals stay unit, invalid zeros never blend into valid
values). What geometry alone gets wrong is fixed inside the transforms that cause it, reading each
target's :class:`~lightning_simo.tasks.TargetGeometry` from the task registry (so a newly
registered task is moved correctly with no edit here):

- zooming in by ``s`` looks like the camera moved ``s`` times closer, so values are multiplied by
  ``s ** zoom_exponent``: depth divided by ``s``, disparity (inverse depth) multiplied
  (:class:`RandomRescale`);
- a horizontal mirror turns a surface facing right into one facing left, so ``mirror_x`` targets
  (normals) change the sign of their x component (:class:`HorizontalFlipNormals`).

Padding must produce *invalid* values: 0 for depth / normals / disparity / edges and -1 for
labels. albumentations pads every mask with one fill value, so label maps travel through the
pipeline as ``float32(label + 1)``: 0 is then "ignore" for every target and a single fill of 0 is
right for all of them; :class:`DensePipeline` shifts labels back to ``int64`` with -1 = ignore.

Taskonomy's ``"keypoints2d"`` and ``"edge_texture"`` are continuous maps in [-1, 1]; they are
resampled with nearest neighbour like every other target. Bilinear would be slightly smoother, but
one interpolation for all targets keeps every output value a copy of an input value, and the
zoom factors are small. Their pad value 0 is a valid mid-range value, not a marker: pad only
happens when the crop is larger than the (rescaled) image, which the paper's recipes never do.

Samples are numpy dicts in HWC layout: ``"image"`` HxWx3 float32 in [0, 1], label tasks
(``"segmentation"``, ...) HxW int, single-channel float tasks (``"depth"``, ``"edges"``, ...) HxW
float32, multi-channel ones (``"normals"``) HxWxC float32. Any subset of the registered task keys
(:func:`dense_keys`) may be present, plus the non-spatial ``METADATA_KEYS`` (passed through
untouched). Any other key is an error: a map the pipeline does not know would keep its old
geometry while the image is cropped and flipped, silently misaligning image and target.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as fgeometric
from torch.utils.data import get_worker_info

from lightning_simo.tasks import TargetGeometry, available_tasks, task_geometry

__all__ = [
    "DensePipeline",
    "HorizontalFlipNormals",
    "METADATA_KEYS",
    "RandomRescale",
    "augmentation_seed",
    "build_transform",
    "dense_keys",
    "label_keys",
    "to_tensor_sample",
]

METADATA_KEYS = ("index",)
"""Non-spatial entries that may ride along with a sample and are returned unchanged."""


def dense_keys() -> list[str]:
    """Every dense target the pipelines move (the registered tasks), each as an albumentations
    mask; read at call time so tasks registered later are included."""
    return available_tasks()


def label_keys() -> list[str]:
    """Integer class maps (-1 = ignore)."""
    return [key for key in available_tasks() if task_geometry(key).label]


def _geometries(sample: Mapping[str, Any]) -> dict[str, TargetGeometry]:
    """The geometry of each registered task present (and not ``None``) in ``sample``."""
    known = set(available_tasks())
    return {k: task_geometry(k) for k, v in sample.items() if k in known and v is not None}


class RandomRescale(A.DualTransform):
    """Resize by a factor drawn uniformly from a fixed set, correcting depth-like values.

    The SIMO / MTAN recipe zooms by one of a few factors ({1, 1.2, 1.5} on NYUv2) rather than a
    continuous range, which is why ``A.RandomScale`` does not fit. Images are resized bilinearly,
    masks with nearest neighbour. After resampling, each task's values are multiplied by
    ``factor ** zoom_exponent`` of its registered geometry: depth divided, disparity multiplied
    (0 = invalid stays 0).

    Args:
        scales: the factors to choose from (each > 0).
        p: probability of applying the transform.
    """

    def __init__(self, scales: Sequence[float] = (1.0, 1.2, 1.5), p: float = 1.0) -> None:
        super().__init__(p=p)
        scales = tuple(float(s) for s in scales)
        if not scales or min(scales) <= 0:
            raise ValueError(
                f"scales must be a non-empty sequence of positive factors, got {scales}."
            )
        self.scales = scales

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.scales[self.py_random.randrange(len(self.scales))]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        return {"scale": scale, "size": size}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(img, size, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(mask, size, cv2.INTER_NEAREST)

    def apply_with_params(
        self, params: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        # apply_to_mask cannot tell depth from labels; the value correction needs the key.
        out = super().apply_with_params(params, *args, **kwargs)
        factor = np.float32(params["scale"])
        for key, geometry in _geometries(out).items():
            power = geometry.zoom_exponent
            if power > 0:
                out[key] = out[key] * factor**power
            elif power < 0:
                out[key] = out[key] / factor**-power
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales",)


class HorizontalFlipNormals(A.HorizontalFlip):
    """``A.HorizontalFlip`` that also negates the x component of camera-frame vectors.

    Mirroring the image mirrors the scene about the camera's y-z plane, which flips the sign of
    every normal's x component (tasks registered with ``mirror_x``); the maps themselves are
    mirrored by the parent class. All-zero (invalid) normals stay exactly ``+0`` so validity
    masks are unchanged.

    Args:
        p: probability of flipping.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)

    def apply_with_params(
        self, params: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        out = super().apply_with_params(params, *args, **kwargs)
        for key, geometry in _geometries(out).items():
            if geometry.mirror_x:
                vectors = out[key].copy()
                x = (..., 0) if vectors.ndim == 3 else ...  # a single-channel map is all x
                # adding +0.0 turns the -0.0 of negated invalid pixels back into +0.0
                vectors[x] = -vectors[x] + 0.0
                out[key] = vectors
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


_SAMPLE_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "lightning_simo_sample_seed", default=None
)


@contextlib.contextmanager
def augmentation_seed(seed: int) -> Iterator[None]:
    """Inside, every :class:`DensePipeline` draws the augmentation of the sample being read from
    ``seed`` alone, not from its running stream: the training loader sends one seed per sample
    and epoch (:mod:`lightning_simo.data.sampling`), so a resumed run augments as the
    interrupted one would have, whichever worker reads the sample."""
    token = _SAMPLE_SEED.set(int(seed))
    try:
        yield
    finally:
        _SAMPLE_SEED.reset(token)


class DensePipeline:
    """Callable ``sample -> sample`` that runs an albumentations pipeline on a dense sample.

    Builds one ``A.Compose`` per output size (the crop size, or each input size when
    ``crop=None``), encodes label maps for padding (see the module docstring) and decodes them
    afterwards. Inside a ``DataLoader`` worker the random state is re-seeded from the worker's
    torch seed: albumentations generators are otherwise copied into every forked worker, so all
    workers (and, without persistent workers, all epochs) would draw the same augmentations.
    Inside :func:`augmentation_seed` (the training loaders) each sample is drawn from its own seed
    instead.

    Args:
        train: random rescale, random crop and flip when ``True``; a deterministic centre
            crop / pad (or nothing) when ``False``.
        crop: output ``(height, width)``; ``None`` keeps each sample's size.
        scales: zoom factors for :class:`RandomRescale` (training only).
        hflip: flip horizontally with p = 0.5 (training only).
        seed: seed of the augmentation stream (``None``: torch's seed, ``torch.initial_seed()``,
            so ``seed_everything`` makes augmentation reproducible).
    """

    def __init__(
        self,
        train: bool,
        crop: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0,),
        hflip: bool = True,
        seed: int | None = None,
    ) -> None:
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"crop must be (height, width) with positive sizes, got {crop}.")
        self.train = train
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive factors, got {scales}.")
        self.hflip = hflip
        self._rng = np.random.default_rng(torch.initial_seed() if seed is None else seed)
        self._pipelines: dict[tuple[int, int], A.Compose] = {}
        self._worker_seed: int | None = None

    # ------------------------------------------------------------------ building
    def _compose(self, size: tuple[int, int]) -> A.Compose:
        height, width = size
        pad = A.PadIfNeeded(
            min_height=height,
            min_width=width,
            position="center",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
        )
        steps: list[A.BasicTransform] = []
        if self.train:
            if self.scales != (1.0,):
                steps.append(RandomRescale(self.scales))
            steps += [pad, A.RandomCrop(height=height, width=width)]
            if self.hflip:
                steps.append(HorizontalFlipNormals(p=0.5))
        else:
            steps += [pad, A.CenterCrop(height=height, width=width)]
        compose = A.Compose(steps, additional_targets={k: "mask" for k in dense_keys()})
        self._reseed(compose)
        return compose

    def _reseed(self, compose: A.Compose) -> None:
        # one shared generator for all steps: per-step generators seeded alike would correlate
        # e.g. the crop position with the flip decision.
        seed = int(self._rng.integers(2**63))
        compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def _sync_worker(self) -> None:
        info = get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        self._worker_seed = info.seed
        self._rng = np.random.default_rng(info.seed)
        for compose in self._pipelines.values():
            self._reseed(compose)

    def _pipeline(self, size: tuple[int, int]) -> A.Compose:
        self._sync_worker()
        if size not in self._pipelines:
            self._pipelines[size] = self._compose(size)
        compose = self._pipelines[size]
        seed = _SAMPLE_SEED.get()
        if seed is not None:
            compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return compose

    # ------------------------------------------------------------------ running
    @staticmethod
    def check_keys(sample: Mapping[str, Any]) -> None:
        """Refuse keys the pipeline would not move with the image (see the module docstring)."""
        if "image" not in sample:
            raise ValueError("A dense sample needs an 'image' entry.")
        dense = dense_keys()
        known = {"image", *dense, *METADATA_KEYS}
        unknown = sorted(k for k in sample if k not in known)
        if unknown:
            raise ValueError(
                f"The augmentation pipeline does not know the sample key(s) {unknown}, so it "
                f"cannot keep them aligned with the image. Known dense targets: "
                f"{', '.join(dense)}; metadata: {', '.join(METADATA_KEYS)}. Register the task "
                "(lightning_simo.tasks.register_task) or drop the key before the transform."
            )

    def __call__(self, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_keys(sample)
        if not self.train and self.crop is None:
            return dict(sample)
        image = sample["image"]
        size = self.crop or (int(image.shape[0]), int(image.shape[1]))
        data: dict[str, np.ndarray] = {"image": np.ascontiguousarray(image, dtype=np.float32)}
        passthrough: dict[str, np.ndarray] = {}
        geometries = _geometries(sample)
        for key, value in sample.items():
            if key == "image":
                continue
            if key not in geometries:  # METADATA_KEYS (check_keys refused everything else)
                passthrough[key] = value
            elif geometries[key].label:
                data[key] = np.asarray(value).astype(np.float32) + 1.0
            else:
                data[key] = np.ascontiguousarray(value, dtype=np.float32)
        out = self._pipeline(size)(**data)
        result: dict[str, np.ndarray] = {"image": out["image"]}
        for key in data:
            if key == "image":
                continue
            if geometries[key].label:
                result[key] = np.rint(out[key]).astype(np.int64) - 1
            else:
                result[key] = out[key]
        result.update(passthrough)
        return result


def build_transform(
    train: bool,
    crop: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    hflip: bool = True,
    seed: int | None = None,
) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The augmentation for a split: random rescale + crop + flip for training, else centre crop.

    ``train=False`` with ``crop=None`` returns the sample unchanged (a shallow copy).
    """
    return DensePipeline(train=train, crop=crop, scales=scales, hflip=hflip, seed=seed)


def to_tensor_sample(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Numpy HWC sample -> tensors in the conventions of :mod:`lightning_simo.tasks`.

    ``image`` and multi-channel task maps (HxWxC) become CxHxW float32, single-channel ones (HxW)
    1xHxW float32; label maps become int64 HxW (-1 kept); anything else (e.g. ``"index"``)
    becomes a tensor as is.
    """
    geometries = _geometries(sample)
    out: dict[str, torch.Tensor] = {}
    for key, value in sample.items():
        if key in geometries and geometries[key].label:
            out[key] = torch.from_numpy(np.ascontiguousarray(np.asarray(value), dtype=np.int64))
        elif key in geometries or key == "image":
            arr = np.asarray(value, dtype=np.float32)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            out[key] = torch.from_numpy(np.ascontiguousarray(arr))
        else:
            out[key] = torch.as_tensor(value)
    return out
