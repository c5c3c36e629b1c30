#!/usr/bin/env python3
"""Write a tiny fake NYUv2 in MTAN's ``.npy`` layout next to this script.

Run ``python tests/data/nyuv2/data.py`` to regenerate. The values exercise what the loader must
handle: ignore labels (-1), invalid depth (0), invalid normals (all zero), float labels in
``train`` and integer labels in ``val``, depth stored as ``H x W x 1`` in ``train`` and ``H x W``
in ``val``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 24, 32
SIZES = {"train": 4, "val": 6}
NUM_CLASSES = 13


def write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    folders = {name: root / split / name for name in ("image", "label", "depth", "normal")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(count):
        image = rng.random((HEIGHT, WIDTH, 3), dtype=np.float32)
        label = rng.integers(-1, NUM_CLASSES, (HEIGHT, WIDTH))
        label[0, 0], label[0, 1] = -1, NUM_CLASSES - 1  # both ends of the range in every map
        depth = rng.uniform(0.5, 10.0, (HEIGHT, WIDTH)).astype(np.float32)
        depth[:2] = 0.0  # invalid rows
        normal = rng.normal(size=(HEIGHT, WIDTH, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=2, keepdims=True)
        normal[:, :3] = 0.0  # invalid columns
        if split == "train":
            label = label.astype(np.float32)
            depth = depth[..., None]
        np.save(folders["image"] / f"{i}.npy", image)
        np.save(folders["label"] / f"{i}.npy", label)
        np.save(folders["depth"] / f"{i}.npy", depth)
        np.save(folders["normal"] / f"{i}.npy", normal)


def main() -> None:
    root = Path(__file__).resolve().parent
    rng = np.random.default_rng(0)
    for split, count in SIZES.items():
        shutil.rmtree(root / split, ignore_errors=True)
        write_split(root, split, count, rng)


if __name__ == "__main__":
    main()
