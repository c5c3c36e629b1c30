"""WUDI against the FusionBench-style autograd reference, and its loss going down."""

from __future__ import annotations

import pytest
import torch
from merge_encoders import assert_bad_option, assert_close_states, random_encoders, references

from lightning_simo.merging import merge
from lightning_simo.merging.wudi import wudi_matrix


def wudi_loss(merged: torch.Tensor, taus: list[torch.Tensor]) -> float:
    return float(sum(((merged - tau) @ tau.T).square().sum() / tau.square().sum() for tau in taus))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options", [{"iterations": 30}, {"iterations": 20, "lr": 1e-3, "scaling": 0.5}]
)
def test_wudi_equals_reference(options: dict, dtype: torch.dtype) -> None:
    pretrained, finetuned = random_encoders(dtype=dtype)
    merged = merge(pretrained, finetuned, "wudi", **options)
    expected = references.wudi_reference(pretrained, finetuned, **options)
    assert_close_states(merged, expected, 1e-5 if dtype == torch.float32 else 1e-9)


def test_wudi_is_deterministic_and_lowers_its_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    taus = [torch.randn(12, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    start = sum(taus)
    merged = wudi_matrix(taus, iterations=200, lr=1e-2)
    assert torch.equal(merged, wudi_matrix(taus, iterations=200, lr=1e-2))
    assert wudi_loss(merged, taus) < 0.5 * wudi_loss(start, taus)


def test_wudi_hand_checked_orthogonal_tasks_are_a_fixed_point() -> None:
    # Task vectors with orthogonal rows: M = sum satisfies (M - τ_t) τ_t^T = 0 for all t.
    taus = [torch.zeros(2, 2), torch.zeros(2, 2)]
    taus[0][0, 0], taus[1][1, 1] = 1.0, 2.0
    torch.testing.assert_close(wudi_matrix(taus, iterations=50, lr=0.1), taus[0] + taus[1])


def test_wudi_ignores_a_zero_task_vector() -> None:
    theta0 = {"w": torch.zeros(3, 3)}
    tasks = [{"w": torch.zeros(3, 3)}, {"w": torch.eye(3)}]
    merged = merge(theta0, tasks, "wudi", iterations=10)["w"]
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, torch.eye(3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iterations": 0}, "option 'iterations' of merge method 'wudi'"),
        ({"iterations": 2.5}, "option 'iterations' of merge method 'wudi'"),
        ({"lr": 0}, "option 'lr' of merge method 'wudi'"),
        ({"lr": float("nan")}, "option 'lr' of merge method 'wudi'"),
    ],
)
def test_bad_options_name_method_and_option(options: dict, message: str) -> None:
    assert_bad_option("wudi", options, message)
