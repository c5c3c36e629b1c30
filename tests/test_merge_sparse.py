"""Breadcrumbs and DELLA against mergekit-style references; DELLA's randomness and statistics."""

from __future__ import annotations

import pytest
import torch
from merge_encoders import assert_bad_option, assert_close_states, random_encoders, references

from lightning_simo.merging import merge
from lightning_simo.merging.methods import _stable_seed
from lightning_simo.merging.sparse_methods import (
    breadcrumbs_mask,
    della_keep_probabilities,
    della_prune,
    lowest_ranks,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def engine_draws(seed: int):
    def draws(task: int, key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_stable_seed(seed, task, key))
        return torch.rand(shape, generator=generator, dtype=dtype)

    return draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"density": 0.5, "gamma": 0.1, "scaling": 0.4},
        {"density": 0.95, "gamma": 0.2, "weights": [1.0, 0.5, -0.5]},
        {"density": 1.0},
    ],
)
def test_breadcrumbs_equals_reference(options: dict, dtype: torch.dtype) -> None:
    pretrained, finetuned = random_encoders(dtype=dtype)
    merged = merge(pretrained, finetuned, "breadcrumbs", **options)
    expected = references.breadcrumbs_reference(pretrained, finetuned, **options)
    assert_close_states(merged, expected, 1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [{}, {"density": 0.4, "epsilon": 0.3, "scaling": 0.6, "seed": 5}, {"density": 1.0}],
)
def test_della_equals_reference_on_the_same_draws(options: dict, dtype: torch.dtype) -> None:
    pretrained, finetuned = random_encoders(dtype=dtype)
    merged = merge(pretrained, finetuned, "della", **options)
    ref_options = {k: v for k, v in options.items() if k != "seed"}
    draws = engine_draws(options.get("seed", 0))
    expected = references.della_reference(pretrained, finetuned, draws, **ref_options)
    assert_close_states(merged, expected, 1e-5 if dtype == torch.float32 else 1e-10)


def test_della_is_seed_reproducible() -> None:
    pretrained, finetuned = random_encoders()
    first = merge(pretrained, finetuned, "della", seed=1)
    again = merge(pretrained, finetuned, "della", seed=1)
    other = merge(pretrained, finetuned, "della", seed=2)
    key = "blocks.0.attn.qkv.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[key], other[key])


def test_della_keep_probabilities_are_linear_in_the_rank_along_dim_1() -> None:
    tau = torch.tensor([[0.3, -0.1, 0.2, 0.4, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    probs = della_keep_probabilities(tau, density=0.5, epsilon=0.2)
    # ranks of |τ| per row: (3, 1, 2, 4, 0) and (4, 3, 2, 1, 0); p = 0.3 + rank * 0.4 / 4
    torch.testing.assert_close(probs[0], t(0.6, 0.4, 0.5, 0.7, 0.3))
    torch.testing.assert_close(probs[1], t(0.7, 0.6, 0.5, 0.4, 0.3))
    # vectors are one row; a conv kernel ranks along axis 1 (input channels)
    torch.testing.assert_close(della_keep_probabilities(t(2.0, 1.0), 0.5, 0.2), t(0.7, 0.3))
    kernel = torch.randn(2, 3, 2, 2)
    order = kernel.abs().argsort(dim=1).argsort(dim=1).float()
    torch.testing.assert_close(della_keep_probabilities(kernel, 0.5, 0.2), 0.3 + order * 0.2)
    # one entry along dim 1 (mergekit's 0/0): density
    assert torch.equal(
        della_keep_probabilities(torch.ones(4, 1), 0.5, 0.2), torch.full((4, 1), 0.5)
    )


def test_della_statistics_match_its_probabilities() -> None:
    # Over many seeds each entry is kept with its probability, the kept fraction is `density`,
    # and every draw preserves the tensor's L1 norm exactly (one rescale per tensor).
    tau = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    probs = della_keep_probabilities(tau, 0.6, 0.25)
    kept = torch.zeros_like(tau)
    draws = 400
    for seed in range(draws):
        pruned = della_prune(tau.clone(), 0.6, 0.25, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(pruned.abs().sum(), tau.abs().sum())
        kept += pruned != 0
    frequency = kept / draws
    assert float(frequency.mean()) == pytest.approx(0.6, abs=0.01)
    # binomial standard error sqrt(p(1-p)/400) <= 0.025; 5 sigma per entry
    assert float((frequency - probs).abs().max()) < 0.125
    # rank dependence: the largest entries are kept more often than the smallest
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)
    assert float(frequency[ranks >= 45].mean()) > float(frequency[ranks < 5].mean()) + 0.3


def test_della_sign_consensus_hand_checked() -> None:
    theta0 = {"w": t(0.0, 0.0, 0.0)}
    tasks = [{"w": t(1.0, -2.0, 1.0)}, {"w": t(3.0, 1.0, -1.0)}]
    # density 1: no pruning; sums 4, -1, 0 -> signs +, -, + (zero sum elects +)
    merged = merge(theta0, tasks, "della", density=1.0)["w"]
    torch.testing.assert_close(merged, t(2.0, -2.0, 1.0))


def test_lowest_ranks_break_ties_by_position() -> None:
    values = t(1.0, 0.5, 1.0, 1.0, 0.2)
    # stable ascending order: 4, 1, 0, 2, 3
    assert lowest_ranks(values, 3).tolist() == [True, True, False, False, True]
    assert lowest_ranks(values, 4).tolist() == [True, True, True, False, True]
    assert not lowest_ranks(values, 0).any() and lowest_ranks(values, 5).all()


def test_breadcrumbs_mask_hand_checked() -> None:
    tau = t(0.1, -0.9, 0.5, 0.3, -0.2, 0.7, 0.05, 0.4, -0.6, 0.8)
    # n = 10, density 0.6 -> keep 6, gamma 0.1 -> drop the top 1 (0.9), bottom 3 (0.05, 0.1, 0.2)
    mask = breadcrumbs_mask(tau, 0.6, 0.1)
    assert mask.tolist() == [False, False, True, True, False, True, False, True, True, True]
    # gamma too large for the density: fewer large ones are dropped
    assert int(breadcrumbs_mask(tau, 0.6, 0.5).sum()) == 6
    assert not breadcrumbs_mask(tau, 0.6, 0.5)[1]
    # tensors smaller than 1/gamma keep their largest int(density n) entries
    assert breadcrumbs_mask(t(0.1, 0.3, 0.2), 0.7, 0.01).tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("breadcrumbs", {"density": 0}, "option 'density' of merge method 'breadcrumbs'"),
        ("breadcrumbs", {"gamma": 1.0}, "option 'gamma' of merge method 'breadcrumbs'"),
        (
            "breadcrumbs",
            {"weights": [1, 2]},
            "option 'weights' of merge method 'breadcrumbs' has 2",
        ),
        ("breadcrumbs", {"weights": ["a"]}, "option 'weights' of merge method 'breadcrumbs'"),
        ("della", {"epsilon": 0.5}, "option 'epsilon' of merge method 'della' must keep"),
        ("della", {"seed": 0.5}, "option 'seed' of merge method 'della'"),
        ("della", {"gamma": 0.1}, "unknown option 'gamma' for merge method 'della'"),
    ],
)
def test_bad_options_name_method_and_option(method: str, options: dict, message: str) -> None:
    assert_bad_option(method, options, message)
