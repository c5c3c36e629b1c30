"""Dense augmentation: every target moves with the image and keeps its physical meaning."""

from __future__ import annotations

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch

from lightning_simo.data import transforms as T

H, W = 12, 16


def make_sample(seed: int = 0) -> dict[str, np.ndarray]:
    """A random sample with every dense key and some invalid pixels of each kind."""
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(H, W, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    sample = {
        "image": rng.random((H, W, 3), dtype=np.float32),
        "segmentation": rng.integers(0, 5, (H, W)).astype(np.int64),
        "part_segmentation": rng.integers(0, 3, (H, W)).astype(np.int64),
        "depth": rng.uniform(0.5, 9.0, (H, W)).astype(np.float32),
        "disparity": rng.uniform(0.1, 2.0, (H, W)).astype(np.float32),
        "normals": normals,
        "edges": (rng.random((H, W)) < 0.2).astype(np.float32),
    }
    holes = rng.random((H, W)) < 0.1
    holes[0, 0] = True
    sample["segmentation"][holes] = -1
    sample["part_segmentation"][holes] = -1
    sample["depth"][holes] = 0.0
    sample["disparity"][holes] = 0.0
    sample["normals"][holes] = 0.0
    return sample


def assert_copied_from(values: np.ndarray, source: np.ndarray, rtol: float = 1e-6) -> None:
    """Every entry of ``values`` equals (to float rounding) some entry of ``source``."""
    ref = np.sort(source.ravel())
    pos = np.clip(np.searchsorted(ref, values), 1, len(ref) - 1)
    nearest = np.where(
        np.abs(ref[pos] - values) < np.abs(ref[pos - 1] - values), ref[pos], ref[pos - 1]
    )
    np.testing.assert_allclose(values, nearest, rtol=rtol)


def compose(*steps: A.BasicTransform) -> A.Compose:
    return A.Compose(list(steps), additional_targets={k: "mask" for k in T.dense_keys()})


def float_sample(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in sample.items()}


def test_flip_mirrors_maps_and_negates_normal_x() -> None:
    sample = make_sample()
    out = compose(T.HorizontalFlipNormals(p=1.0))(**float_sample(sample))
    for key in ("image", "segmentation", "depth", "disparity", "edges"):
        np.testing.assert_array_equal(out[key], sample[key][:, ::-1])
    np.testing.assert_array_equal(out["normals"][..., 0], -sample["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(out["normals"][..., 1:], sample["normals"][:, ::-1, 1:])
    invalid = ~np.abs(out["normals"]).sum(-1).astype(bool)
    np.testing.assert_array_equal(invalid, (sample["depth"] == 0)[:, ::-1])
    assert not np.signbit(out["normals"][invalid]).any()  # invalid normals stay +0


def test_flip_twice_restores_exactly() -> None:
    sample = float_sample(make_sample(1))
    flip = compose(T.HorizontalFlipNormals(p=1.0))
    twice = flip(**flip(**sample))
    for key, value in sample.items():
        assert twice[key].tobytes() == value.tobytes(), key  # bitwise, signs of zeros included


def test_rescale_divides_depth_and_multiplies_disparity() -> None:
    sample = make_sample(2)
    out = compose(T.RandomRescale(scales=(2.0,)))(**float_sample(sample))
    assert out["image"].shape == (2 * H, 2 * W, 3)
    # nearest-neighbour: each output pixel copies one input pixel, so pixel (2i, 2j) <- (i, j)
    np.testing.assert_allclose(out["depth"][::2, ::2], sample["depth"] / 2.0, rtol=1e-6)
    np.testing.assert_allclose(out["disparity"][::2, ::2], sample["disparity"] * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(out["segmentation"][::2, ::2], sample["segmentation"])
    np.testing.assert_array_equal(out["normals"][::2, ::2], sample["normals"])
    np.testing.assert_array_equal(out["depth"] == 0, out["segmentation"] == -1)


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_pipeline_rescale_crop_keeps_targets_consistent(scale: float) -> None:
    sample = make_sample(3)
    pipe = T.build_transform(train=True, crop=(H, W), scales=(scale,), hflip=False, seed=0)
    out = pipe(sample)
    assert out["image"].shape == (H, W, 3)
    assert out["depth"].shape == out["segmentation"].shape == (H, W)
    assert out["segmentation"].dtype == np.int64
    assert set(np.unique(out["segmentation"])) <= set(np.unique(sample["segmentation"]))
    valid = out["depth"] > 0
    assert valid.sum() > 0.5 * H * W
    # nearest resampling copies values, so each valid depth is some input depth / scale
    assert_copied_from(out["depth"][valid] * scale, sample["depth"][sample["depth"] > 0])
    assert_copied_from(out["disparity"][valid] / scale, sample["disparity"][sample["depth"] > 0])
    # invalid pixels stay invalid together, valid normals stay unit
    np.testing.assert_array_equal(~valid, out["segmentation"] == -1)
    np.testing.assert_array_equal(~valid, out["disparity"] == 0)
    norms = np.linalg.norm(out["normals"], axis=-1)
    np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
    np.testing.assert_array_equal(norms[~valid], 0.0)
    assert set(np.unique(out["edges"])) <= {0.0, 1.0}


def test_crop_sizes_and_padding_are_invalid() -> None:
    sample = make_sample(4)
    small = T.build_transform(train=True, crop=(8, 10), scales=(1.0, 1.5), seed=0)(sample)
    assert small["image"].shape == (8, 10, 3) and small["normals"].shape == (8, 10, 3)
    big = T.build_transform(train=False, crop=(H + 4, W + 6))(sample)
    assert big["image"].shape == (H + 4, W + 6, 3)
    inner = (slice(2, 2 + H), slice(3, 3 + W))  # centred padding
    for key, value in sample.items():
        np.testing.assert_array_equal(big[key][inner], value, err_msg=key)
    border = np.ones((H + 4, W + 6), dtype=bool)
    border[inner] = False
    assert (big["segmentation"][border] == -1).all()
    assert (big["part_segmentation"][border] == -1).all()
    for key in ("depth", "disparity", "edges", "normals", "image"):
        assert (big[key][border] == 0).all(), key


def test_eval_center_crop_and_identity() -> None:
    sample = make_sample(5)
    out = T.build_transform(train=False, crop=(8, 10))(sample)
    for key, value in sample.items():
        np.testing.assert_array_equal(out[key], value[2:10, 3:13], err_msg=key)
    same = T.build_transform(train=False)(sample)
    for key, value in sample.items():
        assert same[key] is value


def test_train_without_crop_keeps_size_and_passes_extras() -> None:
    sample = {**make_sample(6), "index": np.int64(7)}
    out = T.build_transform(train=True, scales=(1.2,), seed=0)(sample)
    assert out["image"].shape == (H, W, 3)
    assert out["index"] == 7
    only_image = T.build_transform(train=True, scales=(1.5,), seed=0)({"image": sample["image"]})
    assert set(only_image) == {"image"} and only_image["image"].shape == (H, W, 3)


def test_flip_happens_about_half_the_time_and_is_seeded() -> None:
    sample = make_sample(7)
    sample["image"][:, : W // 2] = 0.0  # left half dark: a flip moves it right
    sample["image"][:, W // 2 :] = 1.0

    def flips(seed: int) -> list[bool]:
        pipe = T.build_transform(train=True, hflip=True, seed=seed)
        return [bool(pipe(sample)["image"][0, 0, 0] == 1.0) for _ in range(40)]

    first = flips(3)
    assert flips(3) == first
    assert 8 <= sum(first) <= 32
    # the normals follow the image: flipped samples have negated x
    pipe = T.build_transform(train=True, hflip=True, seed=3)
    for flipped in first[:10]:
        out = pipe(sample)
        sign = -1.0 if flipped else 1.0
        expected = sample["normals"][:, ::-1, 0] if flipped else sample["normals"][..., 0]
        np.testing.assert_array_equal(out["normals"][..., 0], sign * expected + 0.0)


def test_dataloader_workers_get_distinct_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = make_sample(8)
    sample["image"][:, : W // 2] = 0.0

    def run(worker_seed: int) -> list[bool]:
        info = SimpleNamespace(id=0, seed=worker_seed)
        monkeypatch.setattr(T, "get_worker_info", lambda: info)
        pipe = T.build_transform(train=True, hflip=True, seed=0)
        return [bool(pipe(sample)["image"][0, 0, 0] > 0) for _ in range(32)]

    assert run(11) == run(11)
    assert run(11) != run(12)  # same construction seed, different workers -> different flips


def test_to_tensor_sample_layout() -> None:
    sample = {**make_sample(9), "index": np.int64(3)}
    out = T.to_tensor_sample(sample)
    assert out["image"].shape == (3, H, W) and out["image"].dtype == torch.float32
    assert out["normals"].shape == (3, H, W)
    for key in ("depth", "disparity", "edges"):
        assert out[key].shape == (1, H, W) and out[key].dtype == torch.float32
    for key in ("segmentation", "part_segmentation"):
        assert out[key].shape == (H, W) and out[key].dtype == torch.int64
    assert out["segmentation"].min() == -1
    torch.testing.assert_close(out["normals"][:, 2, 5], torch.from_numpy(sample["normals"][2, 5]))
    assert out["index"].item() == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        T.build_transform(train=True, scales=())
    with pytest.raises(ValueError):
        T.build_transform(train=True, crop=(0, 4))
    with pytest.raises(ValueError):
        T.RandomRescale(scales=(1.0, -1.0))
