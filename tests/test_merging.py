"""Merging math: exact values on hand-made tensors, and the engine against a flat reference."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_simo.merging import (
    MERGE_METHODS,
    MergeInputs,
    check_compatible,
    cosine_similarity_matrix,
    is_bn_running_stat,
    keep_count,
    merge,
    norms,
    register_merge_method,
    task_vector,
    task_vectors,
)
from lightning_simo.merging.methods import _stable_seed
from lightning_simo.merging.statistics import statistics_of

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_speed.py"
_spec = importlib.util.spec_from_file_location("merge_speed_reference", _BENCH)
assert _spec is not None and _spec.loader is not None
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), (key, a[key], b[key])


def three_models() -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    pretrained = {"w": t(1.0, 2.0, 3.0), "step": torch.tensor(10)}
    finetuned = [
        {"w": t(2.0, 2.0, 0.0), "step": torch.tensor(50)},
        {"w": t(1.0, 4.0, 3.0), "step": torch.tensor(60)},
        {"w": t(3.0, 0.0, 3.0), "step": torch.tensor(70)},
    ]
    return pretrained, finetuned


# ----------------------------------------------------------------------------- task vectors


def test_task_vector_skips_integer_buffers() -> None:
    pretrained, finetuned = three_models()
    assert list(task_vector(pretrained, finetuned[0])) == ["w"]
    assert torch.equal(task_vector(pretrained, finetuned[0])["w"], t(1.0, 0.0, -3.0))
    vectors = task_vectors(pretrained, finetuned)
    expected = [t(1, 0, -3), t(0, 2, 0), t(2, -2, 0)]
    assert all(torch.equal(v["w"], e) for v, e in zip(vectors, expected))


def test_task_vector_of_bf16_is_float32() -> None:
    pretrained = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    finetuned = {"w": torch.tensor([1.0078125], dtype=torch.bfloat16)}  # 1 + 2**-7
    vector = task_vector(pretrained, finetuned)["w"]
    assert vector.dtype == torch.float32
    assert vector.item() == 2**-7


def test_is_bn_running_stat() -> None:
    assert is_bn_running_stat("encoder.bn1.running_mean")
    assert is_bn_running_stat("bn.running_var")
    assert not is_bn_running_stat("bn.num_batches_tracked")
    assert not is_bn_running_stat("bn.weight")


def test_norms_and_cosine_similarity() -> None:
    v1 = {"a": t(3.0, 0.0), "b": t(0.0)}
    v2 = {"a": t(0.0, 4.0), "b": t(0.0)}
    v3 = {"a": t(3.0, 0.0), "b": t(4.0)}
    zero = {"a": t(0.0, 0.0), "b": t(0.0)}
    assert torch.equal(
        norms([v1, v2, v3, zero]), torch.tensor([3.0, 4.0, 5.0, 0.0], dtype=torch.float64)
    )
    cos = cosine_similarity_matrix([v1, v2, v3, zero])
    expected = torch.tensor(
        [[1.0, 0.0, 0.6, 0.0], [0.0, 1.0, 0.0, 0.0], [0.6, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(cos, expected, rtol=0, atol=1e-12)


def test_cosine_requires_matching_keys() -> None:
    with pytest.raises(ValueError, match=r"key 'b' of 'vector 0' is missing from 'vector 1'"):
        cosine_similarity_matrix([{"a": t(1.0), "b": t(1.0)}, {"a": t(1.0)}])


# ----------------------------------------------------------------------------- compatibility


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    reference_sd = {"blocks.0.w": torch.zeros(2, 3), "head.b": torch.zeros(4)}
    other = {"blocks.0.w": torch.zeros(2, 3), "head.b": torch.zeros(5)}
    with pytest.raises(ValueError) as info:
        check_compatible(reference_sd, [reference_sd, other], names=["seg", "depth"])
    message = str(info.value)
    assert "'head.b'" in message and "(4,)" in message and "(5,)" in message
    assert "'depth'" in message


def test_missing_and_extra_keys_name_the_checkpoint() -> None:
    reference_sd = {"a": torch.zeros(1), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"key 'b' of 'pretrained' is missing from 'normals'"):
        check_compatible(
            reference_sd, [{"a": torch.zeros(1)}], names=["normals"], reference_name="pretrained"
        )
    extra = {**reference_sd, "adapters.0": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"'checkpoint 0' has key 'adapters.0' that 'reference'"):
        check_compatible(reference_sd, [extra])


def test_merge_refuses_mismatched_encoders() -> None:
    pretrained, finetuned = three_models()
    finetuned[2] = {"w": t(1.0, 2.0), "step": torch.tensor(1)}
    with pytest.raises(ValueError, match=r"'w'.*\(3,\).*'finetuned 2' has \(2,\)"):
        merge(pretrained, finetuned, "average")


def test_float_vs_integer_mismatch() -> None:
    with pytest.raises(ValueError, match="dtype mismatch for key 'x'"):
        check_compatible({"x": torch.zeros(2)}, [{"x": torch.zeros(2, dtype=torch.int64)}])


# ----------------------------------------------------------------------------- simple methods


def test_average_and_task_arithmetic_exact() -> None:
    pretrained, finetuned = three_models()
    average = merge(pretrained, finetuned, "average")
    assert torch.equal(average["w"], t(2.0, 2.0, 2.0))
    # tau sum = (1+0+2, 0+2-2, -3+0+0) = (3, 0, -3)
    ta = merge(pretrained, finetuned, "task_arithmetic", scaling=0.5)
    assert torch.equal(ta["w"], t(2.5, 2.0, 1.5))
    assert torch.equal(merge(pretrained, finetuned, "task_arithmetic")["w"], t(4.0, 2.0, 0.0))
    assert torch.equal(merge(pretrained, finetuned, "task_arithmetic", scaling=0)["w"], t(1, 2, 3))


def test_integer_buffers_come_from_pretrained_and_nothing_aliases() -> None:
    pretrained, finetuned = three_models()
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pretrained, *finetuned]]
    for method in MERGE_METHODS:
        if method.startswith("_test") or statistics_of(method):  # data-based: tested apart
            continue
        out = merge(pretrained, finetuned, method)
        assert out["step"].item() == 10 and out["step"].dtype == torch.int64
        for value in out.values():
            for sd in [pretrained, *finetuned]:
                for other in sd.values():
                    assert value.data_ptr() != other.data_ptr(), method
    for original, sd in zip(before, [pretrained, *finetuned]):
        assert_state_equal(original, sd)  # inputs untouched


def test_result_dtype_follows_pretrained_and_math_is_float32() -> None:
    pretrained = {"w": torch.tensor([1.0], dtype=torch.bfloat16), "h": torch.tensor([0.5])}
    step = 2**-7  # one bf16 ulp at 1.0
    finetuned = [
        {"w": torch.tensor([1.0 + step], dtype=torch.bfloat16), "h": torch.tensor([0.25])}
        for _ in range(2)
    ]
    out = merge(pretrained, finetuned, "task_arithmetic", scaling=0.5)
    assert out["w"].dtype == torch.bfloat16 and out["h"].dtype == torch.float32
    assert out["w"].item() == 1.0 + step  # 1 + 0.5 * 2 * step
    assert out["h"].item() == 0.25


def test_float64_inputs_are_merged_in_float64() -> None:
    pretrained = {"w": torch.tensor([1.0], dtype=torch.float64)}
    finetuned = [{"w": torch.tensor([1.0 + 1e-12], dtype=torch.float64)}]
    out = merge(pretrained, finetuned, "task_arithmetic")
    assert out["w"].dtype == torch.float64 and out["w"].item() == 1.0 + 1e-12


def test_bn_policies() -> None:
    pretrained = {
        "bn.weight": t(1.0, 1.0),
        "bn.running_mean": t(0.0, 0.0),
        "bn.running_var": t(1.0, 1.0),
        "bn.num_batches_tracked": torch.tensor(100),
    }
    finetuned = [
        {
            **pretrained,
            "bn.weight": t(3.0, 1.0),
            "bn.running_mean": t(2.0, 4.0),
            "bn.running_var": t(3.0, 5.0),
            "bn.num_batches_tracked": torch.tensor(7),
        },
        {
            **pretrained,
            "bn.weight": t(1.0, 5.0),
            "bn.running_mean": t(0.0, 2.0),
            "bn.running_var": t(1.0, 1.0),
            "bn.num_batches_tracked": torch.tensor(9),
        },
    ]
    merged = merge(pretrained, finetuned, "average")
    assert torch.equal(merged["bn.weight"], t(2.0, 3.0))
    assert torch.equal(merged["bn.running_mean"], t(1.0, 3.0))
    assert torch.equal(merged["bn.running_var"], t(2.0, 3.0))
    assert merged["bn.num_batches_tracked"].item() == 100
    for policy in ("pretrained", "reestimate"):
        kept = merge(pretrained, finetuned, "task_arithmetic", bn_stats=policy)
        assert torch.equal(kept["bn.weight"], t(3.0, 5.0))
        assert torch.equal(kept["bn.running_mean"], t(0.0, 0.0))
        assert torch.equal(kept["bn.running_var"], t(1.0, 1.0))
    with pytest.raises(ValueError, match="'bn_stats' must be one of 'merge', 'pretrained'"):
        merge(pretrained, finetuned, "average", bn_stats="recompute")


def test_keys_option_merges_only_those_keys() -> None:
    pretrained = {"a": t(0.0), "b": t(0.0)}
    finetuned = [{"a": t(2.0), "b": t(4.0)}, {"a": t(4.0), "b": t(8.0)}]
    out = merge(pretrained, finetuned, "average", keys=["b"])
    assert torch.equal(out["a"], t(0.0)) and torch.equal(out["b"], t(6.0))
    with pytest.raises(ValueError, match="'keys' names 'c'"):
        merge(pretrained, finetuned, "average", keys=["c"])
    with pytest.raises(ValueError, match="not one string"):
        merge(pretrained, finetuned, "average", keys="b")


# ----------------------------------------------------------------------------- TIES


def ties_inputs() -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    pretrained = {"w": t(0.0, 0.0, 0.0, 0.0)}
    taus = [t(3.0, -1.0, 2.0, 0.5), t(-2.0, 4.0, -1.0, 0.1), t(-4.0, 0.2, 5.0, 0.3)]
    return pretrained, [{"w": tau} for tau in taus]


def test_ties_trim_elect_disjoint_mean_sum_and_max() -> None:
    pretrained, finetuned = ties_inputs()
    # the TIES authors' trim: threshold = the (4 - int(0.5 * 4)) = 2nd smallest magnitude, so
    # int(d * n) + 1 = 3 of 4 values survive: (3,-1,2,0), (-2,4,-1,0), (-4,0,5,0.3);
    # column sums (-3, 3, 6, 0.3) elect (-, +, +, +)
    mean = merge(pretrained, finetuned, "ties", density=0.5, scaling=0.5)
    assert torch.equal(mean["w"], t(-1.5, 2.0, 1.75, 0.15))  # 0.5 * (-3, 4, 3.5, 0.3)
    total = merge(pretrained, finetuned, "ties", density=0.5, merge_rule="sum")
    assert torch.equal(total["w"], t(-6.0, 4.0, 7.0, 0.3))
    largest = merge(pretrained, finetuned, "ties", density=0.5, merge_rule="max")
    assert torch.equal(largest["w"], t(-4.0, 4.0, 5.0, 0.3))
    per_tensor = merge(pretrained, finetuned, "ties", density=0.5, trim_scope="tensor")
    assert torch.equal(per_tensor["w"], t(-3.0, 4.0, 3.5, 0.3))


def test_ties_zero_sum_takes_the_majority_sign() -> None:
    pretrained = {"a": t(0.0, 0.0, 0.0), "b": t(10.0)}
    finetuned = [{"a": t(1.0, 1.0, 1.0), "b": t(12.0)}, {"a": t(1.0, 1.0, 1.0), "b": t(8.0)}]
    # b: +2 and -2 cancel; three positive elected coordinates make the majority sign +
    out = merge(pretrained, finetuned, "ties", density=1.0)
    assert torch.equal(out["b"], t(12.0)) and torch.equal(out["a"], t(1.0, 1.0, 1.0))
    negative = [{"a": -sd["a"], "b": sd["b"]} for sd in finetuned]
    out = merge(pretrained, negative, "ties", density=1.0, merge_rule="sum")
    assert torch.equal(out["b"], t(8.0)) and torch.equal(out["a"], t(-2.0, -2.0, -2.0))
    # equally many + and - coordinates: the majority sign is 0, and (as in the reference's
    # torch.where(sign > 0, v > 0, v < 0)) a sign of 0 selects the negative values
    balanced = [{"a": t(1.0, -1.0, 0.0), "b": t(12.0)}, {"a": t(1.0, -1.0, 0.0), "b": t(8.0)}]
    out = merge(pretrained, balanced, "ties", density=1.0, trim_scope="tensor")
    assert torch.equal(out["b"], t(8.0)) and torch.equal(out["a"], t(1.0, -1.0, 0.0))
    out = merge(pretrained, balanced, "ties", density=1.0, merge_rule="max")
    assert torch.equal(out["b"], t(10.0))  # max magnitude times a sign of 0


def test_ties_global_and_per_tensor_trimming_differ() -> None:
    pretrained = {"big": torch.zeros(4), "small": torch.zeros(4)}
    finetuned = [{"big": t(10.0, -9.0, 8.0, 7.0), "small": t(0.1, 0.2, -0.3, 0.4)}]
    # global: 5 of 8 survive (threshold: the 4th smallest of all, 0.4)
    global_ = merge(pretrained, finetuned, "ties", density=0.5)
    assert torch.equal(global_["big"], t(10.0, -9.0, 8.0, 7.0))
    assert torch.equal(global_["small"], t(0.0, 0.0, 0.0, 0.4))
    # per tensor: 3 of 4 survive in each
    local = merge(pretrained, finetuned, "ties", density=0.5, trim_scope="tensor")
    assert torch.equal(local["big"], t(10.0, -9.0, 8.0, 0.0))
    assert torch.equal(local["small"], t(0.0, 0.2, -0.3, 0.4))


def test_ties_keeps_every_value_tied_with_the_threshold() -> None:
    pretrained = {"w": torch.zeros(5)}
    finetuned = [{"w": t(1.0, -2.0, 2.0, 2.0, 0.5)}]
    # threshold: the (5 - int(0.2 * 5)) = 4th smallest magnitude, 2; without ties 2 values would
    # survive, here all three 2s do
    out = merge(pretrained, finetuned, "ties", density=0.2)
    assert torch.equal(out["w"], t(0.0, -2.0, 2.0, 2.0, 0.0))


def test_keep_count() -> None:
    assert keep_count(0.2, 10) == 3  # int(d * n) + 1
    assert keep_count(0.25, 10) == 3  # int(2.5) + 1
    assert (
        keep_count(0.3, 10) == 4
    )  # 0.3 * 10 = 3.0000000000000004: int() gives 3, as the reference
    assert keep_count(0.01, 10) == 1  # the largest value always survives
    assert keep_count(1.0, 7) == 7  # everything


def _random_models(
    seed: int, dtype: torch.dtype, grid: bool
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed": (7, 5), "blocks.0.w": (13, 11), "blocks.0.b": (13,), "norm": (1,)}

    def draw(shape: tuple[int, ...]) -> Tensor:
        if grid:  # few distinct values: many ties, exact zeros and cancelling sums
            return torch.randint(-3, 4, shape, generator=generator).float() / 4
        return torch.randn(shape, generator=generator)

    pretrained = {k: draw(s).to(dtype) for k, s in shapes.items()}
    pretrained["count"] = torch.tensor(3)
    finetuned = [
        {
            k: (v + draw(tuple(v.shape)).to(dtype)) if v.is_floating_point() else v + 1
            for k, v in pretrained.items()
        }
        for _ in range(3)
    ]
    return pretrained, finetuned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("rule", ["mean", "sum", "max"])
def test_global_ties_matches_flat_reference_exactly(
    dtype: torch.dtype, grid: bool, density: float, rule: str
) -> None:
    for seed in range(3):
        pretrained, finetuned = _random_models(seed, dtype, grid)
        engine = merge(pretrained, finetuned, "ties", density=density, scaling=0.7, merge_rule=rule)
        flat = reference.reference_ties_flat(pretrained, finetuned, density, 0.7, rule)
        assert_state_equal(engine, flat)


def test_task_arithmetic_matches_flat_reference_exactly() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        pretrained, finetuned = _random_models(5, dtype, grid=False)
        engine = merge(pretrained, finetuned, "task_arithmetic", scaling=0.3)
        flat = reference.reference_task_arithmetic_flat(pretrained, finetuned, 0.3)
        assert_state_equal(engine, flat)


def test_grid_data_exercises_zero_sum_election() -> None:
    """The reference comparison above is only meaningful if cancellations actually happen."""
    pretrained, finetuned = _random_models(0, torch.float32, grid=True)
    taus = task_vectors(pretrained, finetuned)
    key = "blocks.0.w"
    total = taus[0][key] + taus[1][key] + taus[2][key]
    support = (taus[0][key] != 0) | (taus[1][key] != 0) | (taus[2][key] != 0)
    assert bool(((total == 0) & support).any())


# ----------------------------------------------------------------------------- DARE


def _constant_models(n: int) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    return {"w": torch.zeros(n)}, [{"w": torch.ones(n)}]


def test_dare_rescales_survivors_and_preserves_the_expected_value() -> None:
    pretrained, finetuned = _constant_models(200_000)
    out = merge(pretrained, finetuned, "dare", drop_rate=0.7, seed=3)["w"]
    survivors = out[out != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 1 / 0.3))
    assert abs((out == 0).float().mean().item() - 0.7) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.02  # std of the mean is about 0.0034
    small_pretrained, small_finetuned = _constant_models(1_000)
    means = [
        merge(small_pretrained, small_finetuned, "dare", drop_rate=0.5, seed=s)["w"].mean().item()
        for s in range(50)
    ]
    assert abs(sum(means) / len(means) - 1.0) < 0.02  # std about 0.0045


def test_dare_is_deterministic_per_seed_and_key() -> None:
    pretrained = {"a": torch.zeros(64), "b": torch.zeros(64)}
    finetuned = [
        {"a": torch.ones(64), "b": torch.ones(64)},
        {"a": torch.ones(64), "b": torch.ones(64)},
    ]
    first = merge(pretrained, finetuned, "dare", drop_rate=0.5, seed=11)
    again = merge(pretrained, finetuned, "dare", drop_rate=0.5, seed=11)
    assert_state_equal(first, again)
    other_seed = merge(pretrained, finetuned, "dare", drop_rate=0.5, seed=12)
    assert not torch.equal(first["a"], other_seed["a"])
    assert not torch.equal(first["a"], first["b"])  # masks depend on the key name
    reordered = merge(
        {"b": pretrained["b"], "a": pretrained["a"]},
        [{"b": sd["b"], "a": sd["a"]} for sd in finetuned],
        "dare",
        drop_rate=0.5,
        seed=11,
    )
    assert torch.equal(reordered["a"], first["a"])  # independent of key order
    assert _stable_seed(11, 0, "a") == _stable_seed(11, 0, "a") != _stable_seed(11, 1, "a")


def test_dare_masks_follow_the_documented_recipe() -> None:
    pretrained, finetuned = _random_models(1, torch.float32, grid=False)
    del pretrained["count"]
    for sd in finetuned:
        del sd["count"]
    p, seed = 0.6, 4
    dropped = []
    for task, sd in enumerate(finetuned):
        theta = {}
        for key, base in pretrained.items():
            generator = torch.Generator().manual_seed(_stable_seed(seed, task, key))
            keep = torch.rand(base.shape, generator=generator) >= p
            theta[key] = base + torch.where(keep, (sd[key] - base) / (1 - p), 0.0)
        dropped.append(theta)
    for base, extra in (("task_arithmetic", {}), ("ties", {"density": 0.3, "merge_rule": "sum"})):
        got = merge(pretrained, finetuned, "dare", drop_rate=p, seed=seed, base=base, **extra)
        want = merge(pretrained, dropped, base, **extra)
        for key in pretrained:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


def test_dare_without_dropping_is_its_base() -> None:
    pretrained, finetuned = _random_models(2, torch.float32, grid=True)
    for base, extra in (("task_arithmetic", {"scaling": 0.4}), ("ties", {"density": 0.3})):
        got = merge(pretrained, finetuned, "dare", drop_rate=0.0, base=base, **extra)
        assert_state_equal(got, merge(pretrained, finetuned, base, **extra))


# ----------------------------------------------------------------------------- options, registry


@pytest.mark.parametrize(
    ("method", "options", "pattern"),
    [
        ("task_arithmetic", {"scaling": -0.1}, r"'scaling'.*a finite number >= 0, got -0.1"),
        ("task_arithmetic", {"scaling": math.inf}, r"'scaling'.*>= 0, got inf"),
        ("task_arithmetic", {"scaling": math.nan}, r"'scaling'.*>= 0, got nan"),
        ("task_arithmetic", {"scaling": "1"}, r"'scaling'.*>= 0, got '1'"),
        ("ties", {"density": 0.0}, r"'density'.*in \(0, 1\], got 0.0"),
        ("ties", {"density": 1.5}, r"'density'.*in \(0, 1\]"),
        ("ties", {"trim_scope": "layer"}, r"'trim_scope'.*'global', 'tensor'"),
        ("ties", {"merge_rule": "median"}, r"'merge_rule'.*'mean', 'sum', 'max'"),
        ("dare", {"drop_rate": 1.0}, r"'drop_rate'.*in \[0, 1\), got 1.0"),
        ("dare", {"seed": 1.5}, r"'seed'.*an integer"),
        ("dare", {"base": "average"}, r"'base'.*'task_arithmetic', 'ties'"),
        ("dare", {"density": 0.3}, r"unknown option 'density'.*'dare' with base 'task_arithmetic'"),
        ("ties", {"alpha": 0.3}, r"unknown option 'alpha'.*valid options: bn_stats, density"),
        ("average", {"scaling": 1.0}, r"unknown option 'scaling' for merge method 'average'"),
    ],
)
def test_invalid_options(method: str, options: dict, pattern: str) -> None:
    pretrained, finetuned = three_models()
    with pytest.raises(ValueError, match=pattern):
        merge(pretrained, finetuned, method, **options)


def test_unknown_method_lists_known_ones() -> None:
    pretrained, finetuned = three_models()
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'.*average.*dare.*ties"):
        merge(pretrained, finetuned, "tie")
    with pytest.raises(ValueError, match="at least one"):
        merge(pretrained, [], "average")


def test_dare_accepts_its_base_options() -> None:
    pretrained, finetuned = ties_inputs()
    out = merge(pretrained, finetuned, "dare", drop_rate=0.0, base="ties", density=0.5, scaling=0.5)
    assert torch.equal(out["w"], t(-1.5, 2.0, 1.75, 0.15))


def test_register_custom_method() -> None:
    def first_model(inputs: MergeInputs, options: dict) -> dict[str, Tensor]:
        return {k: inputs.finish(k, inputs.thetas(k)[0] * options["gain"]) for k in inputs.keys}

    from lightning_simo.merging import Option

    register_merge_method("_test_first", first_model, options={"gain": Option(1.0, float)})
    try:
        pretrained, finetuned = three_models()
        out = merge(pretrained, finetuned, "_test_first", gain=2)
        assert torch.equal(out["w"], t(4.0, 4.0, 0.0)) and out["step"].item() == 10
        with pytest.raises(ValueError, match="already registered"):
            register_merge_method("_test_first", first_model)
        register_merge_method("_test_first", first_model, replace=True)
    finally:
        if "_test_first" in MERGE_METHODS:
            MERGE_METHODS.unregister("_test_first")
