"""NYUv2 from the official labelled ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, read with h5py).

Writes ``train/`` (the 795 training images of the official ``splits.mat``) and ``val/`` (its 654
test images; the loader splits them into val and test) with ``image/``, ``label/`` (13 classes,
-1 = unlabelled), ``depth/`` (metres, 0 = invalid) and ``normal/`` (camera-frame unit vectors, all
zero = invalid), resized to MTAN's 288 x 384 by default.

- 13 classes: NYU's 894 raw ids -> NYU-40 (Gupta et al. 2013) -> NYU-13 (Couprie et al. 2013),
  the table shipped in ``nyuv2_classes.json`` (its sources are named inside).
- Normals: from ``--normals DIR`` (one ``<k>.npy`` H x W x 3 in [-1, 1], or ``<k>.png`` RGB
  coding (n + 1) / 2, per labelled image ``k`` counted from 0), else computed from the depth
  with the Kinect RGB intrinsics of the NYU toolbox (``camera_params.m``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "INTRINSICS",
    "NYUv2Source",
    "add_arguments",
    "label_table",
    "normals_from_depth",
    "open_source",
]

INTRINSICS = {"fx": 518.8579, "fy": 519.4696, "cx": 325.5824, "cy": 253.7362, "width": 640}
"""Kinect RGB camera of the NYU Depth v2 toolbox (``camera_params.m``), at 640 x 480."""

MAT_DATASETS = ("images", "depths", "labels")


def label_table() -> np.ndarray:
    """Raw id (0..894) -> class 0..12, with -1 for unlabelled (id 0)."""
    data = json.loads(
        resources.files("lightning_simo.prepare").joinpath("nyuv2_classes.json").read_text()
    )
    to40 = np.asarray([0, *data["nyu894_to_nyu40"]])
    to13 = np.asarray([0, *data["nyu40_to_nyu13"]])
    return (to13[to40] - 1).astype(np.int16)


def normals_from_depth(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Camera-frame unit normals (x right, y down, z forward, facing the camera) of a depth map.

    Back-projects every pixel, takes the cross product of the horizontal and vertical tangents
    (central differences) and zeroes pixels whose neighbourhood has an invalid depth.
    """
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = depth.astype(np.float64)
    points = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1)
    du = np.gradient(points, axis=1)
    dv = np.gradient(points, axis=0)
    normals = np.cross(du, dv)
    facing = np.sum(normals * points, axis=-1, keepdims=True) > 0
    normals = np.where(facing, -normals, normals)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = (z > 0) & (length[..., 0] > 0)
    valid &= cv2.erode(valid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)
    return (normals * valid[..., None]).astype(np.float32)


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if array.shape[:2] == size:
        return array
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (size[1], size[0]), interpolation=mode)


def _load_splits(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    mat = loadmat(path)
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in mat]
    if missing:
        raise ValueError(f"{str(path)!r} is not NYU's splits.mat: it has no {missing}.")
    return {"train": mat["trainNdxs"].ravel() - 1, "val": mat["testNdxs"].ravel() - 1}


