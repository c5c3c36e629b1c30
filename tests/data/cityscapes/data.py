#!/usr/bin/env python3
"""Write a tiny fake Cityscapes in MTAN-style ``.npy`` layout next to this script.

Run ``python tests/data/cityscapes/data.py`` to regenerate. Maps are 16 x 32 (the real 128 x 256
halved three times). Disparity is stored ``H x W x 1`` with both invalid markers: 0 (MTAN) in
the first row and -1 (Auto-Lambda) in the second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 16, 32
SIZES = {"train": 5, "val": 2}
LABEL_FOLDERS = {"label_19": 19, "label_7": 7, "part_seg": 10}


def write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    folders = {name: root / split / name for name in ("image", "depth", *LABEL_FOLDERS)}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(count):
        np.save(folders["image"] / f"{i}.npy", rng.random((HEIGHT, WIDTH, 3), dtype=np.float32))
        for name, classes in LABEL_FOLDERS.items():
            label = rng.integers(-1, classes, (HEIGHT, WIDTH)).astype(np.float32)
            label[0, 0], label[0, 1] = -1, classes - 1
            np.save(folders[name] / f"{i}.npy", label)
        disparity = rng.uniform(0.01, 0.3, (HEIGHT, WIDTH, 1)).astype(np.float32)
        disparity[0] = 0.0
        disparity[1] = -1.0
        np.save(folders["depth"] / f"{i}.npy", disparity)


def main() -> None:
    root = Path(__file__).resolve().parent
    rng = np.random.default_rng(0)
    for split, count in SIZES.items():
        shutil.rmtree(root / split, ignore_errors=True)
        write_split(root, split, count, rng)


if __name__ == "__main__":
    main()
