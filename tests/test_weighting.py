"""Tests for the joint multi-task loss weightings: closed-form optima, GradNorm balance, DWA."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from lightning_simo.weighting import (
    DWA,
    WEIGHTINGS,
    EqualWeighting,
    GradNorm,
    UncertaintyWeighting,
    Weighting,
    available_weightings,
    build_weighting,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The toys are tiny: thread start-up would dominate their run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(**values: float) -> dict[str, Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


# ---------------------------------------------------------------------------------- equal
def test_equal_mean_and_sum() -> None:
    losses = _losses(seg=1.0, depth=3.0, normal=5.0)
    mean = EqualWeighting(["seg", "depth", "normal"])
    total = EqualWeighting(["seg", "depth", "normal"], reduction="sum")
    assert mean.combine(losses).item() == pytest.approx(3.0)
    assert total.combine(losses).item() == pytest.approx(9.0)
    assert mean.weights() == pytest.approx({"seg": 1 / 3, "depth": 1 / 3, "normal": 1 / 3})
    assert total.weights() == {"seg": 1.0, "depth": 1.0, "normal": 1.0}
    assert mean(losses).item() == pytest.approx(3.0)  # forward is combine
    assert mean.extra_logs() == {}


def test_losses_must_match_tasks() -> None:
    weighting = EqualWeighting(["seg", "depth"])
    with pytest.raises(KeyError, match="missing"):
        weighting.combine(_losses(seg=1.0))
    with pytest.raises(KeyError, match="unexpected"):
        weighting.combine(_losses(seg=1.0, depth=1.0, normal=1.0))


def test_invalid_construction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        EqualWeighting(["a"], reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task type"):
        EqualWeighting(["a"], {"a": "segmentation"})
    with pytest.raises(ValueError, match="not in"):
        EqualWeighting(["a"], {"b": "regression"})
    with pytest.raises(ValueError, match="duplicate"):
        EqualWeighting(["a", "a"])


# ---------------------------------------------------------------------------- uncertainty
def _optimise_log_var(weighting: UncertaintyWeighting, losses: dict[str, Tensor]) -> Tensor:
    """Adam on s alone, the losses held fixed (a toy whose loss scale is a constant c)."""
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        weighting.combine(losses).backward()
        opt.step()
    return weighting.log_var.detach()


def test_uncertainty_per_type_reaches_closed_form_optimum() -> None:
    # regression: 1/2 e^{-s} c + 1/2 s -> s* = log c; classification: e^{-s} c + 1/2 s -> log 2c.
    c_reg, c_cls = 4.0, 0.3
    weighting = UncertaintyWeighting(
        ["depth", "seg"], {"depth": "regression", "seg": "classification"}
    )
    log_var = _optimise_log_var(weighting, _losses(depth=c_reg, seg=c_cls))
    assert log_var[0].item() == pytest.approx(math.log(c_reg), abs=1e-3)
    assert log_var[1].item() == pytest.approx(math.log(2 * c_cls), abs=1e-3)
    # At the optimum the effective multipliers are 1/(2c) for either type.
    weights = weighting.weights()
    assert weights["depth"] == pytest.approx(1 / (2 * c_reg), rel=2e-2)
    assert weights["seg"] == pytest.approx(1 / (2 * c_cls), rel=2e-2)
    logs = weighting.extra_logs()
    assert set(logs) == {"log_var/depth", "log_var/seg"}
    assert logs["log_var/depth"] == pytest.approx(log_var[0].item())


def test_uncertainty_regression_form_ignores_types() -> None:
    weighting = UncertaintyWeighting(["a", "b"], {"a": "classification"}, form="regression")
    log_var = _optimise_log_var(weighting, _losses(a=0.3, b=7.0))
    assert log_var.tolist() == pytest.approx([math.log(0.3), math.log(7.0)], abs=1e-3)


def test_uncertainty_libmtl_form() -> None:
    weighting = UncertaintyWeighting(["a", "b"], form="libmtl")
    assert weighting.log_var.tolist() == [-0.5, -0.5]
    s = -0.5
    expected = 2.0 / (2 * math.exp(s)) + s / 2 + 5.0 / (2 * math.exp(s)) + s / 2
    assert weighting.combine(_losses(a=2.0, b=5.0)).item() == pytest.approx(expected, rel=1e-6)
    # L / (2 e^s) + s / 2 is minimised at s* = log L.
    log_var = _optimise_log_var(weighting, _losses(a=2.0, b=5.0))
    assert log_var.tolist() == pytest.approx([math.log(2.0), math.log(5.0)], abs=1e-3)


def test_uncertainty_total_can_be_negative_and_is_checkpointed() -> None:
    weighting = UncertaintyWeighting(["a"], init=math.log(0.1))
    total = weighting.combine(_losses(a=0.1)).item()
    assert total == pytest.approx(0.5 + 0.5 * math.log(0.1), rel=1e-6)
    assert total < 0
    assert any(p is weighting.log_var for p in weighting.parameters())
    restored = UncertaintyWeighting(["a"])
    restored.load_state_dict(weighting.state_dict())
    assert torch.equal(restored.log_var, weighting.log_var)
    with pytest.raises(ValueError, match="form"):
        UncertaintyWeighting(["a"], form="kendall")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- gradnorm
class _TwoTaskToy(nn.Module):
    """A shared linear layer W and two regression heads; task "b"'s loss is scaled by 100."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.x = torch.randn(64, 8, generator=gen)
        self.y_a = self.x @ torch.randn(8, 1, generator=gen)
        self.y_b = self.x @ torch.randn(8, 1, generator=gen)
        self.shared = nn.Linear(8, 16)
        self.head_a = nn.Linear(16, 1)
        self.head_b = nn.Linear(16, 1)

    def losses(self) -> dict[str, Tensor]:
        z = torch.relu(self.shared(self.x))
        return {
            "a": ((self.head_a(z) - self.y_a) ** 2).mean(),
            "b": 100.0 * ((self.head_b(z) - self.y_b) ** 2).mean(),
        }


