"""Every experiment YAML parses, holds the SIMO paper's settings, and runs on the fake datasets.

Configs are the interface users run, so a config that no longer parses (a renamed argument, a
moved class) or silently drifts from the paper's recipe is a bug. The end-to-end runs swap the
ViT-B/14 for a tiny random ViT (no network, seconds on a CPU) through the same command-line
overrides a user would type, and chain the stages as a user does: single-task fit + test, then
merge fit + test against those checkpoints, then the joint MTL baseline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from lightning_simo.callbacks.merge import DEFAULT_ALPHA_GRID
from lightning_simo.cli import main
from lightning_simo.models.encoders import Encoder
from lightning_simo.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
DATA = ROOT / "tests" / "data"
JOINT_MODULE = "lightning_simo.modules.joint"
STAGES = ("single_task", "merge", "mtl")


@dataclass(frozen=True)
class DatasetCase:
    """What the fake copy of a dataset needs to run, and what its configs must say."""

    tasks: tuple[str, ...]
    head: str
    batch_size: int
    overrides: tuple[str, ...]


DATASETS = {
    "nyuv2": DatasetCase(
        tasks=("segmentation", "depth", "normals"),
        head="linear",
        batch_size=16,
        overrides=(
            "--data.init_args.root",
            str(DATA / "nyuv2"),
            "--data.init_args.num_val",
            "3",
        ),
    ),
    "cityscapes": DatasetCase(
        tasks=("segmentation", "part_segmentation", "disparity"),
        head="dpt",
        batch_size=16,
        overrides=("--data.init_args.root", str(DATA / "cityscapes")),
    ),
    "taskonomy": DatasetCase(
        tasks=("autoencoder", "depth", "normals", "keypoints2d", "edge_texture"),
        head="dpt",
        batch_size=32,
        overrides=(
            "--data.init_args.root",
            str(DATA / "taskonomy"),
            "--data.init_args.train_buildings",
            "[allensville, coffeen]",
            "--data.init_args.val_buildings",
            "[beechwood]",
            "--data.init_args.test_buildings",
            "[ihlen]",
            "--data.init_args.image_size",
            "28",
        ),
    ),
}
"""The fake datasets hold a handful of small images (tests/data/<name>/data.py)."""

TRAIN_CROPS = {"nyuv2": "[16, 28]", "cityscapes": "[16, 32]"}
"""The configs' crops (280 x 378, 128 x 256) are larger than the fake images."""

TINY_ENCODER = (
    "--model.init_args.encoder.name",
    "vit_small_patch16_224",
    "--model.init_args.encoder.model_kwargs",
    "{patch_size: 14, embed_dim: 32, depth: 4, num_heads: 2, img_size: [28, 42]}",
    "--model.init_args.encoder.pretrained",
    "false",
    "--model.init_args.encoder.indices",
    "[0,1,2,3]",
)
FAST_TRAINER = (
    "--trainer.max_steps",
    "2",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32-true",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.log_every_n_steps",
    "1",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.num_workers",
    "0",
    "--data.init_args.pin_memory",
    "false",
    "--log_images",  # the panels are checked in test_cli.py and test_loggers.py
    "false",
)


