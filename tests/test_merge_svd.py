"""TSV-M, Iso-C and Iso-CTS against FusionBench-style references, plus hand-checked cases."""

from __future__ import annotations

import pytest
import torch
from merge_encoders import assert_bad_option, assert_close_states, random_encoders, references

from lightning_simo.merging import merge
from lightning_simo.merging.svd_methods import iso_common_size, tsv_share


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tsv", {}),
        ("tsv", {"scaling": 0.7}),
        ("tsv", {"task_weights": [1.0, 0.5, 2.0]}),
        ("iso_c", {"scaling": 1.3}),
        ("iso_cts", {}),
        ("iso_cts", {"common_fraction": 0.5, "scaling": 0.9}),
    ],
)
def test_svd_methods_equal_reference(method: str, options: dict, dtype: torch.dtype) -> None:
    pretrained, finetuned = random_encoders(dtype=dtype)
    merged = merge(pretrained, finetuned, method, **options)
    expected = references.REFERENCES[method](pretrained, finetuned, **options)
    assert_close_states(merged, expected, 1e-5 if dtype == torch.float32 else 1e-10)
    assert merged["blocks.0.attn.qkv.weight"].dtype == dtype
    assert torch.equal(merged["bn.num_batches_tracked"], pretrained["bn.num_batches_tracked"])


def test_tsv_with_two_tasks_and_odd_rank_equals_reference() -> None:
    pretrained, finetuned = random_encoders(n_tasks=2, seed=3)
    assert_close_states(
        merge(pretrained, finetuned, "tsv"), references.tsv_reference(pretrained, finetuned)
    )


def test_non_matrices_take_the_mean_task_vector() -> None:
    pretrained, finetuned = random_encoders()
    for method in ("tsv", "iso_c", "iso_cts"):
        merged = merge(pretrained, finetuned, method, scaling=2.0)
        for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight"):
            mean = sum(ft[key] - pretrained[key] for ft in finetuned) / 3
            torch.testing.assert_close(merged[key], pretrained[key] + 2.0 * mean)


def test_tsv_on_orthogonal_rank_one_tasks_is_their_sum() -> None:
    # Each task is rank one along its own basis vectors: whitening changes nothing, TSV = sum.
    theta0 = {"w": torch.zeros(3, 3)}
    tasks = [{"w": torch.zeros(3, 3)} for _ in range(3)]
    for i, scale in enumerate((3.0, 2.0, 1.0)):
        tasks[i]["w"][i, (i + 1) % 3] = scale
    merged = merge(theta0, tasks, "tsv")["w"]
    torch.testing.assert_close(merged, sum(t["w"] for t in tasks))


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    theta0 = {"w": torch.zeros(2, 2)}
    tasks = [
        {"w": torch.diag(torch.tensor([3.0, 0.0]))},
        {"w": torch.diag(torch.tensor([0.0, 1.0]))},
    ]
    # sum = diag(3, 1): singular values 3 and 1, mean 2
    torch.testing.assert_close(
        merge(theta0, tasks, "iso_c")["w"], torch.diag(torch.tensor([2.0, 2.0]))
    )


def test_shares_follow_fusionbench_rounding() -> None:
    assert tsv_share(8, 3) == 2 and tsv_share(20, 3) == 6 and tsv_share(2, 3) == 0
    # (10 - int(10 * 0.8)) / 4 = 0.5 rounds half to even: 0 task dimensions, all common
    assert iso_common_size(10, 4, 0.8) == 10
    # (10 - 5) / 2 = 2.5 -> 2 per task, common 10 - 4 = 6 (half up would give 4)
    assert iso_common_size(10, 2, 0.5) == 6
    assert iso_common_size(8, 3, 0.8) == 8 - round(2 / 3) * 3


def test_tsv_matrix_smaller_than_task_count_merges_to_zero() -> None:
    theta0 = {"w": torch.ones(2, 5)}
    tasks = [{"w": torch.ones(2, 5) + i} for i in range(1, 4)]
    assert torch.equal(merge(theta0, tasks, "tsv")["w"], theta0["w"])


def test_bf16_inputs_are_computed_in_float32_and_cast_back() -> None:
    pretrained, finetuned = random_encoders()
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in pretrained.items()}
    tuned = [
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in ft.items()} for ft in finetuned
    ]
    merged = merge(half, tuned, "iso_cts")
    assert merged["blocks.0.mlp.fc1.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("tsv", {"task_weights": "1"}, "option 'task_weights' of merge method 'tsv'"),
        ("tsv", {"scaling": -1}, "option 'scaling' of merge method 'tsv'"),
        ("iso_cts", {"common_fraction": 0}, "option 'common_fraction' of merge method 'iso_cts'"),
        (
            "iso_c",
            {"common_fraction": 0.5},
            "unknown option 'common_fraction' for merge method 'iso_c'",
        ),
    ],
)
def test_bad_options_name_method_and_option(method: str, options: dict, message: str) -> None:
    assert_bad_option(method, options, message)


def test_task_weights_length_is_checked() -> None:
    pretrained, finetuned = random_encoders()
    with pytest.raises(ValueError, match="'task_weights' of merge method 'tsv' has 2 value"):
        merge(pretrained, finetuned, "tsv", task_weights=[1.0, 2.0])


def test_iso_cts_refuses_a_common_fraction_leaving_no_common_space() -> None:
    theta0 = {"w": torch.zeros(5, 5)}
    tasks = [{"w": torch.randn(5, 5)} for _ in range(3)]
    with pytest.raises(
        ValueError, match="'common_fraction' of merge method 'iso_cts' is too small"
    ):
        merge(theta0, tasks, "iso_cts", common_fraction=0.1)
