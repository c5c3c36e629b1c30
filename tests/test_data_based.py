"""RegMean and Fisher merging against FusionBench's formulas, on small hand-checkable cases, and
the statistics gathered for them."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_simo.merging import merge
from lightning_simo.merging.data_based import reduce_non_diagonal
from lightning_simo.merging.statistics import diagonal_fisher, input_grams


def t(*values: float) -> Tensor:
    return torch.tensor(values)


def _models() -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "fc.weight": (3, 4),
        "fc.bias": (3,),
        "norm.weight": (4,),
        "conv.weight": (2, 4, 1, 1),
    }
    pretrained = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    pretrained["norm.num_batches_tracked"] = torch.tensor(5)
    finetuned = [
        {
            k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1
            for k, v in pretrained.items()
        }
        for _ in range(3)
    ]
    return pretrained, finetuned


def _fusionbench_regmean(weights: list[Tensor], grams: list[Tensor], ratio: float) -> Tensor:
    """FusionBench's merging_with_regmean_weights for one linear weight (written from its formula)."""
    reduced = [
        g * (torch.diag(torch.ones(g.shape[0]) - ratio) + torch.full_like(g, ratio)) for g in grams
    ]
    products = [g @ w.transpose(0, 1) for g, w in zip(reduced, weights)]
    return (torch.inverse(sum(reduced)) @ sum(products)).transpose(0, 1)


def test_reduce_non_diagonal_keeps_the_diagonal() -> None:
    gram = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert torch.equal(reduce_non_diagonal(gram, 0.5), torch.tensor([[2.0, 0.5], [0.5, 2.0]]))
    assert torch.equal(reduce_non_diagonal(gram, 1.0), gram)


def test_regmean_weighs_each_input_dimension_by_its_gram() -> None:
    pretrained = {"fc.weight": torch.zeros(2, 2)}
    w1, w2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    grams = [{"fc.weight": torch.diag(t(3.0, 1.0))}, {"fc.weight": torch.diag(t(1.0, 1.0))}]
    out = merge(pretrained, [{"fc.weight": w1}, {"fc.weight": w2}], "regmean", grams=grams)
    # input 0: (3 w1 + w2) / 4; input 1: (w1 + w2) / 2
    expected = torch.tensor([[(3 + 5) / 4, (2 + 6) / 2], [(9 + 7) / 4, (4 + 8) / 2]])
    torch.testing.assert_close(out["fc.weight"], expected)


def test_regmean_equals_fusionbench_and_averages_everything_else() -> None:
    pretrained, finetuned = _models()
    gen = torch.Generator().manual_seed(1)
    grams = []
    for _ in finetuned:
        x = torch.randn(16, 4, generator=gen)
        grams.append({"fc.weight": x.T @ x / 16})
    out = merge(pretrained, finetuned, "regmean", grams=grams, reduce_non_diagonal=0.6)
    weights = [ft["fc.weight"] for ft in finetuned]
    expected = _fusionbench_regmean(weights, [g["fc.weight"] for g in grams], 0.6)
    scale = max(float((w - pretrained["fc.weight"]).abs().max()) for w in weights)
    assert float((out["fc.weight"] - expected).abs().max()) <= 1e-5 * scale
    for key in ("fc.bias", "norm.weight", "conv.weight"):  # no Gram: the mean (FusionBench)
        torch.testing.assert_close(out[key], torch.stack([ft[key] for ft in finetuned]).mean(0))
    assert out["norm.num_batches_tracked"].item() == 5  # integer buffers are θ0's
    wide = merge(
        {k: v.double() if v.is_floating_point() else v for k, v in pretrained.items()},
        [
            {k: v.double() if v.is_floating_point() else v for k, v in ft.items()}
            for ft in finetuned
        ],
        "regmean",
        grams=grams,
    )
    assert wide["fc.weight"].dtype == torch.float64  # float64 inputs stay float64


