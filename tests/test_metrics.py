"""Hand-computed checks of the split-level dense metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics import Metric

from lightning_simo import metrics as M


def _value(out: dict[str, torch.Tensor], key: str) -> float:
    return float(out[key])


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_hand_computed_with_ignore_and_absent_class() -> None:
    # 4 classes; class 3 appears neither in labels nor in predictions -> left out of mIoU.
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 3]]])  # predictions on ignored pixels: 3
    m = M.SegmentationMetrics(4)
    m.update(preds, target)
    out = m.compute()
    # valid pixels: 6, correct: 0, 1, 1, 2 -> 4 / 6
    assert _value(out, "pixel_acc") == pytest.approx(100 * 4 / 6)
    # IoU: class 0: inter 1, union |{lab 0}|=2 + |{pred 0}|=2 - 1 = 3 -> 1/3
    #      class 1: inter 2, union 2 + 3 - 2 = 3 -> 2/3
    #      class 2: inter 1, union 2 + 1 - 1 = 2 -> 1/2
    #      class 3: predicted only on ignored pixels -> union 0 -> excluded
    assert _value(out, "miou") == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.confmat.sum() == 6


def test_segmentation_logits_match_labels_and_percent_scale() -> None:
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = torch.tensor([[5.0, -1.0], [-2.0, 3.0]])  # class 0 at (0,0), (1,1)
    m = M.SegmentationMetrics(2)
    m.update(logits, target)
    out = m.compute()
    assert _value(out, "miou") == pytest.approx(100.0)
    assert _value(out, "pixel_acc") == pytest.approx(100.0)


def test_segmentation_rejects_out_of_range_labels() -> None:
    m = M.SegmentationMetrics(3)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_segmentation_all_ignored_is_nan() -> None:
    m = M.SegmentationMetrics(3)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), -1))
    out = m.compute()
    assert math.isnan(_value(out, "miou")) and math.isnan(_value(out, "pixel_acc"))


# ----------------------------------------------------------------------------- depth
def test_depth_excludes_invalid_pixels_and_rel_err() -> None:
    target = torch.tensor([[[[2.0, 4.0], [0.0, 1.0]]]])
    preds = torch.tensor([[[[3.0, 3.0], [100.0, 1.5]]]])  # 100 sits on an invalid pixel
    m = M.DepthMetrics()
    m.update(preds, target)
    out = m.compute()
    # |err| = 1, 1, 0.5 ; rel = 1/2, 1/4, 0.5/1
    assert _value(out, "abs_err") == pytest.approx(2.5 / 3)
    assert _value(out, "rel_err") == pytest.approx((0.5 + 0.25 + 0.5) / 3)


def test_depth_pools_pixels_not_batch_means() -> None:
    m = M.DepthMetrics()
    m.update(torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]]))  # 1 pixel, err 1
    m.update(torch.zeros(1, 1, 3), torch.tensor([[[1.0, 1.0, 1.0]]]))  # 3 pixels, err 1 each
    m.update(torch.ones(1, 1, 2), torch.tensor([[[1.0, 3.0]]]))  # err 0, 2
    # abs: pooled (1 + 3 + 2) / 6 = 1 (batch means agree here); rel tells the two apart:
    # pooled (0.5 + 1 + 1 + 1 + 0 + 2/3) / 6 = 0.694, mean of batch means (0.5 + 1 + 1/3) / 3 = 0.611
    out = m.compute()
    assert _value(out, "abs_err") == pytest.approx(1.0)
    assert _value(out, "rel_err") == pytest.approx((0.5 + 3.0 + 2 / 3) / 6)


def test_depth_empty_valid_set_is_nan() -> None:
    m = M.DepthMetrics()
    m.update(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    out = m.compute()
    assert math.isnan(_value(out, "abs_err")) and math.isnan(_value(out, "rel_err"))


# ----------------------------------------------------------------------------- normals
def _normals_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Four pixels at 0, 90, 180 degrees and one invalid (all-zero target)."""
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    preds = torch.tensor([[0.0, 0.0, 5.0], [2.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    # shape B x 3 x H x W = 1 x 3 x 1 x 4
    return preds.T.reshape(1, 3, 1, 4), target.T.reshape(1, 3, 1, 4)


def test_normals_known_angles() -> None:
    preds, target = _normals_case()
    m = M.NormalMetrics()
    m.update(preds, target)
    out = m.compute()
    assert int(m.count) == 3  # the all-zero target is excluded
    assert _value(out, "mean") == pytest.approx(90.0, abs=1e-4)  # (0 + 90 + 180) / 3
    assert _value(out, "median") == pytest.approx(90.0, abs=m.bin_width)
    assert _value(out, "within_11_25") == pytest.approx(100 / 3)
    assert _value(out, "within_22_5") == pytest.approx(100 / 3)
    assert _value(out, "within_30") == pytest.approx(100 / 3)


def test_normals_within_thresholds_are_strict_and_exact() -> None:
    # angles 10, 20, 25, 40 degrees in the x-z plane
    angles = torch.deg2rad(torch.tensor([10.0, 20.0, 25.0, 40.0]))
    preds = torch.stack([torch.sin(angles), torch.zeros(4), torch.cos(angles)]).reshape(1, 3, 2, 2)
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    m = M.NormalMetrics()
    m.update(preds, target)
    out = m.compute()
    assert _value(out, "within_11_25") == pytest.approx(25.0)
    assert _value(out, "within_22_5") == pytest.approx(50.0)
    assert _value(out, "within_30") == pytest.approx(75.0)
    assert _value(out, "mean") == pytest.approx(95.0 / 4, abs=1e-4)
    # even count: the lower median (20) and the interpolated value both lie in [20, 25]
    assert 20.0 - m.bin_width <= _value(out, "median") <= 25.0 + m.bin_width


def test_normals_median_matches_torch_median_within_bin_width() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(3, 3, 17, 19, generator=g)
    target = torch.nn.functional.normalize(
        torch.randn(3, 3, 17, 19, generator=g) + torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1),
        dim=1,
    )
    target[0, :, :4] = 0.0  # some invalid pixels
    m = M.NormalMetrics()
    m.update(preds, target)
    out = m.compute()
    valid = target.abs().sum(1) > 0
    cos = (torch.nn.functional.normalize(preds, dim=1) * target).sum(1)[valid].clamp(-1, 1)
    angles = torch.rad2deg(torch.acos(cos))
    assert int(m.count) == angles.numel()
    assert _value(out, "median") == pytest.approx(float(angles.median()), abs=m.bin_width + 1e-4)
    assert _value(out, "mean") == pytest.approx(float(angles.mean()), rel=1e-5)
    assert _value(out, "within_30") == pytest.approx(100 * float((angles < 30).float().mean()))
    # a coarse histogram is still within its (larger) bin width
    coarse = M.NormalMetrics(bins=180)
    coarse.update(preds, target)
    median = float(coarse.compute()["median"])
    assert median == pytest.approx(float(angles.median()), abs=coarse.bin_width + 1e-4)


def test_normals_all_invalid_is_nan() -> None:
    m = M.NormalMetrics()
    m.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    out = m.compute()
    assert all(math.isnan(float(v)) for v in out.values())


# ----------------------------------------------------------------------------- edges
def test_edges_precision_recall_f1() -> None:
    target = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 3)
    logits = torch.tensor([4.0, 0.3, -2.0, 1.0, -1.0, -3.0]).view(1, 1, 2, 3)
    m = M.EdgeMetrics()
    m.update(logits, target)
    out = m.compute()
    # predicted positive (logit > 0): pixels 0, 1, 3 -> tp 2, fp 1, fn 1
    assert _value(out, "precision") == pytest.approx(100 * 2 / 3)
    assert _value(out, "recall") == pytest.approx(100 * 2 / 3)
    assert _value(out, "f1") == pytest.approx(100 * 4 / 6)
    strict = M.EdgeMetrics(threshold=0.9)  # sigmoid(4) = 0.982 only
    strict.update(logits, target)
    out = strict.compute()
    assert _value(out, "precision") == pytest.approx(100.0)
    assert _value(out, "recall") == pytest.approx(100 / 3)
    assert _value(out, "f1") == pytest.approx(100 * 2 / 4)


def test_edges_zero_over_zero_is_zero() -> None:
    m = M.EdgeMetrics()
    m.update(torch.full((1, 1, 2, 2), -5.0), torch.zeros(1, 1, 2, 2))
    out = m.compute()
    assert {k: float(v) for k, v in out.items()} == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


# ----------------------------------------------------------------------------- regression
def test_regression_mean_abs_error_over_all_elements() -> None:
    preds = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]]])  # 1 x 2 x 1 x 2
    target = torch.tensor([[[[0.0, 0.0]], [[0.0, -4.0]]]])
    m = M.RegressionMetrics()
    m.update(preds, target)
    assert _value(m.compute(), "abs_err") == pytest.approx(7.0 / 4)
    with pytest.raises(ValueError, match="same shape"):
        m.update(preds, target[:, :1])


