"""Gradient aggregators and LibMTL's loss weightings against their references.

For the same sequences of jacobians and losses (conflicting, aligned, one dominant task,
near-collinear; T = 2, 3, 5) every method's directions must equal its reference to 1e-4 relative:
TorchJD's aggregator for what TorchJD provides, and for the native methods a re-implementation of
LibMTL's formulas written here, line by line from LibMTL's ``weighting/*.py``. Randomised methods
must be seed-reproducible and keep their defining property; non-finite input must be refused by
name with the state untouched.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from test_weighting import _single_thread  # noqa: F401 - the toys run on one thread
from torch import Tensor
from torchjd import aggregation as jd

from lightning_simo.weighting import (
    WEIGHTINGS,
    NonFiniteInputError,
    Weighting,
    build_weighting,
)
from lightning_simo.weighting.base import generator_state
from lightning_simo.weighting.dual_cone import NNLSProjector

KINDS = ("conflicting", "aligned", "dominant", "collinear")
SIZES = (2, 3, 5)
STEPS = 3
P = 24
HAS_CVXPY = find_spec("cvxpy") is not None and find_spec("ecos") is not None
TORCHJD_GRAMIAN = ["upgrad", "dualproj", "imtl", "aligned_mtl", "fairgrad", "mgda"]


def scenario(
    kind: str, tasks: int, steps: int = STEPS, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``steps`` (jacobian, losses) pairs of one geometry."""
    gen = torch.Generator().manual_seed(seed + 97 * tasks + KINDS.index(kind))
    out = []
    for _ in range(steps):
        base = torch.randn(P, generator=gen)
        noise = torch.randn(tasks, P, generator=gen)
        if kind == "conflicting":
            rows = noise.clone()
            rows[1] = -0.8 * rows[0] + 0.3 * noise[1]
        elif kind == "aligned":
            rows = base + 0.2 * noise
        elif kind == "dominant":
            rows = noise.clone()
            rows[0] = 30.0 * rows[0]
        else:  # near-collinear: every row almost the same direction, different lengths
            scales = torch.linspace(0.5, 2.0, tasks)[:, None]
            rows = scales * base + 1e-3 * noise
        losses = 0.2 + torch.rand(tasks, generator=gen) * 2.0
        out.append((rows.float(), losses.float()))
    return out


def names(tasks: int) -> list[str]:
    return [f"t{i}" for i in range(tasks)]


