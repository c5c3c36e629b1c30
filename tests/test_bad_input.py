"""Bad input through the command line: one clear error line, no traceback, no outputs.

Every row runs ``lightning_simo fit`` (``cli.main``, in-process) on a tiny configuration (a
4-block, width-32 ViT and a handful of 32x40 scenes) with one thing wrong, and checks what a user
sees: a non-zero exit, one ``lightning_simo: error:`` line naming the problem and its fix, no
Python traceback, and a run folder without checkpoints or result files (nothing half-written that
a later stage could pick up). Three rows also run through ``python -m lightning_simo`` in a
subprocess, proving the real entry point maps errors the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli_overrides, tiny_encoder

from lightning_simo.cli import main
from lightning_simo.data.synthetic import NUM_CLASSES, write_nyuv2_layout
from lightning_simo.modules.simo import SIMOModule

REPO = Path(__file__).resolve().parents[1]
SINGLE_TASK = REPO / "configs" / "synthetic" / "single_task.yaml"
MERGE = REPO / "configs" / "synthetic" / "merge.yaml"
MERGE_TASKS = ("segmentation", "depth", "normals")
OUTPUT_SUFFIXES = {".ckpt", ".pt", ".pth", ".safetensors", ".json", ".csv", ".md", ".png", ".tmp"}
ERROR_PREFIX = "lightning_simo: error:"


# ----------------------------------------------------------------------------- helpers
def tiny_overrides(root: Path) -> dict:
    """A config layered over the repo's synthetic configs: tiny model, data and trainer."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "{root}/checkpoints", "save_last": True},
    }
    return cli_overrides(root, {"max_epochs": 1, "max_steps": 2, "callbacks": [checkpoint]})


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LIGHTNING_SIMO_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_simo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def outputs_in(folder: Path) -> list[Path]:
    """Checkpoints, result tables, metrics files, figures and temporary files under ``folder``."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in OUTPUT_SUFFIXES)


def fake_single_task_checkpoint(path: Path, task: str, seed: int, **encoder_kwargs: object) -> Path:
    """A single-task SIMOModule checkpoint (``state_dict`` entry) with moved encoder weights."""
    torch.manual_seed(seed)
    num_classes = {"segmentation": NUM_CLASSES} if task == "segmentation" else None
    module = SIMOModule(
        tasks=[task],
        num_classes=num_classes,
        encoder=tiny_encoder(**encoder_kwargs),
        head={"kind": "linear", "upsample": 4},
    )
    with torch.no_grad():
        for param in module.net.encoder.parameters():
            param.add_(0.01 * torch.randn_like(param))
    torch.save({"state_dict": module.state_dict()}, path)
    return path


class WritesAFile:
    """Pickles as a call to ``open(path, "w")``: unpickling it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("single_task")
    return {
        task: fake_single_task_checkpoint(folder / f"{task}.ckpt", task, seed=i)
        for i, task in enumerate(MERGE_TASKS)
    }


# ----------------------------------------------------------------------------- one row
@dataclass
class Setup:
    """What a row prepares in its own folder."""

    tmp: Path
    run_dir: Path
    checkpoints: dict[str, Path]

    def single_task(self, *extra: str) -> list[str]:
        config = tiny_overrides(self.run_dir)
        tiny = write_yaml(self.tmp / "tiny.yaml", config)
        return ["fit", "--config", str(SINGLE_TASK), "--config", str(tiny), *extra]

    def merge(self, *extra: str, checkpoints: dict[str, Path] | None = None) -> list[str]:
        config = tiny_overrides(self.run_dir)
        config["data"]["init_args"]["tasks"] = list(MERGE_TASKS)
        config["merge"] = {
            "checkpoints": {
                t: str(p) for t, p in {**self.checkpoints, **(checkpoints or {})}.items()
            },
            "search_grid": [0.0, 1.0],
        }
        tiny = write_yaml(self.tmp / "tiny.yaml", config)
        return ["fit", "--config", str(MERGE), "--config", str(tiny), *extra]

    def nyuv2(
        self,
        root: Path | None = None,
        tasks: list[str] | None = None,
        edit: Callable[[Path], None] | None = None,
    ) -> list[str]:
        if root is None:
            root = write_nyuv2_layout(self.tmp / "nyuv2", {"train": 4, "val": 4}, 28, 42)
            if edit is not None:
                edit(root)
        data = {
            "class_path": "lightning_simo.data.nyuv2.NYUv2DataModule",
            "init_args": {
                "root": str(root),
                "tasks": tasks or ["segmentation", "depth"],
                "crop": None,
                "num_val": 2,
                "batch_size": 4,
            },
        }
        config = tiny_overrides(self.run_dir)
        config["data"] = data
        tiny = write_yaml(self.tmp / "tiny.yaml", config)
        # `--data null` drops the synthetic datamodule's arguments, which NYUv2 does not take
        return ["fit", "--config", str(SINGLE_TASK), "--data", "null", "--config", str(tiny)]


