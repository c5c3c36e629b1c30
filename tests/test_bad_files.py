"""Every bad file, one line, at every entry point that reads one.

Files: pickled code (a payload that would create a marker file if unpickled), a truncated
checkpoint, random bytes, an empty file, a JSON where a checkpoint is expected, a checkpoint of
another encoder; for reference metrics: random bytes, an empty file, truncated JSON and a
checkpoint where JSON is expected. Entry points: ``--ckpt_path`` (test and fit), the encoder
checkpoint, ``init_from``, merge task checkpoints, ``merge.pretrained`` and
``model.reference_metrics``. The loader tests check each diagnosis says what the file really is;
the command-line rows (in-process ``main``) check what a user sees: exit 2, exactly one line
``lightning_simo: error: <path>: ...``, no traceback, the marker never created, and no outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
from test_bad_input import (
    Setup,
    WritesAFile,
    fake_single_task_checkpoint,
    outputs_in,
    task_checkpoints,  # noqa: F401 (fixture)
)

from lightning_simo.checkpoints import CheckpointError, load_state_dict, read_checkpoint
from lightning_simo.cli import main

ERROR_PREFIX = "lightning_simo: error: "


def _code(folder: Path) -> Path:
    path = folder / "code.ckpt"
    torch.save({"state_dict": {"weight": WritesAFile(folder / "marker")}}, path)
    return path


def _truncated(folder: Path) -> Path:
    good = fake_single_task_checkpoint(folder / "good.ckpt", "segmentation", seed=3)
    path = folder / "truncated.ckpt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def _random(folder: Path) -> Path:
    path = folder / "random.ckpt"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.ckpt"
    path.write_bytes(b"")
    return path


def _json(folder: Path) -> Path:
    path = folder / "metrics.ckpt"
    path.write_text(json.dumps({"metrics": {"segmentation/miou": 40.0}}))
    return path


def _other_encoder(folder: Path) -> Path:
    """A Lightning checkpoint of a wider encoder (no hyper-parameters to rebuild it from)."""
    path = fake_single_task_checkpoint(folder / "wide.ckpt", "segmentation", seed=5, embed_dim=48)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "pytorch-lightning_version": lightning.__version__}, path)
    return path


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "pickled code": (_code, ("refused", "pickled code", "not executed", "state dict")),
    "truncated": (_truncated, ("not a readable checkpoint", "truncated or corrupt")),
    "random bytes": (_random, ("neither a torch file nor safetensors", "random")),
    "empty": (_empty, ("empty file",)),
    "json": (_json, ("a json file, not a checkpoint",)),
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_loader_diagnoses_what_the_file_is(kind: str, tmp_path: Path) -> None:
    make, words = BAD_CHECKPOINTS[kind]
    path = make(tmp_path)
    for load in (load_state_dict, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert message.rstrip().endswith(")"), message  # ends with what to do
        assert "weights_only" not in message
        for word in words:
            assert word in message.lower(), (word, message)
        if kind != "pickled code":
            assert "pickled" not in message, message  # not the wrong diagnosis
    assert not (tmp_path / "marker").exists()


def test_a_plain_state_dict_is_not_a_lightning_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="plain state dict, not a Lightning checkpoint"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------- command line
@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs: from the test's folder (no litter in the repo), without debug tracebacks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIGHTNING_SIMO_DEBUG", raising=False)


def _test_args(s: Setup, *extra: str) -> list[str]:
    args = s.single_task(*extra)
    return ["test", *args[1:]]


ENTRY_POINTS: dict[str, Callable[[Setup, Path], list[str]]] = {
    "test --ckpt_path": lambda s, bad: _test_args(s, "--ckpt_path", str(bad)),
    "fit --ckpt_path": lambda s, bad: s.single_task("--ckpt_path", str(bad)),
    "encoder checkpoint": lambda s, bad: s.single_task(
        "--model.init_args.encoder", f"{{checkpoint: {bad}}}"
    ),
    "init_from": lambda s, bad: s.single_task("--model.init_args.init_from", str(bad)),
    "merge checkpoints": lambda s, bad: s.merge(checkpoints={"depth": bad}),
    "merge.pretrained": lambda s, bad: s.merge("--merge.pretrained", str(bad)),
}

ROWS = [("test --ckpt_path", kind) for kind in [*BAD_CHECKPOINTS, "other encoder"]] + [
    (entry, kind)
    for entry in list(ENTRY_POINTS)[1:]
    for kind in ("pickled code", "json", "other encoder")
]
EXTRA_KINDS = {"other encoder": (_other_encoder, ())}


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("entry, kind", ROWS, ids=[f"{e}: {k}" for e, k in ROWS])
def test_bad_file_at_entry_point(
    entry: str,
    kind: str,
    tmp_path: Path,
    task_checkpoints: dict[str, Path],  # noqa: F811 (fixture imported above)
    capsys: pytest.CaptureFixture,
) -> None:
    make, _ = {**BAD_CHECKPOINTS, **EXTRA_KINDS}[kind]
    bad = make(tmp_path)
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    code, err = _run(ENTRY_POINTS[entry](setup, bad), capsys)

    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, err[-3000:]
    assert str(bad) in errors[0], errors[0]
    assert "weights_only" not in errors[0]
    assert not (tmp_path / "marker").exists()
    assert outputs_in(setup.run_dir) == []


def _bad_json(kind: str, folder: Path) -> Path:
    path = folder / "test_metrics.json"
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_text(json.dumps({"metrics": {"segmentation/miou": 40.0}})[:20])
    else:  # a checkpoint where the JSON is expected
        path.write_bytes(
            fake_single_task_checkpoint(folder / "seg.ckpt", "segmentation", 1).read_bytes()
        )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random bytes", "empty", "truncated", "checkpoint"])
def test_bad_reference_metrics_fail_before_the_test_epoch(
    kind: str,
    tmp_path: Path,
    task_checkpoints: dict[str, Path],  # noqa: F811 (fixture imported above)
    capsys: pytest.CaptureFixture,
) -> None:
    bad = _bad_json(kind, tmp_path)
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    ckpt = _lightning_checkpoint(tmp_path, "segmentation")
    args = _test_args(
        setup, "--ckpt_path", str(ckpt), "--model.init_args.reference_metrics", f"[{bad}]"
    )
    code, err = _run(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert f"{bad}: not a test_metrics.json" in errors[0], errors[0]
    assert "Traceback" not in err
    assert "Testing DataLoader" not in err  # refused before the test epoch, not after it
    assert outputs_in(setup.run_dir) == []


# ----------------------------------------------------------------------------- early failures
MTL = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "mtl.yaml"


def _lightning_checkpoint(folder: Path, task: str) -> Path:
    path = fake_single_task_checkpoint(folder / f"{task}-lightning.ckpt", task, seed=2)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "pytorch-lightning_version": lightning.__version__}, path)
    return path


def _corrupt_sample(root: Path) -> None:
    (root / "train" / "image" / "0.npy").write_bytes(b"\x93NUMPY garbage, not an array")


def _gradnorm_with_clipping(s: Setup) -> list[str]:
    args = s.merge()
    args[2] = str(MTL)  # the joint-MTL config instead of merge.yaml; no merge section
    return [
        *args,
        "--merge.checkpoints",
        "{}",
        "--model.init_args.weighting",
        "gradnorm",
        "--trainer.gradient_clip_val",
        "1.0",
    ]


EARLY_ROWS: dict[str, tuple[Callable[[Setup], list[str]], tuple[str, ...]]] = {
    "test --data.tasks [depth] on a segmentation checkpoint": (
        lambda s: _test_args(
            s,
            "--data.init_args.tasks",
            "[depth]",
            "--ckpt_path",
            str(_lightning_checkpoint(s.tmp, "segmentation")),
        ),
        ("segmentation-lightning.ckpt", "no head for depth", "--data.tasks"),
    ),
    "unknown merge method": (
        lambda s: s.merge("--merge.method", "tiess"),
        ("'tiess' is not a merging method", "ties"),
    ),
    "probe_epochs >= max_epochs": (
        lambda s: s.single_task("--trainer.max_steps", "-1", "--model.init_args.probe_epochs", "1"),
        ("probe_epochs=1 >= trainer.max_epochs=1", "never be fine-tuned"),
    ),
    "gradnorm with gradient_clip_val": (_gradnorm_with_clipping, ("gradient clipping",)),
    "default_root_dir null with {root} paths": (
        lambda s: s.single_task("--trainer.default_root_dir", "null"),
        ("default_root_dir is null", "{root}", "--trainer.default_root_dir"),
    ),
    "bad sample in a DataLoader worker": (
        lambda s: [*s.nyuv2(edit=_corrupt_sample), "--data.init_args.num_workers", "1"],
        ("0.npy", "corrupt"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EARLY_ROWS))
def test_early_clean_failure(
    name: str,
    tmp_path: Path,
    task_checkpoints: dict[str, Path],  # noqa: F811 (fixture imported above)
    capsys: pytest.CaptureFixture,
) -> None:
    build, words = EARLY_ROWS[name]
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    code, err = _run(build(setup), capsys)
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    assert outputs_in(setup.run_dir) == []
    assert not (tmp_path / "{root}").exists() and not (tmp_path / "test_metrics.json").exists()


@pytest.mark.slow
def test_a_run_failing_before_training_leaves_no_logger_folder(
    tmp_path: Path,
    task_checkpoints: dict[str, Path],  # noqa: F811 (fixture imported above)
    capsys: pytest.CaptureFixture,
) -> None:
    setup = Setup(tmp_path, tmp_path / "run", task_checkpoints)
    logger = "{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: '{root}', name: tb}}"
    wide = _other_encoder(tmp_path)  # refused in the merge callback's setup, after the logger's
    args = setup.merge("--trainer.logger", logger, checkpoints={"segmentation": wide})
    code, err = _run(args, capsys)
    assert code == 2 and "shape mismatch" in err, err[-3000:]
    assert not (setup.run_dir / "tb").exists(), sorted(setup.run_dir.rglob("*"))