def run(method: Weighting, sequence: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    return [method.aggregate(j.clone(), loss.clone()) for j, loss in sequence]


def assert_close(got: list[Tensor], want: list[Tensor], rtol: float = 1e-4) -> None:
    for step, (a, b) in enumerate(zip(got, want)):
        error = (a.double() - b.double()).norm()
        assert error <= rtol * b.double().norm() + 1e-7, (step, a, b)


CASES = list(itertools.product(KINDS, SIZES))


# --------------------------------------------------------------------------- references
def seeded_global(seed: int) -> None:
    """Put torch's global generator where a method built with ``seed`` starts."""
    torch.set_rng_state(generator_state(seed))


def dual_cone_weights(u: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``argmin_{v >= u} v^T G v`` by enumerating active sets (KKT), independent of NNLS."""
    m = len(u)
    best, best_value = None, np.inf
    for free in itertools.product([False, True], repeat=m):
        free_idx = [i for i in range(m) if free[i]]
        v = u.copy()
        if free_idx:
            fixed_idx = [i for i in range(m) if not free[i]]
            a = gram[np.ix_(free_idx, free_idx)]
            rhs = (
                -gram[np.ix_(free_idx, fixed_idx)] @ u[fixed_idx]
                if fixed_idx
                else np.zeros(len(free_idx))
            )
            v[free_idx] = np.linalg.solve(a, rhs)
        if (v < u - 1e-10).any():
            continue
        grad = gram @ v  # multipliers of the active (fixed) constraints must be >= 0
        if any(grad[i] < -1e-9 for i in range(m) if not free[i]):
            continue
        value = v @ gram @ v
        if value < best_value:
            best, best_value = v, value
    assert best is not None
    return best


def regularised(gram: Tensor) -> np.ndarray:
    g = gram.double()
    trace = g.diagonal().sum()
    g = torch.zeros_like(g) if trace < 1e-4 else g / trace
    return (g + 1e-4 * torch.eye(len(g), dtype=g.dtype)).numpy()


def upgrad_reference(j: Tensor, losses: Tensor) -> Tensor:
    gram = regularised(j @ j.T)
    m = len(gram)
    w = sum(dual_cone_weights(np.eye(m)[i] / m, gram) for i in range(m))
    return torch.as_tensor(w, dtype=torch.float32) @ j


def dualproj_reference(j: Tensor, losses: Tensor) -> Tensor:
    gram = regularised(j @ j.T)
    w = dual_cone_weights(np.ones(len(gram)) / len(gram), gram)
    return torch.as_tensor(w, dtype=torch.float32) @ j


def libmtl_cagrad(j: Tensor, calpha: float = 0.5, rescale: int = 1) -> Tensor:
    """LibMTL ``CAGrad.backward``'s direction."""
    n = j.shape[0]
    gg = torch.matmul(j, j.t()).cpu()
    g0_norm = (gg.mean() + 1e-8).sqrt()
    x_start = np.ones(n) / n
    bnds = tuple((0, 1) for _ in x_start)
    cons = {"type": "eq", "fun": lambda x: 1 - sum(x)}
    a = gg.numpy()
    b = x_start.copy()
    c = (calpha * g0_norm + 1e-8).item()

    def objfn(x: np.ndarray) -> float:
        return (
            x.reshape(1, -1).dot(a).dot(b.reshape(-1, 1))
            + c * np.sqrt(x.reshape(1, -1).dot(a).dot(x.reshape(-1, 1)) + 1e-8)
        ).sum()

    res = minimize(objfn, x_start, bounds=bnds, constraints=cons)
    ww = torch.Tensor(res.x)
    gw = (j * ww.view(-1, 1)).sum(0)
    lmbda = c / (gw.norm() + 1e-8)
    g = j.mean(0) + lmbda * gw
    return {0: g, 1: g / (1 + calpha**2), 2: g / (1 + calpha)}[rescale]


class LibMTLDBMTL:
    """LibMTL ``DB_MTL.backward``'s direction, with its ``grad_buffer`` and ``step``."""

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        self.beta, self.beta_sigma, self.step, self.grad_buffer = beta, beta_sigma, 0, None

    def __call__(self, j: Tensor, losses: Tensor) -> Tensor:
        self.step += 1
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros_like(j)
        batch_grads = j / (losses + 1e-8)[:, None]  # the jacobian of log(L + 1e-8)
        self.grad_buffer = batch_grads + (self.beta / self.step**self.beta_sigma) * (
            self.grad_buffer - batch_grads
        )
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        return sum(alpha[i] * self.grad_buffer[i] for i in range(len(alpha)))


def mgda_reference(normalization: str) -> Callable[[Tensor, Tensor], Tensor]:
    def direction(j: Tensor, losses: Tensor) -> Tensor:
        norms = j.pow(2).sum(-1).sqrt()
        gn = {"none": torch.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}
        scaled = j / gn[normalization][:, None]
        return jd.MGDA()(scaled)

    return direction


TORCHJD_REFERENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "imtl": lambda j, _: jd.IMTLG()(j),
    "aligned_mtl": lambda j, _: jd.AlignedMTL(pref_vector=torch.ones(j.shape[0]))(j),
    "fairgrad": lambda j, _: jd.FairGrad(alpha=1.0)(j),
    "mgda": mgda_reference("none"),
}


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_torchjd_gramian_methods_equal_torchjd(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks)
    for name, reference in TORCHJD_REFERENCES.items():
        got = run(build_weighting(name, names(tasks)), sequence)
        assert_close(got, [reference(j, loss) for j, loss in sequence])


@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_upgrad_and_dualproj_solve_the_dual_cone_problem(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks)
    for name, reference in (("upgrad", upgrad_reference), ("dualproj", dualproj_reference)):
        got = run(build_weighting(name, names(tasks)), sequence)
        assert_close(got, [reference(j, loss) for j, loss in sequence])
        # the defining property, no task is hurt, holds up to the Gramian's regularisation
        # (1e-7: TorchJD >= 0.18 normalises the float32 Gramian first, and quadprog refuses the
        # near-collinear ones as not positive definite below about 1e-8)
        exact = run(build_weighting(name, names(tasks), reg_eps=1e-7), sequence)
        for (j, _), d in zip(sequence, exact):
            assert (j @ d >= -1e-4 * j.norm(dim=1) * d.norm()).all()


@pytest.mark.skipif(find_spec("quadprog") is None, reason="TorchJD's quadprog projector absent")
def test_nnls_projector_equals_torchjd_quadprog() -> None:
    for j, _ in scenario("conflicting", 5):
        assert_close([jd.UPGrad(projector=NNLSProjector())(j)], [jd.UPGrad()(j)])


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations(normalization: str) -> None:
    sequence = scenario("dominant", 3)
    got = run(build_weighting("mgda", names(3), normalization=normalization), sequence)
    assert_close(got, [mgda_reference(normalization)(j, loss) for j, loss in sequence])


def test_aligned_mtl_mean_is_torchjd_default() -> None:
    sequence = scenario("conflicting", 3)
    got = run(build_weighting("aligned_mtl", names(3), reduction="mean"), sequence)
    assert_close(got, [jd.AlignedMTL()(j) for j, _ in sequence])


@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_seeded_methods_equal_torchjd_and_reproduce(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks, steps=4)
    references = {
        "pcgrad": jd.PCGrad(),
        "graddrop": jd.GradDrop(leak=torch.full((tasks,), 0.1)),
        "gradvac": jd.GradVac(beta=0.5),
    }
    options = {"pcgrad": {}, "graddrop": {"leak": 0.1}, "gradvac": {"beta": 0.5}}
    for name, reference in references.items():
        method = build_weighting(name, names(tasks), seed=7, **options[name])
        got = run(method, sequence)
        seeded_global(7)
        assert_close(got, [reference(j) for j, _ in sequence])
        again = run(build_weighting(name, names(tasks), seed=7, **options[name]), sequence)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_seeds_change_random_draws() -> None:
    sequence = scenario("conflicting", 5, steps=6)
    a = run(build_weighting("pcgrad", names(5), seed=0), sequence)
    b = run(build_weighting("pcgrad", names(5), seed=1), sequence)
    assert any(not torch.allclose(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_never_conflicts_with_either_task(kind: str) -> None:
    method = build_weighting("pcgrad", names(2), seed=3)
    for j, loss in scenario(kind, 2, steps=20, seed=5):
        d = method.aggregate(j, loss)
        assert (j @ d >= -1e-4 * j.norm(dim=1) * d.norm()).all()


@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_cagrad_equals_libmtl(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks)
    for rescale in (0, 1, 2):
        got = run(build_weighting("cagrad", names(tasks), rescale=rescale), sequence)
        assert_close(got, [libmtl_cagrad(j, rescale=rescale) for j, _ in sequence])


@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_db_mtl_equals_libmtl(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks, steps=5)
    for beta_sigma in (0.0, 0.5):
        got = run(build_weighting("db_mtl", names(tasks), beta_sigma=beta_sigma), sequence)
        reference = LibMTLDBMTL(beta_sigma=beta_sigma)
        assert_close(got, [reference(j, loss) for j, loss in sequence])


@pytest.mark.skipif(not HAS_CVXPY, reason="TorchJD's Nash-MTL needs cvxpy and ecos")
@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_nash_mtl_equals_torchjd(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks)
    reference = jd.NashMTL(n_tasks=tasks)
    got = run(build_weighting("nash_mtl", names(tasks)), sequence)
    # With one dominant task among five, ECOS stops at its 100-iteration cap ("Solution may be
    # inaccurate"), so the two solves agree only to the solver's accuracy there.
    rtol = 1e-2 if (kind, tasks) == ("dominant", 5) else 1e-4
    assert_close(got, [reference(j) for j, _ in sequence], rtol)


# ---------------------------------------------------------------------- loss weightings
def loss_gradient(method: Weighting, losses: Tensor) -> Tensor:
    """d(combine)/dL: the multipliers of the task gradients in the applied direction."""
    leaf = losses.clone().requires_grad_(True)
    total = method.combine(dict(zip(method.tasks, leaf.unbind())))
    (grad,) = torch.autograd.grad(total, leaf)
    return grad


@pytest.mark.parametrize(("kind", "tasks"), CASES)
def test_famo_equals_libmtl(kind: str, tasks: int) -> None:
    sequence = scenario(kind, tasks, steps=5)
    method = build_weighting("famo", names(tasks))
    # LibMTL FAMO: init_param, backward, update_w
    w = torch.zeros(tasks, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=0.025, weight_decay=1e-3)
    min_losses = torch.zeros(tasks)
    for (j, losses), (_, after) in zip(sequence, sequence[1:]):
        got = loss_gradient(method, losses) @ j
        ref_losses = losses.clone().requires_grad_(True)
        z = F.softmax(w, -1)
        d_gap = ref_losses - min_losses + 1e-8
        c = (z / d_gap).sum().detach()
        (ref_grad,) = torch.autograd.grad((d_gap.log() * z / c).sum(), ref_losses)
        assert_close([got], [ref_grad @ j])
        curr = after * 0.9
        method.update(curr)
        delta = (losses - min_losses + 1e-8).log() - (curr - min_losses + 1e-8).log()
        (d,) = torch.autograd.grad(F.softmax(w, -1), w, grad_outputs=delta.detach())
        w_opt.zero_grad(set_to_none=False)
        w.grad = d
        w_opt.step()
        assert_close([method.logits], [w.detach()])


@pytest.mark.parametrize("tasks", SIZES)
def test_stch_equals_libmtl(tasks: int) -> None:
    sequence = scenario("dominant", tasks, steps=4)
    method = build_weighting("stch", names(tasks), mu=0.5, warmup_epoch=1)
    seen = []
    for epoch in range(3):
        for j, losses in sequence:
            got = loss_gradient(method, losses) @ j
            leaf = losses.clone().requires_grad_(True)
            if epoch <= 1:  # LibMTL: epoch < warmup_epoch and epoch == warmup_epoch
                ref = torch.log(leaf + 1e-20).sum()
                if epoch == 1:
                    seen.append(losses)
            else:
                nadir = torch.stack(seen).mean(0)
                logs = torch.log(leaf / nadir + 1e-20)
                reg = logs - torch.max(logs.data).detach()
                ref = 0.5 * torch.log(torch.sum(torch.exp(reg / 0.5))) * tasks
            (grad,) = torch.autograd.grad(ref, leaf)
            assert_close([got], [grad @ j])
        epoch_means = torch.stack([loss for _, loss in sequence]).mean(0)
        method.on_epoch_end(dict(zip(method.tasks, epoch_means.tolist())))


def test_rlw_is_seeded_softmax_of_normal_draws() -> None:
    method = build_weighting("rlw", names(3), seed=11)
    losses = torch.tensor([1.0, 2.0, 3.0])
    got = [loss_gradient(method, losses) for _ in range(4)]
    seeded_global(11)
    want = [F.softmax(torch.randn(3), dim=-1) for _ in range(4)]
    assert_close(got, want)
    again = build_weighting("rlw", names(3), seed=11)
    assert torch.equal(loss_gradient(again, losses), got[0])


# ------------------------------------------------------------------------- refusals, state
def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Bit-equal state dicts, NaN placeholders included."""
    return a.keys() == b.keys() and all(
        x.shape == y.shape and bool((x == y).logical_or(x.isnan() & y.isnan()).all())
        if x.is_floating_point()
        else torch.equal(x, y)
        for x, y in ((a[k], b[k]) for k in a)
    )


def _build_any(name: str, tasks: int) -> Weighting:
    return build_weighting(name, names(tasks))


AVAILABLE = [n for n in WEIGHTINGS.names() if n != "nash_mtl" or HAS_CVXPY]
NEW_LOSS_WEIGHTINGS = ["famo", "rlw", "stch"]


@pytest.mark.parametrize("name", [n for n in AVAILABLE if WEIGHTINGS.get(n).requires_jacobian])
def test_aggregators_refuse_non_finite_input_and_keep_state(name: str) -> None:
    method = _build_any(name, 3)
    j, losses = scenario("conflicting", 3, steps=1)[0]
    method.aggregate(j, losses)  # some state to keep
    before = copy.deepcopy(method.state_dict())
    for bad_j, bad_losses in (
        (j.clone().index_fill_(1, torch.tensor([3]), float("nan")), losses),
        (j, losses.clone().index_fill_(0, torch.tensor([1]), float("inf"))),
    ):
        with pytest.raises(NonFiniteInputError, match=f"weighting '{name}'"):
            method.aggregate(bad_j, bad_losses)
        assert same_state(before, method.state_dict()), name


@pytest.mark.parametrize("name", NEW_LOSS_WEIGHTINGS)
def test_loss_weightings_refuse_non_finite_losses(name: str) -> None:
    method = _build_any(name, 2)
    method.combine({"t0": torch.tensor(1.0), "t1": torch.tensor(2.0)})
    before = copy.deepcopy(method.state_dict())
    with pytest.raises(NonFiniteInputError, match=f"weighting '{name}'"):
        method.combine({"t0": torch.tensor(float("nan")), "t1": torch.tensor(2.0)})
    if name == "famo":
        with pytest.raises(NonFiniteInputError, match="weighting 'famo'"):
            method.update(torch.tensor([1.0, float("inf")]))
    assert same_state(before, method.state_dict())


def test_famo_refuses_non_positive_losses() -> None:
    with pytest.raises(ValueError, match="famo.*positive"):
        _build_any("famo", 2).combine({"t0": torch.tensor(-1.0), "t1": torch.tensor(2.0)})


def test_state_round_trips_through_state_dict() -> None:
    """A fresh strategy loaded from a state dict continues exactly (resume at step level)."""
    sequence = scenario("conflicting", 3, steps=4)
    for name in ("gradvac", "pcgrad", "db_mtl", "graddrop"):
        first = _build_any(name, 3)
        run(first, sequence[:2])
        second = _build_any(name, 3)
        second.load_state_dict(first.state_dict())
        assert_close(run(second, sequence[2:]), run(first, sequence[2:]))
        assert all(torch.equal(a, b) for a, b in zip(run(second, sequence), run(first, sequence)))


def test_cosines_and_weights_for_logging() -> None:
    j, losses = scenario("conflicting", 3, steps=1)[0]
    method = _build_any("upgrad", 3)
    assert method.extra_logs() == {}
    d = method.aggregate(j, losses)
    logs = method.extra_logs()
    cosine = float(j[0] @ d / (j[0].norm() * d.norm()))
    assert logs["cosine/t0"] == pytest.approx(cosine, rel=1e-5)
    assert set(method.weights()) == set(method.tasks)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="normalization"):
        build_weighting("mgda", ["a", "b"], normalization="max")
    with pytest.raises(ValueError, match="rescale"):
        build_weighting("cagrad", ["a", "b"], rescale=3)
    with pytest.raises(ValueError, match="reduction"):
        build_weighting("aligned_mtl", ["a", "b"], reduction="max")
    with pytest.raises(ValueError, match="expects a \\(2, P\\) jacobian"):
        build_weighting("upgrad", ["a", "b"]).aggregate(torch.ones(3, 4), torch.ones(3))
    if not HAS_CVXPY:
        with pytest.raises(ValueError, match="nash_mtl.*cvxpy"):
            build_weighting("nash_mtl", ["a", "b"])


def test_gramian_weights_match_the_jacobian_path() -> None:
    """The features path (weights from a Gramian) gives the same weights and cosines."""
    j, losses = scenario("conflicting", 3, steps=1)[0]
    from_jacobian = _build_any("imtl", 3)
    direction = from_jacobian.aggregate(j, losses)
    from_gramian = _build_any("imtl", 3)
    weights = from_gramian.gramian_weights(j @ j.T, losses)
    torch.testing.assert_close(weights @ j, direction, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        from_gramian.last_cosines, from_jacobian.last_cosines, rtol=1e-4, atol=1e-5
    )
