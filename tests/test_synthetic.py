"""Procedural scenes: consistent geometry, stable seeding, the NYUv2 file layout, the datamodule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_simo.data import synthetic as S

H, W = 64, 80
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes() -> dict[str, np.ndarray]:
    return S.render_scenes(50, height=H, width=W, seed=0)


def camera_points(depth: np.ndarray) -> np.ndarray:
    """Back-project z-depth (... x H x W) to camera-frame points (... x H x W x 3)."""
    fx, fy, cx, cy = S.camera_intrinsics(*depth.shape[-2:])
    rows, cols = np.mgrid[0 : depth.shape[-2], 0 : depth.shape[-1]]
    rays = np.stack([(cols + 0.5 - cx) / fx, (rows + 0.5 - cy) / fy, np.ones(rows.shape)], -1)
    return depth[..., None] * rays


def test_shapes_and_dtypes(scenes: dict[str, np.ndarray]) -> None:
    expected = {
        "image": ((50, H, W, 3), np.float32),
        "segmentation": ((50, H, W), np.int64),
        "depth": ((50, H, W), np.float32),
        "normals": ((50, H, W, 3), np.float32),
        "edges": ((50, H, W), np.float32),
    }
    assert set(scenes) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert scenes[key].shape == shape and scenes[key].dtype == dtype, key
    assert 0.0 <= scenes["image"].min() and scenes["image"].max() <= 1.0
    assert scenes["image"].std() > 0.1
    assert set(np.unique(scenes["edges"])) == {0.0, 1.0}


def test_labels_classes_and_coverage(scenes: dict[str, np.ndarray]) -> None:
    assert len(S.SYNTHETIC_CLASSES) == S.NUM_CLASSES >= 8
    labels = scenes["segmentation"]
    assert labels.min() == -1 and labels.max() < S.NUM_CLASSES
    counts = np.bincount(labels[labels >= 0], minlength=S.NUM_CLASSES)
    assert (counts > 0).all(), dict(zip(S.SYNTHETIC_CLASSES, counts))


def test_invalid_pixels_agree_across_targets(scenes: dict[str, np.ndarray]) -> None:
    invalid = scenes["depth"] == 0
    np.testing.assert_array_equal(invalid, scenes["segmentation"] == -1)
    np.testing.assert_array_equal(invalid, ~np.abs(scenes["normals"]).sum(-1).astype(bool))
    fraction = invalid.mean(axis=(1, 2))
    assert ((fraction > 0.001) & (fraction < 0.03)).all(), fraction
    valid_depth = scenes["depth"][~invalid]
    assert valid_depth.min() > 0.5 and valid_depth.max() < 12.0


def test_normals_unit_and_facing_the_camera(scenes: dict[str, np.ndarray]) -> None:
    valid = scenes["depth"] > 0
    normals = scenes["normals"]
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1.0, atol=1e-5)
    towards = (normals * camera_points(scenes["depth"])).sum(-1)
    assert (towards[valid] < 0).all()  # a visible surface faces the camera


def local_normals(depth: np.ndarray) -> np.ndarray:
    """Normals from central differences of back-projected points (interior pixels)."""
    points = camera_points(depth)
    du = points[..., 1:-1, 2:, :] - points[..., 1:-1, :-2, :]
    dv = points[..., 2:, 1:-1, :] - points[..., :-2, 1:-1, :]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    inward = (n * points[..., 1:-1, 1:-1, :]).sum(-1, keepdims=True) > 0
    return np.where(inward, -n, n)


def smooth_interior(scenes: dict[str, np.ndarray]) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is valid and free of edges (one smooth surface)."""
    bad = (scenes["depth"] == 0) | (scenes["edges"] > 0)
    around = np.zeros(bad[..., 1:-1, 1:-1].shape, dtype=bool)
    for dr in range(3):
        for dc in range(3):
            around |= bad[..., dr : dr + H - 2, dc : dc + W - 2]
    return ~around


def test_normals_match_depth_geometry(scenes: dict[str, np.ndarray]) -> None:
    cos = (local_normals(scenes["depth"]) * scenes["normals"][:, 1:-1, 1:-1]).sum(-1)
    interior = smooth_interior(scenes)
    floor = interior & (scenes["segmentation"][:, 1:-1, 1:-1] == 0)
    assert floor.sum() > 10_000
    assert (cos[floor] > 0.999).mean() > 0.99  # planes: exact up to float rounding
    assert np.median(cos[interior]) > 0.999  # everything, spheres included
    assert (cos[interior] > 0.99).mean() > 0.99


def test_edges_cover_class_boundaries(scenes: dict[str, np.ndarray]) -> None:
    labels, edges = scenes["segmentation"], scenes["edges"] > 0
    a, b = labels[..., :, :-1], labels[..., :, 1:]
    change = (a != b) & (a >= 0) & (b >= 0)
    assert edges[..., :, :-1][change].all() and edges[..., :, 1:][change].all()
    assert 0.03 < edges.mean() < 0.25


def test_seeding_is_stable_and_independent_of_n() -> None:
    first = S.render_scenes(4, height=24, width=32, seed=3)
    again = S.render_scenes(4, height=24, width=32, seed=3)
    fewer = S.render_scenes(2, height=24, width=32, seed=3)
    other = S.render_scenes(2, height=24, width=32, seed=4)
    stream = S.render_scenes(2, height=24, width=32, seed=3, stream=1)
    single = S.render_scene(np.random.default_rng([3, 0, 1]), 24, 32)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        np.testing.assert_array_equal(first[key][:2], fewer[key])
        np.testing.assert_array_equal(first[key][1], single[key])
    assert not np.array_equal(first["image"][:2], other["image"])
    assert not np.array_equal(first["depth"][:2], stream["depth"])


