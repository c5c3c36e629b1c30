"""The study end to end on tiny settings: every stage, the tables, rerun skipping and --force."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lightning_simo.study import Stage, StudySettings, collect_row, plan_stages, run_study

REPO = Path(__file__).resolve().parents[1]
TINY_ENCODER = [
    "--model.encoder.model_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, "
    "img_size: [32, 40]}",
    "--model.encoder.indices=[0, 1, 2, 3]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def tiny_settings(out: Path, **overrides) -> StudySettings:
    configs = {k: str(REPO / v) for k, v in StudySettings().configs.items()}
    settings = StudySettings(
        out=str(out),
        seeds=1,
        configs=configs,
        data={
            "num_train": 16,
            "num_val": 8,
            "num_test": 8,
            "batch_size": 8,
            "height": 32,
            "width": 40,
        },
        foundation_images=16,
        foundation_epochs=1,
        single_task_epochs=2,
        realign_epochs=1,
        budgets=[0.5],
        mtl_epochs=2,
        mtl_weightings=["equal", "gradnorm"],
        accelerator="cpu",
        extra_args=TINY_ENCODER,
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def test_plan_orders_stages_by_dependency(tmp_path):
    names = [s.name for s in plan_stages(tiny_settings(tmp_path), seed=0)]
    assert names[0] == "foundation"
    assert names.index("single_task/depth") < names.index("merge/task_arithmetic")
    assert "budget/0.5" in names and "mtl/gradnorm" in names
    assert "merge/task_arithmetic-tinting" in names and "merge/ties-tinting" not in names
    assert "merge/ties-adapters" in names  # secondary modes default to the modes but tinting
    trimmed = tiny_settings(tmp_path, secondary_realign_modes=["heads"])
    names = [s.name for s in plan_stages(trimmed, seed=0)]
    assert "merge/ties-heads" in names and "merge/ties-adapters" not in names


def _flags(args: list[str]) -> dict[str, str]:
    keys = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    assert len(keys) == len(set(keys)), f"an override is written twice: {keys}"
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_every_stage_writes_each_override_once_and_shares_theta0_and_the_search(tmp_path):
    settings = tiny_settings(tmp_path, seeds=2)
    seed0, seed1 = plan_stages(settings, 0), plan_stages(settings, 1)
    assert seed0[0].name == "foundation" and all(s.name != "foundation" for s in seed1)
    theta0 = str(tmp_path / "foundation" / "checkpoints" / "last.ckpt")
    caches = set()
    for stage in [*seed0, *seed1]:
        for args in (stage.fit, stage.test):
            if args is None:
                continue
            flags = _flags(args)
            assert flags["--trainer.default_root_dir"] == str(stage.folder)
            if stage.name != "foundation":
                assert flags["--model.encoder.checkpoint"] == theta0
                assert flags["--data.seed"] == "0"  # scenes shared by the seeds
            if "--merge.method" in flags:
                caches.add(flags["--merge.search_cache"])
    assert caches == {str(tmp_path / "alpha_search.json")}
    fit = _flags(next(s for s in seed1 if s.name == "single_task/depth").fit)
    assert fit["--seed_everything"] == "1" and fit["--trainer.max_epochs"] == "2"
    assert fit["--data.tasks"] == '["depth"]'
    own = tiny_settings(tmp_path, data_seed=None, shared_foundation=False)
    stage = next(s for s in plan_stages(own, 1) if s.name == "single_task/depth")
    assert _flags(stage.fit)["--data.seed"] == "1"
    assert (
        str(tmp_path / "seed_1" / "foundation") in _flags(stage.fit)["--model.encoder.checkpoint"]
    )


@pytest.mark.slow
def test_tiny_study_runs_every_stage_and_skips_on_rerun(tmp_path):
    settings = tiny_settings(tmp_path)
    summary = run_study(settings)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    methods = [r["method"] for r in rows]
    expected = {
        "single-task models",
        "θ0 + fine-tuned heads",
        "average",
        "task_arithmetic",
        "ties",
        "dare",
        "task_arithmetic + heads re-align",
        "task_arithmetic + adapters re-align",
        "task_arithmetic + tinting re-align",
        "ties + heads re-align",
        "joint MTL (equal)",
        "joint MTL (gradnorm)",
    }
    assert expected <= set(methods)
    for row in rows:
        if row["method"].startswith("single-task ("):  # one task's model: its own metrics
            continue
        for key in ("segmentation/miou", "depth/abs_err", "normals/mean", "delta_mtl_ratio"):
            assert math.isfinite(float(row[key])), (row["method"], key)
        assert int(row["seeds"]) == 1 and row["delta_mtl_ratio_std"] == ""
    single = next(r for r in summary if r["method"] == "single-task models")
    assert single["delta_mtl_ratio"] == 0.0
    merged = next(r for r in summary if r["method"] == "task_arithmetic")
    assert merged["optimizer_steps"] == 0 and merged["labelled_samples"] == 0
    heads = next(r for r in summary if r["method"] == "task_arithmetic + heads re-align")
    assert heads["labelled_samples"] == 8 and heads["optimizer_steps"] >= 1
    assert 0 < heads["trainable_params"] < single["trainable_params"]
    tint = next(r for r in summary if r["method"] == "task_arithmetic + tinting re-align")
    assert tint["labelled_samples"] == 0
    depth = next(r for r in summary if r["method"] == "single-task (depth)")
    assert depth["epochs"] == 2 and depth["encoder_backward"] > 0  # the cap of 2 epochs
    assert heads["encoder_backward"] == 0  # frozen encoder, cached features
    assert merged["encoder_forward"] > 0  # its α search
    md = (tmp_path / "results.md").read_text()
    assert "| method |" in md and "\n## Claims\n" in md
    for figure in ("delta_mtl.png", "sample_efficiency.png", "pareto.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert "single_task/depth,done,max_epochs,2," in (tmp_path / "stages.csv").read_text()

    calls: list[list[str]] = []
    run_study(settings, runner=calls.append)
    assert calls == []  # every stage complete: nothing reruns

    run_study(tiny_settings(tmp_path, force=True), runner=calls.append)
    assert len(calls) == sum(
        (s.fit is not None) + (s.test is not None) for s in plan_stages(settings, 0)
    )


def test_force_is_a_switch_on_the_command_line():
    from lightning_simo.study import _flags_as_switches, build_parser

    assert _flags_as_switches(["--force", "--seeds", "2"]) == ["--force=true", "--seeds", "2"]
    assert _flags_as_switches(["--force", "false"]) == ["--force", "false"]
    cfg = build_parser().parse_args(_flags_as_switches(["--force"]))
    assert cfg.force is True


def test_optimizer_steps_come_from_the_fit_not_from_a_stale_last_checkpoint(tmp_path):
    """Lightning leaves last.ckpt at the best epoch once the val loss stops improving; the
    steps in the table are the ones the fit took (the record), the checkpoint only for records
    without them."""
    folder = tmp_path / "mtl" / "equal"
    (folder / "checkpoints").mkdir(parents=True)
    last = {"global_step": 192, "epoch": 11, "state_dict": {}, "pytorch-lightning_version": "2.5"}
    torch.save(last, folder / "checkpoints" / "last.ckpt")
    metrics = {"metrics": {"depth/abs_err": 1.0}, "tasks": ["depth"], "trainable_params": 10}
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    stage = Stage("mtl/equal", folder, ["fit"], ["test"], {"method": "joint MTL (equal)"})
    settings = StudySettings(out=str(tmp_path))
    record = {"status": "done", "epochs": 15, "optimizer_steps": 240, "wall_time_s": 1.0}
    assert collect_row(stage, record, settings)["optimizer_steps"] == 240
    del record["optimizer_steps"]
    assert collect_row(stage, record, settings)["optimizer_steps"] == 192
