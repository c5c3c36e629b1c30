#!/usr/bin/env python3
"""Write a tiny fake Taskonomy (one folder per domain, one per building) next to this script.

Run ``python tests/data/taskonomy/data.py`` to regenerate. Images are 32 x 32 PNGs at the real
bit depths (8-bit RGB / normals / labels / mask, 16-bit depth / keypoints / edges). Depth holds
65535 where ``mask_valid`` is 0 (top rows); keypoints and edges exceed their clipping limits;
segmentation uses the unlabelled value 0 and the largest class 17.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

SIZE = 32
BUILDINGS = {"allensville": 3, "coffeen": 2, "beechwood": 2, "ihlen": 2}
DOMAINS = (
    "rgb",
    "depth_zbuffer",
    "mask_valid",
    "normal",
    "keypoints2d",
    "edge_texture",
    "segment_semantic",
)


def view(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One view's maps, keyed by domain, in the stored dtypes (3-channel maps in RGB order)."""
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[:4] = 0
    depth = rng.integers(200, 20000, (SIZE, SIZE)).astype(np.uint16)
    depth[:4] = 65535
    labels = rng.integers(0, 18, (SIZE, SIZE)).astype(np.uint8)
    labels[0, 0], labels[0, 1] = 0, 17
    return {
        "rgb": rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8),
        "depth_zbuffer": depth,
        "mask_valid": mask,
        "normal": rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8),
        "keypoints2d": rng.integers(0, 4000, (SIZE, SIZE)).astype(np.uint16),
        "edge_texture": rng.integers(0, 12000, (SIZE, SIZE)).astype(np.uint16),
        "segment_semantic": labels,
    }


def main() -> None:
    root = Path(__file__).resolve().parent
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        shutil.rmtree(root / domain, ignore_errors=True)
    for building, count in BUILDINGS.items():
        for domain in DOMAINS:
            (root / domain / building).mkdir(parents=True)
        for i in range(count):
            for domain, array in view(rng).items():
                if array.ndim == 3:
                    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
                name = f"point_{i}_view_{i % 2}_domain_{domain}.png"
                cv2.imwrite(str(root / domain / building / name), array)


if __name__ == "__main__":
    main()