def test_small_and_empty_renders() -> None:
    small = S.render_scenes(1, height=8, width=10)
    assert small["normals"].shape == (1, 8, 10, 3)
    assert (small["depth"] == 0).any()
    empty = S.render_scenes(0, height=8, width=10)
    assert empty["image"].shape == (0, 8, 10, 3)


def test_write_nyuv2_layout(tmp_path: Path) -> None:
    root = S.write_nyuv2_layout(tmp_path / "nyu", {"train": 3, "val": 2}, height=16, width=20)
    for split, count in (("train", 3), ("val", 2)):
        for folder in ("image", "label", "depth", "normal"):
            files = sorted(p.name for p in (root / split / folder).iterdir())
            assert files == [f"{i}.npy" for i in range(count)], (split, folder)
    image = np.load(root / "val" / "image" / "1.npy")
    label = np.load(root / "val" / "label" / "1.npy")
    depth = np.load(root / "val" / "depth" / "1.npy")
    normal = np.load(root / "val" / "normal" / "1.npy")
    assert image.shape == (16, 20, 3) and image.dtype == np.float32
    assert label.shape == (16, 20) and label.dtype == np.float32
    assert depth.shape == (16, 20) and depth.dtype == np.float32
    assert normal.shape == (16, 20, 3) and normal.dtype == np.float32
    np.testing.assert_array_equal(label == -1, depth == 0)
    np.testing.assert_array_equal(label, np.round(label))
    # the files hold the same scenes as the datamodule's split of the same seed
    scene = S.SyntheticScenes(
        2, ["depth"], height=16, width=20, stream=S.split_stream("val"), cache=False
    ).sample(1)
    np.testing.assert_array_equal(scene["depth"], depth)


def test_dataset_cache_matches_on_demand_rendering() -> None:
    tasks = ["segmentation", "depth", "normals", "edges"]
    cached = S.SyntheticScenes(3, tasks, height=16, width=20, seed=1)
    lazy = S.SyntheticScenes(3, tasks, height=16, width=20, seed=1, cache=False)
    a, b = cached[2], lazy[2]
    assert set(a) == {"image", "index", *tasks}
    assert a["image"].shape == (3, 16, 20) and a["normals"].shape == (3, 16, 20)
    assert a["depth"].shape == a["edges"].shape == (1, 16, 20)
    assert a["segmentation"].dtype == torch.int64 and a["index"].item() == 2
    torch.testing.assert_close(a["image"], b["image"], atol=1e-3, rtol=0)
    torch.testing.assert_close(a["normals"], b["normals"], atol=1e-3, rtol=0)
    for key in ("segmentation", "depth", "edges"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    only_depth = S.SyntheticScenes(2, ["depth"], height=16, width=20, seed=1)[0]
    assert set(only_depth) == {"image", "depth", "index"}
    with pytest.raises(ValueError):
        S.SyntheticScenes(2, ["disparity"])


def make_module(**kwargs: object) -> S.SyntheticDataModule:
    defaults: dict[str, object] = dict(
        num_train=8, num_val=4, num_test=4, height=32, width=40, batch_size=4
    )
    return S.SyntheticDataModule(**{**defaults, **kwargs})


def test_datamodule_loaders() -> None:
    dm = make_module(scales=(1.0, 1.5))
    assert dm.tasks == list(S.SYNTHETIC_TASKS)
    assert dm.num_classes == {"segmentation": S.NUM_CLASSES}
    dm.setup("fit")
    dm.setup("test")
    for loader, size in ((dm.train_dataloader(), 4), (dm.val_dataloader(), 4)):
        batch = next(iter(loader))
        assert set(batch) == {"image", "index", "segmentation", "depth", "normals", "edges"}
        assert batch["image"].shape == (size, 3, 32, 40)
        assert batch["segmentation"].shape == (size, 32, 40)
        assert batch["depth"].shape == batch["edges"].shape == (size, 1, 32, 40)
        assert batch["normals"].shape == (size, 3, 32, 40)
        assert batch["index"].dtype == torch.int64
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["image"].shape == (4, 3, 32, 40)
    # splits come from disjoint streams; augmentation is a view, not a re-render
    train, val = dm.scenes("train"), dm.scenes("val")
    assert not np.array_equal(train.arrays["image"][0], val.arrays["image"][0])
    assert dm.datasets["train"].arrays is train.arrays
    assert dm.split_dataset("train").transform is None


def test_datamodule_task_subset_budget_and_pretrain() -> None:
    dm = make_module(tasks=["depth"], num_pretrain=3, train_budget=5, augment=False)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 5
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "depth", "index"}
    pretrain = dm.make_dataset("pretrain", train=True)
    assert len(pretrain) == 3 and set(pretrain[0]) == {"image", "index"}
    assert dm.num_classes == {}
    with pytest.raises(ValueError):
        make_module().make_dataset("pretrain", train=True)


def test_datamodule_rejects_bad_tasks_and_sizes() -> None:
    with pytest.raises(ValueError, match="not provided"):
        make_module(tasks=["disparity"])
    with pytest.raises(ValueError, match="Unknown task"):
        make_module(tasks=["colour"])
    with pytest.raises(ValueError):
        make_module(num_val=0)


def test_renderer_is_pure_numpy() -> None:
    code = (
        "import sys, lightning_simo.data.render as R; "
        "R.render_scene(R.scene_rng(0, 0, 0), 8, 8); "
        "print(sorted(m for m in ('torch', 'lightning', 'albumentations') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