def _set_pixel(folder: str, value: float) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "train" / folder / "0.npy"
        array = np.load(path)
        array.reshape(-1)[5] = value
        np.save(path, array)

    return edit


def _corrupt(root: Path) -> None:
    (root / "train" / "image" / "0.npy").write_bytes(b"\x93NUMPY garbage, not an array")


def _drop_folder(root: Path) -> None:
    shutil.rmtree(root / "train" / "depth")


def _drop_file(root: Path) -> None:
    (root / "train" / "depth" / "3.npy").unlink()


def _truncated(s: Setup) -> list[str]:
    good = s.checkpoints["depth"].read_bytes()
    bad = s.tmp / "truncated.ckpt"
    bad.write_bytes(good[: len(good) // 2])
    return s.merge(checkpoints={"depth": bad})


def _other_width(s: Setup) -> list[str]:
    wide = fake_single_task_checkpoint(s.tmp / "wide.ckpt", "depth", seed=5, embed_dim=48)
    return s.merge(checkpoints={"depth": wide})


def _other_encoder_for_init(s: Setup) -> list[str]:
    wide = fake_single_task_checkpoint(s.tmp / "wide.ckpt", "segmentation", seed=5, embed_dim=48)
    return s.single_task("--model.init_args.encoder", f"{{checkpoint: {wide}}}")


def _lacks_head(s: Setup) -> list[str]:
    return s.merge(checkpoints={"segmentation": s.checkpoints["depth"]})


def _pickled_code(s: Setup) -> list[str]:
    bad = s.tmp / "code.ckpt"
    torch.save({"state_dict": {"weight": WritesAFile(s.tmp / "marker")}}, bad)
    return s.single_task("--model.init_args.encoder", f"{{checkpoint: {bad}}}")


def _unwritable(s: Setup) -> list[str]:
    (s.tmp / "afile").write_text("a file, not a folder")
    s.run_dir = s.tmp / "afile" / "sub"
    return s.single_task()


def _yaml_typo(s: Setup) -> list[str]:
    typo = write_yaml(s.tmp / "typo.yaml", {"model": {"init_args": {"lr_typo": 1.0}}})
    return [*s.single_task(), "--config", str(typo)]


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable[[Setup], list[str]]
    keywords: tuple[str, ...]
    """Words the error must contain (case-insensitive): the problem and the fix."""
    parser_error: bool = False
    """A config the parser rejects: its own usage message, which must name the bad key."""


ROWS = [
    Row(
        "missing data root",
        lambda s: s.nyuv2(root=s.tmp / "no_such_dataset"),
        ("no_such_dataset", "does not exist", "data.init_args.root"),
    ),
    Row(
        "wrong layout: task folder missing",
        lambda s: s.nyuv2(edit=_drop_folder),
        ("depth", "does not exist", "layout"),
    ),
    Row(
        "mismatched file counts",
        lambda s: s.nyuv2(edit=_drop_file),
        ("holds 3 files", "holds 4", "one file per image"),
    ),
    Row("corrupt array file", lambda s: s.nyuv2(edit=_corrupt), ("0.npy", "corrupt", "re-extract")),
    Row(
        "label value out of range",
        lambda s: s.nyuv2(edit=_set_pixel("label", 20.0)),
        ("label value 20", "outside", "class count"),
    ),
    Row(
        "NaN depth",
        lambda s: s.nyuv2(edit=_set_pixel("depth", float("nan"))),
        ("depth map", "nan", "0.npy"),
    ),
    Row(
        "negative depth",
        lambda s: s.nyuv2(edit=_set_pixel("depth", -1.0)),
        ("depth map", "negative", "-1", "0 = invalid"),
    ),
    Row(
        "unknown task",
        lambda s: s.single_task("--data.init_args.tasks", "[segmentatoin]"),
        ("unknown task 'segmentatoin'", "known tasks", "segmentation"),
    ),
    Row(
        "task not provided by the dataset",
        lambda s: s.nyuv2(tasks=["edges"]),
        ("'edges' is not provided by nyuv2datamodule", "carries", "segmentation"),
    ),
    Row(
        "missing encoder checkpoint",
        lambda s: s.single_task("--model.init_args.encoder", "{checkpoint: /nope.ckpt}"),
        ("not found", "/nope.ckpt", "check the path"),
    ),
    Row(
        "missing merge checkpoint",
        lambda s: s.merge(checkpoints={"normals": s.tmp / "nope.ckpt"}),
        ("not found", "nope.ckpt", "check the path"),
    ),
    Row(
        "truncated checkpoint",
        _truncated,
        ("truncated.ckpt", "not a readable checkpoint", "truncated or corrupt"),
    ),
    Row(
        "checkpoint of another encoder (merge)",
        _other_width,
        ("wide.ckpt", "shape mismatch", "same encoder settings"),
    ),
    Row(
        "checkpoint of another encoder (init)",
        _other_encoder_for_init,
        ("wide.ckpt", "another encoder", "same encoder settings"),
    ),
    Row(
        "checkpoint without the task's head",
        _lacks_head,
        ("segmentation", "no head", "heads found: depth"),
    ),
    Row(
        "checkpoint holding pickled code",
        _pickled_code,
        ("code.ckpt", "refused", "not executed", "state dict"),
    ),
    Row("alpha below zero", lambda s: s.merge("--merge.scaling", "-1"), ("scaling", ">= 0", "-1")),
    Row(
        "density above one",
        lambda s: s.merge("--merge.method", "ties", "--merge.method_options", "{density: 1.5}"),
        ("density", "1.5"),
    ),
    Row(
        "empty re-alignment budget",
        lambda s: s.single_task("--data.init_args.train_budget", "0"),
        ("budget", "empty", "at least 1"),
    ),
    Row("unwritable output folder", _unwritable, ("afile", "output folder", "default_root_dir")),
    Row(
        "config key typo on the command line",
        lambda s: s.single_task("--model.init_args.lr_typo", "1"),
        ("'lr_typo' is not accepted",),
        parser_error=True,
    ),
    Row(
        "config key typo in a yaml file",
        _yaml_typo,
        ("'lr_typo' is not accepted",),
        parser_error=True,
    ),
]


@dataclass(frozen=True)
class Outcome:
    """What a user sees of one command: its exit status and what it printed on stderr."""

    returncode: int
    stderr: str


def run_in_process(
    args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Outcome:
    """``cli.main(args)`` in this interpreter, from ``cwd``: the same code path as the console
    script without an interpreter start-up per row. Any exception other than ``SystemExit``
    propagates and fails the test, as a traceback would."""
    monkeypatch.delenv("LIGHTNING_SIMO_DEBUG", raising=False)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    else:
        code = 0
    return Outcome(code, capsys.readouterr().err)


def check_outcome(row: Row, setup: Setup, outcome: Outcome) -> None:
    assert outcome.returncode != 0, outcome.stderr[-4000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-4000:]
    assert outputs_in(setup.run_dir) == []
    assert not (setup.tmp / "marker").exists()
    if row.parser_error:
        for word in row.keywords:
            assert word in outcome.stderr, outcome.stderr[-4000:]
        return
    errors = [line for line in outcome.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, outcome.stderr[-4000:]
    # the message may go on with a layout tree; its first line must name problem and fix
    message = errors[0].lower()
    for word in row.keywords:
        assert word.lower() in message, f"{word!r} not in {errors[0]!r}"


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_fails_cleanly(
    row: Row,
    tmp_path: Path,
    task_checkpoints: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    check_outcome(row, setup, run_in_process(row.build(setup), tmp_path, capsys, monkeypatch))


ENTRY_POINT_ROWS = [
    r
    for r in ROWS
    if r.name
    in ("unknown task", "checkpoint holding pickled code", "config key typo on the command line")
]
"""A user error, a refused unsafe checkpoint and a parser error through the real console entry
point (``python -m lightning_simo``): exit status and stderr as a shell sees them."""


@pytest.mark.slow
@pytest.mark.parametrize("row", ENTRY_POINT_ROWS, ids=[r.name for r in ENTRY_POINT_ROWS])
def test_bad_input_through_the_entry_point(
    row: Row, tmp_path: Path, task_checkpoints: dict[str, Path]
) -> None:
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    proc = run_cli(row.build(setup), tmp_path)
    check_outcome(row, setup, Outcome(proc.returncode, proc.stderr))


def test_pickled_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    """The refused checkpoint above is really dangerous: an unsafe load creates the file."""
    path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"weight": WritesAFile(tmp_path / "marker")}}, path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()