def _fusionbench_fisher(
    thetas: list[Tensor], fishers: list[Tensor], coefficients: Tensor, norms: Tensor, eps: float
) -> Tensor:
    inverse = 1.0 / (norms + eps)
    c = coefficients * inverse / inverse.sum()
    f = torch.stack(fishers) + eps
    shape = (-1, *[1] * thetas[0].dim())
    return (c.reshape(shape) * f * torch.stack(thetas)).sum(0) / (c.reshape(shape) * f).sum(0)


def test_fisher_takes_each_coordinate_from_the_task_that_is_sure_of_it() -> None:
    pretrained = {"w": torch.zeros(2)}
    finetuned = [{"w": t(1.0, 2.0)}, {"w": t(3.0, 4.0)}]
    fishers = [{"w": t(1.0, 0.0)}, {"w": t(0.0, 1.0)}]
    out = merge(
        pretrained, finetuned, "fisher", fishers=fishers, normalize=False, minimal_weight=1e-12
    )
    torch.testing.assert_close(out["w"], t(1.0, 4.0))
    equal = merge(pretrained, finetuned, "fisher", fishers=[{"w": t(2.0, 2.0)}] * 2)
    torch.testing.assert_close(equal["w"], t(2.0, 3.0))  # equal Fishers: the mean


def test_fisher_equals_fusionbench_with_normalisation_and_coefficients() -> None:
    pretrained, finetuned = _models()
    gen = torch.Generator().manual_seed(2)
    keys = ["fc.weight", "fc.bias", "norm.weight", "conv.weight"]
    fishers = [
        {k: torch.rand(pretrained[k].shape, generator=gen) * (i + 1) for k in keys}
        for i in range(3)
    ]
    coefficients = [0.5, 0.3, 0.2]
    out = merge(pretrained, finetuned, "fisher", fishers=fishers, scaling_coefficients=coefficients)
    norms = torch.stack([torch.stack([f[k].norm() for k in keys]).norm() for f in fishers])
    for key in keys:
        expected = _fusionbench_fisher(
            [ft[key] for ft in finetuned],
            [f[key] for f in fishers],
            torch.tensor(coefficients),
            norms,
            1e-6,
        )
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)
    assert out["norm.num_batches_tracked"].item() == 5


def test_data_based_methods_say_where_their_statistics_come_from() -> None:
    pretrained, finetuned = _models()
    with pytest.raises(ValueError, match=r"'regmean' needs the 'grams' statistics.*MergeCallback"):
        merge(pretrained, finetuned, "regmean")
    with pytest.raises(ValueError, match="got 1 fishers for 3"):
        merge(pretrained, finetuned, "fisher", fishers=[{}])
    with pytest.raises(ValueError, match=r"'reduce_non_diagonal'.*\[0, 1\]"):
        merge(pretrained, finetuned, "regmean", grams=[{}] * 3, reduce_non_diagonal=1.5)


# ----------------------------------------------------------------------------- statistics
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1, bias=False)
        nn.init.ones_(self.fc.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_input_grams_are_the_mean_outer_product_of_the_inputs() -> None:
    x = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]])
    batches = [{"image": x[:1]}, {"image": x[1:]}, {"image": x[1:] * 100}]
    grams = input_grams(_Tiny(), batches, samples=2)
    rows = x.reshape(-1, 3)
    torch.testing.assert_close(grams["fc.weight"], rows.T @ rows / 4)  # the third batch is not read


def test_diagonal_fisher_is_the_mean_squared_gradient_of_the_loss() -> None:
    model = _Tiny()
    batches = [{"image": t(1.0, 2.0, 3.0)[None]}, {"image": t(0.0, 1.0, -1.0)[None]}]
    fisher = diagonal_fisher(model, lambda b: model(b["image"]).sum(), batches, samples=10)
    # d(w·x)/dw = x per batch: (x1^2 + x2^2) / 2 samples
    torch.testing.assert_close(fisher["fc.weight"], t(1.0, 5.0, 10.0)[None] / 2)
    assert model.fc.weight.grad is None and model.fc.weight.requires_grad