class NYUv2Source:
    """The labelled .mat (+ splits.mat, + optional normals folder), checked on opening."""

    def __init__(
        self,
        source: str | Path,
        splits: str | Path | None = None,
        normals: str | Path | None = None,
        size: tuple[int, int] = (288, 384),
    ) -> None:
        import h5py

        self.path = Path(source)
        splits_path = Path(splits) if splits else self.path.with_name("splits.mat")
        missing = [str(p) for p in (self.path, splits_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"NYUv2 source incomplete: missing {', '.join(repr(m) for m in missing)}. "
                "Download nyu_depth_v2_labeled.mat and splits.mat from "
                "https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html (give splits.mat with "
                "--splits when it is not next to the .mat)."
            )
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise ValueError(
                f"{str(self.path)!r} is not a readable MATLAB v7.3 (HDF5) file: {err}"
            ) from None
        absent = [k for k in MAT_DATASETS if k not in self.file]
        if absent:
            raise ValueError(
                f"NYUv2 source incomplete: {str(self.path)!r} has no {', '.join(absent)} "
                "(expected the labelled set nyu_depth_v2_labeled.mat, not a partial download)."
            )
        count = self.file["images"].shape[0]
        lengths = {k: self.file[k].shape[0] for k in MAT_DATASETS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"NYUv2 source {str(self.path)!r} is truncated: counts {lengths}.")
        self.splits = _load_splits(splits_path)
        for split, idx in self.splits.items():
            if idx.size and (idx.min() < 0 or idx.max() >= count):
                raise ValueError(
                    f"splits.mat lists {split} image {int(idx.max()) + 1}, but "
                    f"{str(self.path)!r} holds {count} images."
                )
        self.normals = Path(normals) if normals else None
        if self.normals is not None:
            wanted = sorted(int(k) for idx in self.splits.values() for k in idx)
            absent_files = [k for k in wanted if self._normal_file(k) is None]
            if absent_files:
                shown = ", ".join(f"{k}.npy" for k in absent_files[:5])
                raise FileNotFoundError(
                    f"NYUv2 normals incomplete: {len(absent_files)} file(s) missing in "
                    f"{str(self.normals)!r}: {shown}{' ...' if len(absent_files) > 5 else ''}"
                )
        self.size = (int(size[0]), int(size[1]))
        self.table = label_table()

    def _normal_file(self, k: int) -> Path | None:
        assert self.normals is not None
        for suffix in (".npy", ".png"):
            path = self.normals / f"{k}{suffix}"
            if path.is_file():
                return path
        return None

    def counts(self) -> dict[str, int]:
        return {split: int(idx.size) for split, idx in self.splits.items()}

    def _normals(self, k: int, depth: np.ndarray) -> np.ndarray:
        if self.normals is None:
            c, s = INTRINSICS, depth.shape[1] / INTRINSICS["width"]  # same camera, any size
            return normals_from_depth(depth, c["fx"] * s, c["fy"] * s, c["cx"] * s, c["cy"] * s)
        path = self._normal_file(k)
        assert path is not None
        if path.suffix == ".npy":
            return np.load(path).astype(np.float32)
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return (rgb.astype(np.float32) / 127.5 - 1.0) * (rgb.sum(-1, keepdims=True) > 0)

    def samples(self) -> Iterator[tuple[str, int, dict[str, np.ndarray]]]:
        f = self.file
        for split, idx in self.splits.items():
            for i, k in enumerate(int(k) for k in idx):
                # MATLAB stores column-major: h5py sees (C, W, H) and (W, H)
                image = np.transpose(f["images"][k], (2, 1, 0))
                depth = np.transpose(f["depths"][k]).astype(np.float32)
                raw = np.transpose(f["labels"][k]).astype(np.int64)
                if raw.max() >= len(self.table):
                    raise ValueError(f"{str(self.path)!r}: image {k} has label id {raw.max()}.")
                normal = self._normals(k, depth)
                normal = _resize(normal, self.size, nearest=True)
                norm = np.linalg.norm(normal, axis=-1, keepdims=True)
                normal = np.divide(normal, norm, out=np.zeros_like(normal), where=norm > 0)
                yield (
                    split,
                    i,
                    {
                        "image": _resize(image, self.size, nearest=False).astype(np.float32)
                        / 255.0,
                        "label": _resize(self.table[raw], self.size, nearest=True),
                        "depth": _resize(depth, self.size, nearest=True),
                        "normal": normal.astype(np.float32),
                    },
                )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="nyu_depth_v2_labeled.mat")
    parser.add_argument("--splits", help="NYU's splits.mat (default: next to --source)")
    parser.add_argument("--normals", help="a folder of precomputed normals, <k>.npy or <k>.png")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(288, 384), metavar=("H", "W"), help="output size"
    )


def open_source(ns: argparse.Namespace) -> NYUv2Source:
    return NYUv2Source(ns.source, ns.splits, ns.normals, tuple(ns.size))