def _balance(gradnorm: GradNorm, toy: _TwoTaskToy) -> Tensor:
    """G_t / (mean_j G_j * r_t^alpha), computed here from the definitions (1 = on target)."""
    losses = toy.losses()
    w = gradnorm.task_weights
    grads = [
        torch.autograd.grad(w[i] * losses[t], toy.shared.weight, retain_graph=True)[0]
        for i, t in enumerate(("a", "b"))
    ]
    g = torch.stack([gr.norm() for gr in grads])
    ratio = torch.stack([losses["a"], losses["b"]]).detach() / gradnorm.initial_losses
    r = ratio / ratio.mean()
    return g / (g.mean() * r**gradnorm.alpha)


def _train(gradnorm: GradNorm, toy: _TwoTaskToy, steps: int, lr: float = 3e-4) -> list[Tensor]:
    opt = torch.optim.Adam(toy.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        total = gradnorm.step(toy.losses(), [toy.shared.weight])
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(gradnorm.task_weights.clone())
    return history


@pytest.mark.parametrize("seed", [0, 1])
def test_gradnorm_balances_gradient_norms(seed: int) -> None:
    toy = _TwoTaskToy(seed)
    gradnorm = GradNorm(["a", "b"])
    assert gradnorm.requires_manual_backward
    history = _train(gradnorm, toy, steps=250)
    stacked = torch.stack(history)
    assert torch.allclose(stacked.sum(dim=1), torch.full((250,), 2.0), atol=1e-5)
    assert (stacked > 0).all()
    balance = _balance(gradnorm, toy)
    assert balance.tolist() == pytest.approx([1.0, 1.0], abs=0.05)  # reached: within 0.01
    # The 100x loss has a ~100x larger raw gradient, so it gets the much smaller weight.
    w_a, w_b = gradnorm.task_weights.tolist()
    assert w_b < 0.05 * w_a
    assert gradnorm.weights() == pytest.approx({"a": w_a, "b": w_b})
    logs = gradnorm.extra_logs()
    assert set(logs) == {
        "gradnorm/loss",
        "gradnorm/grad_norm/a",
        "gradnorm/grad_norm/b",
        "gradnorm/inverse_rate/a",
        "gradnorm/inverse_rate/b",
    }


def test_gradnorm_linear_space_keeps_invariants() -> None:
    toy = _TwoTaskToy(0)
    gradnorm = GradNorm(["a", "b"], space="linear")
    stacked = torch.stack(_train(gradnorm, toy, steps=150))
    assert torch.allclose(stacked.sum(dim=1), torch.full((150,), 2.0), atol=1e-5)
    assert (stacked >= gradnorm.min_weight * 0.99).all()
    assert stacked[-1, 1] < 0.1 * stacked[-1, 0]


def test_gradnorm_step_leaves_model_gradients_alone() -> None:
    toy = _TwoTaskToy(0)
    gradnorm = GradNorm(["a", "b"])
    gradnorm.task_weights.copy_(torch.tensor([1.5, 0.5]))
    losses = toy.losses()
    total = gradnorm.step(losses, [toy.shared.weight])
    assert all(p.grad is None for p in toy.parameters())
    # The total uses the weights in force before the update, and carries no graph to w.
    expected = 1.5 * losses["a"].detach() + 0.5 * losses["b"].detach()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.equal(gradnorm.task_weights, torch.tensor([1.5, 0.5]))
    total.backward()
    expected_grad = torch.autograd.grad(
        1.5 * toy.losses()["a"] + 0.5 * toy.losses()["b"], toy.shared.weight
    )[0]
    assert torch.allclose(toy.shared.weight.grad, expected_grad, rtol=1e-5, atol=1e-6)
    # combine() weights with the current (updated) weights, detached.
    w = gradnorm.task_weights
    value = gradnorm.combine(toy.losses())
    assert value.item() == pytest.approx((w[0] * losses["a"] + w[1] * losses["b"]).item(), rel=1e-5)


def test_gradnorm_state_dict_round_trip() -> None:
    toy = _TwoTaskToy(0)
    gradnorm = GradNorm(["a", "b"])
    _train(gradnorm, toy, steps=20)
    restored = GradNorm(["a", "b"])
    restored.load_state_dict(gradnorm.state_dict())
    assert torch.equal(restored.task_weights, gradnorm.task_weights)
    assert torch.equal(restored.initial_losses, gradnorm.initial_losses)
    assert bool(restored.has_initial_losses)
    # The weight optimiser's state comes back too: the next update is identical.
    losses = toy.losses()
    gradnorm.step(losses, [toy.shared.weight])
    restored.step(losses, [toy.shared.weight])
    assert torch.equal(restored.task_weights, gradnorm.task_weights)


def test_gradnorm_applies_reduce_fn() -> None:
    toy = _TwoTaskToy(0)
    other_rank = torch.tensor([3.0, 5.0, 2.0, 40.0])  # [G_a, G_b, L_a, L_b] seen elsewhere
    seen: list[Tensor] = []

    def fake_all_reduce_mean(values: Tensor) -> Tensor:
        seen.append(values.clone())
        return (values + other_rank) / 2

    gradnorm = GradNorm(["a", "b"], reduce_fn=fake_all_reduce_mean)
    losses = toy.losses()
    gradnorm.step(losses, [toy.shared.weight])
    assert len(seen) == 1 and seen[0].shape == (4,)
    local_losses = torch.stack([losses["a"], losses["b"]]).detach()
    assert torch.allclose(seen[0][2:], local_losses)
    # L(0) and the logged gradient norms are the reduced values, not the local ones.
    assert torch.allclose(gradnorm.initial_losses, (local_losses + other_rank[2:]) / 2)
    assert torch.allclose(gradnorm.last_grad_norms, (seen[0][:2] + other_rank[:2]) / 2)


def test_gradnorm_first_epoch_initial_loss() -> None:
    toy = _TwoTaskToy(0)
    gradnorm = GradNorm(["a", "b"], initial_loss="first_epoch", reduce_fn=lambda v: v)
    seen = []
    opt = torch.optim.SGD(toy.parameters(), lr=1e-4)
    for _ in range(3):
        losses = toy.losses()
        seen.append(torch.stack([losses["a"], losses["b"]]).detach())
        total = gradnorm.step(losses, [toy.shared.weight])
        assert total.item() == pytest.approx((losses["a"] + losses["b"]).item(), rel=1e-6)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert gradnorm.task_weights.tolist() == [1.0, 1.0]
    assert not bool(gradnorm.has_initial_losses)
    gradnorm.on_epoch_end({"a": 123.0, "b": 456.0})  # the accumulated reduced mean wins
    assert torch.allclose(gradnorm.initial_losses, torch.stack(seen).mean(dim=0))
    gradnorm.step(toy.losses(), [toy.shared.weight])
    assert gradnorm.task_weights.sum().item() == pytest.approx(2.0, abs=1e-6)
    assert gradnorm.task_weights.tolist() != [1.0, 1.0]


# ------------------------------------------------------------------------------------ dwa
def _softmax_weights(ratios: list[float], temperature: float) -> list[float]:
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def test_dwa_matches_hand_computation() -> None:
    epochs = [
        {"seg": 2.0, "depth": 1.0, "normal": 0.5},
        {"seg": 1.6, "depth": 0.9, "normal": 0.45},
        {"seg": 1.0, "depth": 0.85, "normal": 0.44},
        {"seg": 0.9, "depth": 0.5, "normal": 0.40},
    ]
    dwa = DWA(["seg", "depth", "normal"], temperature=2.0)
    assert dwa.weights() == {"seg": 1.0, "depth": 1.0, "normal": 1.0}  # epoch 0
    dwa.on_epoch_end(epochs[0])
    assert dwa.weights() == {"seg": 1.0, "depth": 1.0, "normal": 1.0}  # epoch 1
    for k in range(1, len(epochs)):
        dwa.on_epoch_end(epochs[k])
        ratios = [epochs[k][t] / epochs[k - 1][t] for t in ("seg", "depth", "normal")]
        expected = _softmax_weights(ratios, 2.0)
        weights = dwa.weights()
        assert list(weights.values()) == pytest.approx(expected, rel=1e-6)
        assert sum(weights.values()) == pytest.approx(3.0, rel=1e-6)
    # After epoch 3 "depth" fell the most (0.85 -> 0.5), so it gets the smallest weight.
    weights = dwa.weights()
    assert weights["depth"] < weights["seg"] < weights["normal"]
    losses = _losses(seg=1.0, depth=2.0, normal=3.0)
    expected_total = weights["seg"] * 1.0 + weights["depth"] * 2.0 + weights["normal"] * 3.0
    assert dwa.combine(losses).item() == pytest.approx(expected_total, rel=1e-6)


def test_dwa_state_round_trip() -> None:
    dwa = DWA(["a", "b"], temperature=1.5)
    dwa.on_epoch_end({"a": 1.0, "b": 1.0})
    dwa.on_epoch_end({"a": 0.5, "b": 0.9})
    restored = DWA(["a", "b"], temperature=1.5)
    restored.load_state_dict(dwa.state_dict())
    assert restored.weights() == dwa.weights()
    dwa.on_epoch_end({"a": 0.45, "b": 0.6})
    restored.on_epoch_end({"a": 0.45, "b": 0.6})
    assert restored.weights() == dwa.weights()
    assert list(restored.weights().values()) == pytest.approx(
        _softmax_weights([0.45 / 0.5, 0.6 / 0.9], 1.5), rel=1e-6
    )


# ------------------------------------------------------------------------------- registry
def test_build_weighting() -> None:
    names = available_weightings()
    assert {"dwa", "equal", "gradnorm", "uncertainty", "upgrad", "pcgrad", "famo"} <= set(names)
    assert set(WEIGHTINGS) == set(names)
    built = build_weighting("GradNorm", ["a", "b"], {"a": "classification"}, alpha=0.5)
    assert isinstance(built, GradNorm) and built.alpha == 0.5
    assert built.task_types == {"a": "classification", "b": "regression"}
    assert isinstance(build_weighting("equal", ["a"], reduction="sum"), EqualWeighting)
    classes = [cls for _, cls in WEIGHTINGS.items()]
    loss_based = [cls for cls in classes if not cls.requires_jacobian]
    assert all(cls.requires_manual_backward == (cls is GradNorm) for cls in loss_based)
    assert all(issubclass(cls, Weighting) for cls in classes)
    with pytest.raises(ValueError, match="dwa, equal, fairgrad") as info:
        build_weighting("pcgrad2", ["a"])
    assert "pcgrad2" in str(info.value) and "model.weighting" in str(info.value)