# ----------------------------------------------------------------------------- shared behaviour
def _random_batches(kind: str, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for size in (1, 3, 2):
        if kind == "segmentation":
            preds = torch.randn(size, 4, 5, 6, generator=g)
            target = torch.randint(-1, 4, (size, 5, 6), generator=g)
        elif kind == "depth":
            preds = torch.rand(size, 1, 5, 6, generator=g) * 3
            target = torch.rand(size, 1, 5, 6, generator=g) * 3
            target[target < 0.5] = 0.0
        elif kind == "normals":
            preds = torch.randn(size, 3, 5, 6, generator=g)
            target = torch.nn.functional.normalize(torch.randn(size, 3, 5, 6, generator=g), dim=1)
            target[:, :, 0] = 0.0
        elif kind == "edges":
            preds = torch.randn(size, 1, 5, 6, generator=g)
            target = (torch.rand(size, 1, 5, 6, generator=g) > 0.7).float()
        else:
            preds = torch.randn(size, 2, 5, 6, generator=g)
            target = torch.randn(size, 2, 5, 6, generator=g)
        batches.append((preds, target))
    return batches


_FACTORIES = {
    "segmentation": lambda: M.SegmentationMetrics(4),
    "depth": M.DepthMetrics,
    "normals": M.NormalMetrics,
    "edges": M.EdgeMetrics,
    "regression": M.RegressionMetrics,
}


@pytest.mark.parametrize("kind", list(_FACTORIES))
def test_accumulation_equals_one_big_batch(kind: str) -> None:
    batches = _random_batches(kind, torch.Generator().manual_seed(1))
    split, whole = _FACTORIES[kind](), _FACTORIES[kind]()
    assert isinstance(split, M.DenseMetric) and isinstance(split, Metric)
    for preds, target in batches:
        split.update(preds, target)
    whole.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    a, b = split.compute(), whole.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dim() == 0
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key


@pytest.mark.parametrize("kind", list(_FACTORIES))
def test_bf16_preds_are_accepted_and_computed_in_fp32(kind: str) -> None:
    batches = _random_batches(kind, torch.Generator().manual_seed(2))
    ref, low = _FACTORIES[kind](), _FACTORIES[kind]()
    for preds, target in batches:
        rounded = preds.to(torch.bfloat16)
        ref.update(rounded.float(), target)  # same values, already fp32
        low.update(rounded, target)
    a, b = ref.compute(), low.compute()
    for key in a:
        assert b[key].dtype == torch.float32
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6), key