def config(dataset: str, stage: str) -> Path:
    return ROOT / "configs" / f"{dataset}_{stage}.yaml"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def run_cli(args: list[str]) -> None:
    """Run the console script in-process, with tracebacks instead of one-line user errors.

    One intra-op thread: the tiny models gain nothing from more, and OpenMP's barriers make
    small convolutions hundreds of times slower when other processes share the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            mock.patch.dict(os.environ, {"LIGHTNING_SIMO_DEBUG": "1"}),
            mock.patch.object(sys, "argv", ["lightning_simo"]),
        ):
            main(args)
    finally:
        torch.set_num_threads(threads)


def common_overrides(dataset: str, stage: str) -> list[str]:
    args = [*TINY_ENCODER, *FAST_TRAINER, *DATASETS[dataset].overrides]
    if stage != "merge" and dataset in TRAIN_CROPS:  # merge configs train uncropped
        args += ["--data.init_args.crop", TRAIN_CROPS[dataset]]
    return args


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "test_metrics.json").read_text())["metrics"]


def hparams(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]


def encoder_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The floating-point encoder tensors of a checkpoint, keyed as in ``Encoder``."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "net.encoder."
    return {
        k.removeprefix(prefix): v
        for k, v in state.items()
        if k.startswith(prefix) and v.is_floating_point()
    }


def initial_encoder() -> dict[str, torch.Tensor]:
    """θ0 of the end-to-end runs: the tiny encoder as ``seed_everything: 0`` initialises it."""
    names = iter(TINY_ENCODER[::2])
    values = dict(zip(names, TINY_ENCODER[1::2], strict=True))
    prefix = "--model.init_args.encoder."
    config = {k.removeprefix(prefix): yaml.safe_load(v) for k, v in values.items()}
    torch.manual_seed(0)
    return {k: v for k, v in Encoder(config).state_dict().items() if v.is_floating_point()}


def requires_joint_module() -> None:
    if importlib.util.find_spec(JOINT_MODULE) is None:
        pytest.skip(f"{JOINT_MODULE} (JointMTLModule) is not available yet")


# ----------------------------------------------------------------------------- parsing
def test_every_dataset_has_every_stage() -> None:
    for dataset in DATASETS:
        for stage in STAGES:
            assert config(dataset, stage).is_file(), config(dataset, stage)


def subcommand(raw: dict) -> str:
    """``fit`` for LightningCLI configs; a file without a trainer section drives ``study``."""
    return "fit" if "trainer" in raw else "study"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_prints(path: Path) -> None:
    raw = load_yaml(path)
    if str(raw.get("model", {}).get("class_path", "")).startswith(JOINT_MODULE):
        requires_joint_module()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
        run_cli([subcommand(raw), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(stdout.getvalue())
    assert set(raw) <= set(printed)
    for section in ("model", "data"):
        if "class_path" in raw.get(section, {}):
            assert printed[section]["class_path"] == raw[section]["class_path"]
            for key, value in raw[section].get("init_args", {}).items():
                if not isinstance(value, dict):  # nested dataclasses gain their defaults
                    assert printed[section]["init_args"][key] == value, (section, key)
    if "merge" in raw:
        assert printed["merge"]["checkpoints"] == raw["merge"]["checkpoints"]


# ----------------------------------------------------------------------------- paper settings
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("stage", STAGES)
def test_config_holds_paper_settings(dataset: str, stage: str) -> None:
    case = DATASETS[dataset]
    cfg = load_yaml(config(dataset, stage))
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["encoder"] == {
        "name": "vit_base_patch14_dinov2.lvd142m",
        "pretrained": True,
        "indices": [2, 5, 8, 11],
        "class_token": True,
        "input_scaling": "symmetric",
        "pad_to_patch": True,
    }
    assert model["head"]["kind"] == case.head
    if case.head == "linear":
        assert model["head"]["upsample"] == 1
    else:
        assert model["head"]["dpt_channels"] == [24, 48, 96, 192]
        assert model["head"]["dpt_features"] == 128
    assert (model["lr"], model["weight_decay"]) == (1e-4, 1e-4)
    assert (model["schedule"], model["warmup_fraction"]) == ("onecycle", 0.05)
    assert trainer["precision"] == "bf16-mixed"
    if stage == "mtl":  # JointMTLModule clips itself (trainer clipping breaks GradNorm)
        assert model["grad_clip"] == 25 and "gradient_clip_val" not in trainer
    else:
        assert trainer["gradient_clip_val"] == 25
    assert data["batch_size"] == case.batch_size
    assert "{root}" in trainer["logger"]["init_args"]["save_dir"]

    if stage == "single_task":
        assert trainer["max_epochs"] == 50
        assert "{tasks}" in trainer["default_root_dir"]
        assert model["probe_epochs"] == 5
        assert len(data["tasks"]) == 1 and data["tasks"][0] in case.tasks
        assert any(c["class_path"].endswith("EarlyStopping") for c in trainer["callbacks"])
    else:
        assert tuple(data["tasks"]) == case.tasks
    if stage == "mtl":
        assert cfg["model"]["class_path"] == f"{JOINT_MODULE}.JointMTLModule"
        assert model["weighting"] == "equal"
        assert trainer["max_epochs"] == 200
        assert "merge" not in cfg
    if stage == "merge":
        merge = cfg["merge"]
        assert cfg["model"]["class_path"] == "lightning_simo.modules.simo.SIMOModule"
        assert set(merge["checkpoints"]) == set(case.tasks)
        assert (merge["method"], merge["scaling"], merge["realign"]) == (
            "task_arithmetic",
            "search",
            "heads",
        )
        assert merge["search_split"] == "val"
        assert [round(a, 6) for a in merge["search_grid"]] == list(DEFAULT_ALPHA_GRID)
        assert data["train_split"] == "val"
        assert data["scales"] == [1.0] and data["hflip"] is False and data["crop"] is None
        assert len(model["reference_metrics"]) == len(case.tasks)


# ----------------------------------------------------------------------------- end to end
class SingleTaskRuns:
    """Single-task runs on the fake data, trained on first request and shared by the tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[tuple[str, str], Path] = {}

    def run_dir(self, dataset: str, task: str) -> Path:
        return self.root / dataset / "single_task" / task

    def get(self, dataset: str, task: str) -> Path:
        if (dataset, task) not in self.runs:
            path = str(config(dataset, "single_task"))
            # the probe is cut so that two steps change the encoder (non-zero task vectors)
            args = [
                *common_overrides(dataset, "single_task"),
                "--data.init_args.tasks",
                f"[{task}]",
                "--model.init_args.probe_epochs",
                "0",
                "--trainer.default_root_dir",
                str(self.root / dataset / "single_task" / "{tasks}"),
            ]
            run_cli(["fit", "--config", path, *args])
            ckpt = self.run_dir(dataset, task) / "checkpoints" / "best.ckpt"
            run_cli(["test", "--config", path, *args, "--ckpt_path", str(ckpt)])
            self.runs[(dataset, task)] = self.run_dir(dataset, task)
        return self.runs[(dataset, task)]


