"""Consensus (TALL masks), MagMax and Model Stock against FusionBench-style references."""

from __future__ import annotations

import math

import pytest
import torch
from merge_encoders import assert_bad_option, assert_close_states, random_encoders, references

from lightning_simo.merging import merge
from lightning_simo.merging.mask_methods import model_stock_ratio


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("consensus", {}),
        ("consensus", {"k": 1, "tall_lambda": [0.2, 0.4, 0.6], "scaling": 0.5}),
        ("consensus", {"k": 3, "tall_lambda": 0.3}),
        ("consensus", {"base": "ties", "density": 0.3}),
        ("magmax", {}),
        ("magmax", {"scaling": 1.2}),
        ("model_stock", {}),
    ],
)
def test_mask_methods_equal_reference(method: str, options: dict, dtype: torch.dtype) -> None:
    pretrained, finetuned = random_encoders(dtype=dtype)
    merged = merge(pretrained, finetuned, method, **options)
    expected = references.REFERENCES[method](pretrained, finetuned, **options)
    assert_close_states(merged, expected, 1e-5 if dtype == torch.float32 else 1e-10)


def test_consensus_on_ties_masks_the_ties_vector() -> None:
    pretrained, finetuned = random_encoders(dtype=torch.float64)
    ties = merge(pretrained, finetuned, "ties", density=0.3, merge_rule="sum", scaling=1.0)
    vector = {k: ties[k] - pretrained[k] for k in ties if ties[k].is_floating_point()}
    merged = merge(pretrained, finetuned, "consensus", base="ties", density=0.3, scaling=0.8)
    expected = references.consensus_reference(
        pretrained, finetuned, base="ties", scaling=0.8, base_vector=vector
    )
    assert_close_states(merged, expected, 1e-10)


def test_consensus_hand_checked() -> None:
    theta0 = {"w": t(0.0, 0.0, 0.0)}
    tasks = [{"w": t(1.0, 1.0, 0.1)}, {"w": t(1.0, -1.0, 0.0)}, {"w": t(1.0, 0.0, 0.0)}]
    # multi = (3, 0, 0.1); task masks with λ = 1: |τ_t| > |multi - τ_t|
    # entry 0: 1 > 2 no for all -> 0 votes; entry 1: 1 > 1 no, 1 > 1 no -> 0; entry 2: 0.1 > 0 -> 1
    assert torch.equal(merge(theta0, tasks, "consensus", k=1, tall_lambda=1.0)["w"], t(0, 0, 0.1))
    assert torch.equal(merge(theta0, tasks, "consensus", k=2, tall_lambda=1.0)["w"], t(0, 0, 0))
    # λ = 0.4: entry 0 every task claims it (1 > 0.8), entry 1: 1 > 0.4 for tasks 0 and 1
    assert torch.equal(merge(theta0, tasks, "consensus", k=2, tall_lambda=0.4)["w"], t(3, 0, 0))
    # k = 0 is task arithmetic
    assert torch.equal(merge(theta0, tasks, "consensus", k=0)["w"], t(3.0, 0.0, 0.1))


def test_magmax_keeps_largest_magnitude_later_task_on_ties() -> None:
    theta0 = {"w": t(1.0, 1.0, 1.0)}
    tasks = [{"w": t(3.0, 0.0, 0.0)}, {"w": t(0.0, 0.5, 2.0)}]
    # τ = (2, -1, -1) and (-1, -0.5, 1): magnitudes 2 vs 1, 1 vs 0.5, tie 1 vs 1 -> later (+1)
    torch.testing.assert_close(merge(theta0, tasks, "magmax", scaling=1.0)["w"], t(3.0, 0.0, 2.0))
    torch.testing.assert_close(merge(theta0, tasks, "magmax")["w"], t(2.0, 0.5, 1.5))


def test_model_stock_ratio_hand_checked() -> None:
    # orthogonal task vectors: cos 0 -> t = 0 (stay at θ0); identical: cos 1 -> t = 1
    assert model_stock_ratio([t(1.0, 0.0), t(0.0, 1.0)]) == pytest.approx(0.0, abs=1e-7)
    assert model_stock_ratio([t(1.0, 1.0), t(2.0, 2.0)]) == pytest.approx(1.0, abs=1e-7)
    # 60 degrees, two models: t = 2 * 0.5 / (0.5 + 1) = 2/3
    assert model_stock_ratio([t(1.0, 0.0), t(0.5, math.sqrt(3) / 2)]) == pytest.approx(2 / 3)
    # three models: angles 90, 90, 0 degrees average to 60 (angles averaged, not cosines)
    three = [t(1.0, 0.0), t(0.0, 1.0), t(0.0, 1.0)]
    # (the 1e-8 of the cosine denominator puts the 0-degree angle at about 1e-4 rad)
    assert model_stock_ratio(three) == pytest.approx(3 * 0.5 / (2 * 0.5 + 1), rel=1e-4)


def test_model_stock_interpolates_per_tensor() -> None:
    theta0 = {"a": t(1.0, 1.0), "b": t(0.0, 0.0)}
    tasks = [{"a": t(2.0, 1.0), "b": t(1.0, 1.0)}, {"a": t(1.0, 2.0), "b": t(2.0, 2.0)}]
    merged = merge(theta0, tasks, "model_stock")
    torch.testing.assert_close(merged["a"], theta0["a"], atol=1e-6, rtol=0)  # orthogonal
    torch.testing.assert_close(merged["b"], t(1.5, 1.5))  # aligned: the average


def test_model_stock_needs_two_models() -> None:
    pretrained, finetuned = random_encoders(n_tasks=1)
    with pytest.raises(ValueError, match="'model_stock' needs at least two fine-tuned models"):
        merge(pretrained, finetuned, "model_stock")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("consensus", {"k": 1.5}, "option 'k' of merge method 'consensus'"),
        ("consensus", {"k": -1}, "option 'k' of merge method 'consensus'"),
        (
            "consensus",
            {"tall_lambda": [0.2, -1]},
            "option 'tall_lambda' of merge method 'consensus'",
        ),
        ("consensus", {"base": "dare"}, "option 'base' of merge method 'consensus'"),
        ("consensus", {"density": 0.2}, "unknown option 'density' for merge method 'consensus'"),
        (
            "consensus",
            {"base": "ties", "density": 2},
            "option 'density' of merge method 'consensus' with base 'ties'",
        ),
        (
            "consensus",
            {"tall_lambda": [0.2, 0.3]},
            "option 'tall_lambda' of merge method 'consensus' has 2",
        ),
        ("magmax", {"scaling": "big"}, "option 'scaling' of merge method 'magmax'"),
        (
            "model_stock",
            {"scaling": 1.0},
            "unknown option 'scaling' for merge method 'model_stock'",
        ),
    ],
)
def test_bad_options_name_method_and_option(method: str, options: dict, message: str) -> None:
    assert_bad_option(method, options, message)