@pytest.mark.parametrize("kind", list(_FACTORIES))
def test_reset_clears_state(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    first, second = _random_batches(kind, g), _random_batches(kind, g)
    m, fresh = _FACTORIES[kind](), _FACTORIES[kind]()
    for preds, target in first:
        m.update(preds, target)
    m.compute()
    m.reset()
    for preds, target in second:
        m.update(preds, target)
        fresh.update(preds, target)
    a, b = m.compute(), fresh.compute()
    for key in a:
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key


def test_states_are_summed_across_processes() -> None:
    # DDP exactness rests on every state being a sum; check the declared reductions.
    for factory in _FACTORIES.values():
        m = factory()
        assert not m.full_state_update
        assert m._reductions, type(m).__name__
        for name, fx in m._reductions.items():
            assert fx is not None and fx.__name__ == "dim_zero_sum", (type(m).__name__, name)


def test_unit_vectors_equal_f_normalize_in_value_and_gradient() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # a zero vector stays zero, as with F.normalize
    x[1, :, 1, 1] = 1e-14  # below eps: divided by eps, not by its norm
    ours = x.clone().requires_grad_(True)
    theirs = x.clone().requires_grad_(True)
    weights = torch.randn_like(x)
    (M.unit_vectors(ours) * weights).sum().backward()
    (torch.nn.functional.normalize(theirs, dim=1) * weights).sum().backward()
    torch.testing.assert_close(M.unit_vectors(x), torch.nn.functional.normalize(x, dim=1))
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert torch.equal(M.unit_vectors(x)[0, :, 0, 0], torch.zeros(3, dtype=torch.float64))