@pytest.fixture(scope="module")
def single_task_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleTaskRuns]:
    yield SingleTaskRuns(tmp_path_factory.mktemp("runs"))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_single_task_config_runs(dataset: str, single_task_runs: SingleTaskRuns) -> None:
    case = DATASETS[dataset]
    for task in case.tasks:
        run_dir = single_task_runs.get(dataset, task)
        saved = hparams(run_dir / "checkpoints" / "best.ckpt")
        assert saved["tasks"] == [task]
        assert saved["encoder"]["name"] == "vit_small_patch16_224"
        assert saved["encoder"]["indices"] == [0, 1, 2, 3]
        assert saved["head"]["kind"] == case.head
        assert (saved["lr"], saved["weight_decay"]) == (1e-4, 1e-4)
        metrics = read_metrics(run_dir)
        primary = f"{task}/{build_task(task, saved['num_classes'].get(task)).primary}"
        assert math.isfinite(metrics[primary]), (primary, metrics)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_merge_config_runs(dataset: str, single_task_runs: SingleTaskRuns, tmp_path: Path) -> None:
    case = DATASETS[dataset]
    runs = {task: single_task_runs.get(dataset, task) for task in case.tasks}
    checkpoints = ", ".join(f"{t}: {d / 'checkpoints' / 'best.ckpt'}" for t, d in runs.items())
    references = ", ".join(str(d / "test_metrics.json") for d in runs.values())
    path = str(config(dataset, "merge"))
    args = [
        *common_overrides(dataset, "merge"),
        "--merge.checkpoints",
        f"{{{checkpoints}}}",
        "--model.init_args.reference_metrics",
        f"[{references}]",
        "--trainer.default_root_dir",
        str(tmp_path / "merge"),
    ]
    run_cli(["fit", "--config", path, *args])
    last = tmp_path / "merge" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    merge_state = next(v for k, v in state["callbacks"].items() if k.startswith("MergeCallback"))
    assert merge_state["alpha"] in DEFAULT_ALPHA_GRID
    assert sorted(float(a) for a in merge_state["search_scores"]) == list(DEFAULT_ALPHA_GRID)
    assert set(merge_state["sources"]) == set(case.tasks)
    # every run starts from the same θ0 (seed 0, same encoder), and head re-alignment never
    # trains the encoder: it must still be exactly θ0 + α Σ_t (θ_t - θ0)
    alpha = merge_state["alpha"]
    theta0 = initial_encoder()
    finetuned = [encoder_weights(d / "checkpoints" / "best.ckpt") for d in runs.values()]
    merged = encoder_weights(last)
    assert set(merged) == set(theta0)
    assert any(
        not torch.equal(f["backbone.cls_token"], theta0["backbone.cls_token"]) for f in finetuned
    )
    for key, base in theta0.items():
        expected = base + alpha * sum(f[key] - base for f in finetuned)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=key)

    run_cli(["test", "--config", path, *args, "--ckpt_path", str(last)])
    metrics = read_metrics(tmp_path / "merge")
    for task in case.tasks:
        assert metrics[f"{task}/normalized"] > 0
    assert math.isfinite(metrics["delta_mtl_ratio"])
    assert math.isfinite(metrics["delta_mtl_difference"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_mtl_config_runs(dataset: str, single_task_runs: SingleTaskRuns, tmp_path: Path) -> None:
    requires_joint_module()
    case = DATASETS[dataset]
    runs = {task: single_task_runs.get(dataset, task) for task in case.tasks}
    references = ", ".join(str(d / "test_metrics.json") for d in runs.values())
    path = str(config(dataset, "mtl"))
    args = [
        *common_overrides(dataset, "mtl"),
        "--model.init_args.probe_epochs",
        "0",
        "--model.init_args.reference_metrics",
        f"[{references}]",
        "--trainer.default_root_dir",
        str(tmp_path / "mtl"),
    ]
    run_cli(["fit", "--config", path, *args])
    best = tmp_path / "mtl" / "checkpoints" / "best.ckpt"
    saved = hparams(best)
    assert saved["weighting"] == "equal"
    assert saved["tasks"] == list(case.tasks)
    run_cli(["test", "--config", path, *args, "--ckpt_path", str(best)])
    metrics = read_metrics(tmp_path / "mtl")
    assert math.isfinite(metrics["delta_mtl_ratio"])


# ----------------------------------------------------------------------------- FusionBench's NYUv2
FUSIONBENCH = {stage: ROOT / "configs" / f"fusionbench_nyuv2_{stage}.yaml" for stage in STAGES[:2]}
FUSIONBENCH_TINY = (
    "--model.init_args.encoder.name",
    "test_resnet",
    "--model.init_args.encoder.pretrained",
    "false",
    "--model.init_args.head.aspp_rates",
    "[1, 2, 3]",
    "--model.init_args.head.aspp_channels",
    "8",
    *FAST_TRAINER,
    *DATASETS["nyuv2"].overrides,
)
"""The same network in miniature: timm's tiny ResNet, still dilated to output stride 8."""


def test_fusionbench_configs_hold_fusionbench_settings() -> None:
    single, merged = (load_yaml(FUSIONBENCH[s]) for s in STAGES[:2])
    for cfg in (single, merged):
        model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
        assert model["encoder"] == {
            "name": "resnet50.tv_in1k",
            "pretrained": True,
            "model_kwargs": {"output_stride": 8},
            "indices": [-1],
            "class_token": False,
            "input_scaling": "none",
            "pad_to_patch": False,
        }
        assert model["head"] == {
            "kind": "deeplab",
            "aspp_rates": [12, 24, 36],
            "aspp_channels": 256,
        }
        assert data["crop"] is None and data["scales"] == [1.0] and data["hflip"] is False
        assert data["batch_size"] == 16 and cfg["trainer"]["precision"] == "32-true"
    model, trainer = single["model"]["init_args"], single["trainer"]
    assert (model["lr"], model["weight_decay"], model["probe_epochs"]) == (1e-4, 0.0, 0)
    assert trainer["max_epochs"] == 40 and "gradient_clip_val" not in trainer
    assert not any(c["class_path"].endswith("EarlyStopping") for c in trainer["callbacks"])
    merge = merged["merge"]
    assert (merge["method"], merge["scaling"], merge["realign"], merge["bn_stats"]) == (
        "task_arithmetic",
        0.3,
        "none",
        "merge",
    )
    assert all(p.endswith("/checkpoints/last.ckpt") for p in merge["checkpoints"].values())
    # a ResNet-50 dilated to stride 8 maps a 288 x 384 image to 36 x 48 x 2048
    encoder = Encoder({**model["encoder"], "pretrained": False})
    assert (encoder.channels, encoder.reductions) == ([2048], [8])


@pytest.mark.slow
def test_fusionbench_configs_run(tmp_path: Path) -> None:
    tasks = DATASETS["nyuv2"].tasks
    single = str(FUSIONBENCH["single_task"])
    for task in tasks:
        args = [*FUSIONBENCH_TINY, "--data.init_args.tasks", f"[{task}]"]
        # a large step, so that two of them give task vectors the three methods tell apart
        args += ["--model.init_args.lr", "0.05", "--trainer.default_root_dir", str(tmp_path / task)]
        run_cli(["fit", "--config", single, *args])
        last = tmp_path / task / "checkpoints" / "last.ckpt"
        run_cli(["test", "--config", single, *args, "--ckpt_path", str(last)])
    checkpoints = ", ".join(f"{t}: {tmp_path / t / 'checkpoints' / 'last.ckpt'}" for t in tasks)
    references = ", ".join(str(tmp_path / t / "test_metrics.json") for t in tasks)
    methods = {
        "task_arithmetic": [],
        "average": ["--merge.method", "average"],
        "ties": [
            "--merge.method",
            "ties",
            "--merge.method_options",
            "{density: 0.2, trim_scope: global, merge_rule: sum}",
        ],
    }
    results = {}
    for method, extra in methods.items():
        run_cli(
            [
                "test",
                "--config",
                str(FUSIONBENCH["merge"]),
                *FUSIONBENCH_TINY,
                "--merge.checkpoints",
                f"{{{checkpoints}}}",
                "--model.init_args.reference_metrics",
                f"[{references}]",
                "--trainer.default_root_dir",
                str(tmp_path / "merge" / method),
                *extra,
            ]
        )
        results[method] = read_metrics(tmp_path / "merge" / method)
        assert math.isfinite(results[method]["delta_mtl_ratio"]), method
        assert math.isfinite(results[method]["delta_mtl_difference"]), method
    # three methods, three merged encoders
    assert len({r["normals/mean"] for r in results.values()}) == 3
