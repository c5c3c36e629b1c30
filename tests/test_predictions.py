"""``predict`` writes one ``.npy`` and one ``.png`` per image and task, readable back.

On the synthetic single-task and merged checkpoints of :mod:`tiny_runs`, on a folder of the
user's own JPEG / PNG images of mixed sizes (each prediction at its image's own size), and under
2-process CPU DDP (every image written exactly once, by one rank).

Run directly, this file is the DDP worker: ``python tests/test_predictions.py OUT ARGS...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_runs import REPO, SIZES, TASKS, TinyRuns, tiny_config, tiny_runs  # noqa: E402

from lightning_simo.callbacks.predictions import PredictionWriter  # noqa: E402
from lightning_simo.cli import build_cli, main  # noqa: E402

HEIGHT, WIDTH = SIZES["height"], SIZES["width"]
NUM_CLASSES = 8  # the synthetic scenes' segmentation classes


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])


def _check_task_files(folder: Path, task: str, names: list[str], size: tuple[int, int]) -> None:
    npys = sorted(p.stem for p in (folder / task).glob("*.npy"))
    pngs = sorted(p.stem for p in (folder / task).glob("*.png"))
    assert npys == sorted(names) and pngs == sorted(names), (task, npys, pngs)
    for name in names:
        raw = np.load(folder / task / f"{name}.npy")
        picture = Image.open(folder / task / f"{name}.png")
        assert picture.size == (size[1], size[0]) and picture.mode == "RGB"
        if task == "segmentation":
            assert raw.dtype == np.uint8 and raw.shape == size
            assert raw.max() < NUM_CLASSES
        else:
            assert raw.dtype == np.float16 and raw.shape == size
            assert np.isfinite(raw).all()
            lo, hi = float(picture.text["min"]), float(picture.text["max"])
            assert lo <= hi and lo == pytest.approx(float(raw[raw != 0].min()), rel=1e-3)


def test_single_task_checkpoint_predicts_every_test_image(runs: TinyRuns) -> None:
    run = runs.single["segmentation"]
    main(
        [
            "predict",
            "--config",
            str(REPO / "configs/synthetic/single_task.yaml"),
            "--config",
            str(tiny_config(runs.root)),
            "--data.tasks",
            "[segmentation]",
            f"--trainer.default_root_dir={run}",
            "--ckpt_path",
            str(runs.checkpoint(run)),
        ]
    )
    names = [f"{i:06d}" for i in range(SIZES["num_test"])]
    _check_task_files(run / "predictions", "segmentation", names, (HEIGHT, WIDTH))
    assert not (run / "predictions" / "depth").exists()


def _merge_predict_args(runs: TinyRuns, out: Path) -> list[str]:
    ckpts = {t: str(runs.checkpoint(runs.single[t])) for t in TASKS}
    return [
        "predict",
        "--config",
        str(REPO / "configs/synthetic/merge.yaml"),
        "--config",
        str(tiny_config(runs.root)),
        "--data.tasks",
        f"[{','.join(TASKS)}]",
        f"--merge.checkpoints={ckpts}",
        f"--trainer.default_root_dir={out}",
        "--ckpt_path",
        str(runs.checkpoint(runs.merge)),
    ]


def test_merged_checkpoint_predicts_every_task(runs: TinyRuns, tmp_path: Path) -> None:
    main(_merge_predict_args(runs, tmp_path / "out"))
    names = [f"{i:06d}" for i in range(SIZES["num_test"])]
    for task in TASKS:
        _check_task_files(tmp_path / "out" / "predictions", task, names, (HEIGHT, WIDTH))


def test_image_folder_gets_predictions_of_each_images_own_size(
    runs: TinyRuns, tmp_path: Path
) -> None:
    images = tmp_path / "my_images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"wide.jpg": (20, 52), "tall.png": (50, 37), "more/grey.png": (16, 16)}
    for name, (h, w) in sizes.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        picture = Image.fromarray(pixels)
        (picture.convert("L") if "grey" in name else picture).save(images / name)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    ckpt = runs.checkpoint(runs.merge)
    args = _merge_predict_args(runs, out)
    args += [
        "--data=lightning_simo.data.folder.ImageFolderDataModule",
        f"--data.root={images}",
        f"--data.checkpoint={ckpt}",
        f"--data.size=[{HEIGHT},{WIDTH}]",
        "--data.batch_size=2",
    ]
    args.remove("--data.tasks")
    args.remove(f"[{','.join(TASKS)}]")
    main(args)
    for name, size in sizes.items():
        stem = name.rsplit(".", 1)[0]
        for task in TASKS:
            raw = np.load(out / "predictions" / task / f"{stem}.npy")
            assert raw.shape == size, (name, task, raw.shape)
            assert Image.open(out / "predictions" / task / f"{stem}.png").size == size[::-1]
    assert len(list((out / "predictions" / "depth").rglob("*.npy"))) == len(sizes)


def test_image_folder_without_images_is_refused(runs: TinyRuns, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = _merge_predict_args(runs, tmp_path / "out")
    args += [
        "--data=lightning_simo.data.folder.ImageFolderDataModule",
        f"--data.root={tmp_path / 'empty'}",
        f"--data.checkpoint={runs.checkpoint(runs.merge)}",
    ]
    args.remove("--data.tasks")
    args.remove(f"[{','.join(TASKS)}]")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not (tmp_path / "out" / "predictions").exists()


def test_writer_refuses_a_task_the_model_lacks(runs: TinyRuns, tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path / "p"), tasks=["normals"])
    cli = build_cli(_merge_predict_args(runs, tmp_path / "out")[1:-2], run=False)
    with pytest.raises(ValueError, match="no task 'normals'.*segmentation, depth"):
        writer.setup(cli.trainer, cli.model, "predict")


# ---------------------------------------------------------------------------- DDP
WORLD_SIZE = 2
DDP_TEST_IMAGES = 7  # odd: a padding sampler would repeat one image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(out: Path, args: list[str]) -> None:
    cli = build_cli(args[:-2], run=False)  # without `--ckpt_path PATH`, given to predict
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=args[-1])
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
    rank = cli.trainer.global_rank
    (out / f"written_rank{rank}.json").write_text(json.dumps(writer.written))


def test_ddp_writes_every_image_exactly_once(runs: TinyRuns, tmp_path: Path) -> None:
    run = runs.single["depth"]
    out = tmp_path / "ddp"
    args = [
        "--config",
        str(REPO / "configs/synthetic/single_task.yaml"),
        "--config",
        str(tiny_config(runs.root)),
        "--data.tasks",
        "[depth]",
        f"--data.num_test={DDP_TEST_IMAGES}",
        "--data.eval_batch_size=2",
        f"--trainer.default_root_dir={out}",
        f"--trainer.devices={WORLD_SIZE}",
        "--trainer.strategy=ddp",
        "--ckpt_path",
        str(runs.checkpoint(run)),
    ]
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        NODE_RANK="0",
        WORLD_SIZE=str(WORLD_SIZE),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out), *args],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    written = [json.loads((out / f"written_rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(written[0] + written[1])
    assert everything == [f"{i:06d}" for i in range(DDP_TEST_IMAGES)]  # each exactly once
    assert written[0] and written[1]  # both ranks took their share
    assert len(list((out / "predictions" / "depth").glob("*.npy"))) == DDP_TEST_IMAGES
    assert not list((out / "predictions").rglob("*.tmp"))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2:])
