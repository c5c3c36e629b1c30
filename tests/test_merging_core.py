"""The merging core: one casting rule, one θ0 + α·τ, the Sources checks, the sample cache and
the registered re-alignment modes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VIT

from lightning_simo.callbacks.realign import REALIGN_MODES, RealignMode
from lightning_simo.merging import add_scaled, apply_task_vector, compute_dtype, merge, task_vector
from lightning_simo.merging.cache import SampleCache, StaleCacheError
from lightning_simo.merging.sources import sources_from_states, state_dict_sha256
from lightning_simo.models.simo import SIMONet
from lightning_simo.registry import UnknownNameError


# ----------------------------------------------------------------------------- arithmetic
def test_the_casting_rule() -> None:
    bf16, fp32, fp64 = (
        torch.ones(2, dtype=d) for d in (torch.bfloat16, torch.float32, torch.float64)
    )
    assert compute_dtype(bf16, bf16) == torch.float32  # never subtract in bf16
    assert compute_dtype(bf16, fp32) == torch.float32
    assert compute_dtype(fp32, fp64) == torch.float64
    # 1 + 2**-10 is not a bf16 number: in bf16 the step would vanish
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    out = add_scaled(base, torch.tensor([2.0**-10], dtype=torch.bfloat16), 1.0)
    assert out.dtype == torch.float32 and out.item() == 1.0 + 2.0**-10


def test_apply_task_vector_moves_floats_keeps_buffers_and_clamps_variances() -> None:
    theta0 = {
        "w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "bn.running_var": torch.tensor([0.5, 0.5]),
        "bn.num_batches_tracked": torch.tensor(7),
        "untouched": torch.tensor([3.0]),
    }
    tau = {"w": torch.tensor([0.5, -1.0]), "bn.running_var": torch.tensor([-1.0, 1.0])}
    out = apply_task_vector(theta0, tau, 2.0)
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [2.0, 0.0]
    assert out["bn.running_var"].tolist() == [0.0, 2.5]  # 0.5 - 2 clamped at 0
    assert out["bn.num_batches_tracked"].item() == 7
    assert out["untouched"] is theta0["untouched"]
    unclamped = apply_task_vector(theta0, tau, 2.0, clamp_running_var=False)
    assert unclamped["bn.running_var"].tolist() == [-1.5, 2.5]


def test_task_arithmetic_is_theta0_plus_alpha_tau_of_the_core() -> None:
    gen = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(5, 3, generator=gen), "step": torch.tensor(1)}
    finetuned = [
        {"w": theta0["w"] + torch.randn(5, 3, generator=gen), "step": torch.tensor(4)}
        for _ in range(3)
    ]
    taus = [task_vector(theta0, ft) for ft in finetuned]
    total = {"w": taus[0]["w"] + taus[1]["w"] + taus[2]["w"]}
    expected = apply_task_vector(theta0, total, 0.3)
    got = merge(theta0, finetuned, "task_arithmetic", scaling=0.3)
    assert torch.equal(got["w"], expected["w"]) and got["step"].item() == 1


def test_merge_reports_progress_once_per_merged_tensor() -> None:
    theta0 = {"a": torch.zeros(3), "b": torch.zeros(2), "step": torch.tensor(0)}
    finetuned = [{"a": torch.ones(3), "b": torch.ones(2), "step": torch.tensor(1)}]
    seen: list[str] = []
    merge(theta0, finetuned, "task_arithmetic", progress=seen.append)
    assert seen == ["a", "b"]


# ----------------------------------------------------------------------------- sources
def _net(tasks: tuple[str, ...] = ("depth",)) -> SIMONet:
    from lightning_simo.tasks import build_tasks

    torch.manual_seed(0)
    return SIMONet(
        build_tasks(list(tasks), {}), copy.deepcopy(TINY_VIT), {"kind": "linear", "upsample": 4}
    )


def _state(net: SIMONet) -> dict[str, torch.Tensor]:
    return {f"net.{k}": v.clone() for k, v in net.state_dict().items()}


def test_sources_split_encoders_and_heads_and_hash_their_content() -> None:
    net = _net()
    state = _state(net)
    sources = sources_from_states(["depth"], net.encoder.state_dict(), {"depth": state})
    assert set(sources.encoders["depth"]) == set(net.encoder.state_dict())
    assert set(sources.heads["depth"]) == set(net.heads["depth"].state_dict())
    assert sources.finetuned == [sources.encoders["depth"]]
    first = sources.identity
    assert set(first) == {"theta0", "depth"} and first["theta0"] == first["depth"]
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in sources.theta0.items()}
    assert state_dict_sha256(moved) != first["theta0"]


def test_sources_refuse_missing_tasks_heads_and_other_encoders() -> None:
    net = _net()
    state = _state(net)
    theta0 = net.encoder.state_dict()
    with pytest.raises(ValueError, match=r"No checkpoint given for task\(s\) \['normals'\]"):
        sources_from_states(["depth", "normals"], theta0, {"depth": state})
    encoder_only = {k: v for k, v in state.items() if k.startswith("net.encoder.")}
    with pytest.raises(
        ValueError, match=r"for task 'depth' has no head for 'depth' \(heads found: none\)"
    ):
        sources_from_states(["depth"], theta0, {"depth": encoder_only})
    wide = {
        k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if k.endswith("cls_token") else v
        for k, v in state.items()
    }
    with pytest.raises(ValueError, match=r"cls_token.*shape mismatch|shape mismatch.*cls_token"):
        sources_from_states(["depth"], theta0, {"depth": wide})
    with pytest.raises(ValueError, match="same encoder settings"):
        sources_from_states(["depth"], theta0, {"depth": wide})


def test_attach_heads_names_the_head_that_does_not_fit() -> None:
    net = _net()
    state = _state(net)
    sources = sources_from_states(["depth"], net.encoder.state_dict(), {"depth": state})
    bad = {k: torch.zeros(1) for k in sources.heads["depth"]}
    sources.heads["depth"] = bad
    with pytest.raises(ValueError, match="'depth' head in the 'depth' checkpoint does not fit"):
        sources.attach_heads(net)


# ----------------------------------------------------------------------------- sample cache
def test_sample_cache_serves_hits_from_its_buffers_and_grows() -> None:
    calls: list[int] = []

    def compute(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(images.shape[0])
        return [images.mean(dim=(1, 2, 3)), images[:, :1] * 2]

    cache = SampleCache("test outputs", "`cache: false`")
    images = torch.rand(6, 3, 4, 5)
    first = cache.get(torch.arange(3), images[:3], compute)
    second = cache.get(torch.tensor([3, 4, 5, 1]), images[[3, 4, 5, 1]], compute)  # grows
    third = cache.get(torch.tensor([5, 0, 2]), images[[5, 0, 2]], compute)
    assert calls == [3, 3] and (cache.misses, cache.hits, len(cache)) == (6, 4, 6)
    assert cache.indices() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(second[0][3], first[0][1])
    torch.testing.assert_close(third[1], images[[5, 0, 2], :1] * 2)
    torch.testing.assert_close(cache.entry(4)[0], images[4].mean())


@pytest.mark.parametrize(
    "change",
    [lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x * 1.01],
    ids=["hflip", "vflip", "brightness"],
)
def test_sample_cache_refuses_a_changed_image(change) -> None:  # noqa: ANN001
    cache = SampleCache("test outputs", "`cache: false`")
    images = torch.rand(2, 3, 6, 8)
    cache.get(torch.arange(2), images, lambda x: [x.sum(dim=(1, 2, 3))])
    changed = images.clone()
    changed[1] = change(changed[1])
    with pytest.raises(
        StaleCacheError, match=r"test outputs are stale: training sample 1 .*`cache: false`"
    ):
        cache.get(torch.arange(2), changed, lambda x: [x.sum(dim=(1, 2, 3))])
    cropped = torch.nn.functional.interpolate(images, size=(5, 8))
    with pytest.raises(StaleCacheError, match="sample 0"):
        cache.get(torch.arange(2), cropped, lambda x: [x.sum(dim=(1, 2, 3))])


# ----------------------------------------------------------------------------- modes
def test_modes_are_registered_objects_with_a_clear_unknown_name_error() -> None:
    assert {"none", "heads", "adapters", "full", "tinting", "adamerging"} <= set(REALIGN_MODES)
    with pytest.raises(
        UnknownNameError, match=r"unknown re-alignment mode 'head'.*heads.*merge.realign"
    ):
        REALIGN_MODES.get("head")
    assert all(isinstance(mode, RealignMode) for _, mode in REALIGN_MODES.items())
    assert REALIGN_MODES.get("tinting").module_class is not None
    assert (
        REALIGN_MODES.get("full").trains_encoder and not REALIGN_MODES.get("heads").trains_encoder
    )


def test_a_new_mode_is_one_registration() -> None:
    REALIGN_MODES.register("_test_heads_only", RealignMode("heads", heads=True))
    try:
        net = _net()
        REALIGN_MODES.get("_test_heads_only").prepare(net)
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("heads.") for n in trainable)
    finally:
        REALIGN_MODES.unregister("_test_heads_only")


# ----------------------------------------------------------------------------- TIES threshold
@pytest.mark.parametrize("sample", [3, 16, 64])
@pytest.mark.parametrize("margin", [0.0, 0.002])
def test_sampled_ties_threshold_is_exact_whatever_the_sample(monkeypatch, sample, margin) -> None:  # noqa: ANN001
    """Small samples bracket the threshold badly (the radix fallback decides) or well (one
    counting pass); the merge equals the flattened reference either way."""
    import importlib.util
    from pathlib import Path

    import lightning_simo.merging.methods as methods

    spec = importlib.util.spec_from_file_location(
        "merge_speed_reference",
        Path(__file__).resolve().parents[1] / "benchmarks" / "merge_speed.py",
    )
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    monkeypatch.setattr(methods, "_SAMPLE", sample)
    monkeypatch.setattr(methods, "_SAMPLE_MARGIN", margin)
    gen = torch.Generator().manual_seed(sample)
    shapes = {"a": (40, 30), "b": (30,), "c": (7, 3, 2, 2)}
    for scale in (1.0, 1e-3):
        theta0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        finetuned = [
            {
                k: v + scale * torch.randn(v.shape, generator=gen) * (1 + 10 * (k == "a"))
                for k, v in theta0.items()
            }
            for _ in range(3)
        ]
        for density in (0.05, 0.2, 0.9):
            got = merge(theta0, finetuned, "ties", density=density, scaling=0.5)
            want = reference.reference_ties_flat(theta0, finetuned, density, 0.5)
            for key in shapes:
                assert torch.equal(got[key], want[key]), (key, density, scale)


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_streamed_ties_tallies_the_election_in_the_threshold_pass(
    monkeypatch, grid, density
) -> None:  # noqa: ANN001
    """The stream's one counting pass gives the thresholds and the exact sum of elected signs
    (decided, one-undecided and several-undecided coordinates alike), equal to electing every
    coordinate after the thresholds are known."""
    import lightning_simo.merging.methods as methods
    from lightning_simo.merging.methods import (
        MergeInputs,
        _bracketed_select,
        _ElectionTally,
        _ties_elect,
        keep_count,
    )

    monkeypatch.setattr(methods, "_SAMPLE", 64)  # wide brackets: many undecided coordinates
    monkeypatch.setattr(methods, "_SAMPLE_MARGIN", 0.05)
    gen = torch.Generator().manual_seed(int(grid) + int(100 * density))
    shapes = {"a": (50, 40), "b": (40,), "c": (6, 3, 2, 2)}
    theta0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        value = torch.randn(shape, generator=gen)
        # few distinct values: many exact cancellations and several undecided values per entry
        return torch.randint(-3, 4, shape, generator=gen).float() if grid else value

    finetuned = [{k: v + noise(v.shape) for k, v in theta0.items()} for _ in range(5)]
    theta0["frozen"] = torch.randn(8, 8, generator=gen)  # zero task vectors: exact zeros
    for tuned in finetuned:
        tuned["frozen"] = theta0["frozen"].clone()
    shapes["frozen"] = (8, 8)
    inputs = MergeInputs(theta0, finetuned, tuple(shapes), torch.float32)
    tally = _ElectionTally()
    found = _bracketed_select(inputs, keep_count(density, inputs.numel), tally)
    assert found is not None, "the bracket should hold the threshold here"
    thresholds, inside = found
    assert thresholds == methods._kth_largest_magnitudes_radix(
        inputs, keep_count(density, inputs.numel)
    )
    expected = 0
    for key in shapes:
        _, elected, _ = _ties_elect(inputs, key, density, thresholds)
        expected += int(elected.sum())
    assert tally.balance_given(thresholds, inside) == expected
    assert tally.undecided, "the case should have coordinates with several undecided values"
    streamed = methods._ties_prepass(inputs, {"density": density, "trim_scope": "global"})
    assert streamed["_model_wide"]["majority"] == float((expected > 0) - (expected < 0))
