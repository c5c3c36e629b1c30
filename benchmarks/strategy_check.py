"""The suite's stages under DDP and FSDP on the available GPUs, through the real CLI.

Run by ``benchmarks/gpu_check.sh``. Every stage is an ordinary ``lightning_simo fit|test`` of
the synthetic configs with small overrides (64 x 80 scenes, a few dozen steps), so what is
checked is what users run:

1. single-task fine-tuning of two tasks under ``--trainer.strategy fsdp`` (bf16-mixed when the
   GPU supports it), then ``test`` of each FSDP checkpoint;
2. merge + adapter re-alignment and merge + head re-alignment from those FSDP checkpoints
   (the MergeCallback loads them, merges and freezes before FSDP wraps), then ``test``;
3. joint MTL with equal and uncertainty weighting under FSDP; GradNorm under FSDP must stop
   with one error line naming the DDP strategy;
4. the single-task fit once more under ``ddp``.

Each stage must exit 0 (GradNorm: 2) and each fit must leave ``checkpoints/last.ckpt``. The
stages print their wall time; a failing stage prints the end of its output and the script
exits 1. Without CUDA it prints why it skips and exits 0.

Usage: ``python benchmarks/strategy_check.py [--out DIR] [--devices N]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--seed_everything=0",
    "--model.encoder.checkpoint=null",
    "--data.num_train=64",
    "--data.num_val=32",
    "--data.num_test=32",
    "--data.batch_size=8",
    "--data.num_workers=2",
    "--trainer.max_epochs=2",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


class Failed(RuntimeError):
    pass


def _run(name: str, args: list[str], expect: int = 0, must_say: str | None = None) -> str:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_simo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=600,
    )
    output = done.stdout + done.stderr
    ok = done.returncode == expect and (must_say is None or must_say in output)
    print(f"[strategy] {name:<44} exit {done.returncode}  {time.perf_counter() - started:6.1f} s")
    if not ok:
        raise Failed(f"stage {name!r} failed (exit {done.returncode}):\n{output[-4000:]}")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", help="run folder (default: a temporary one, deleted)")
    parser.add_argument("--devices", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("[strategy] SKIP: no CUDA device; DDP/FSDP stages need GPUs (Lightning's FSDP")
        print("[strategy]       refuses accelerator=cpu, torch's FSDP needs an accelerator)")
        return
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    root = Path(args.out or tempfile.mkdtemp(prefix="strategy_check_"))
    gpu = [
        "--trainer.accelerator=gpu",
        f"--trainer.devices={args.devices}",
        f"--trainer.precision={precision}",
    ]
    configs = REPO / "configs" / "synthetic"
    try:
        checkpoints = {}
        for task in ("segmentation", "depth"):
            run = root / f"single_{task}"
            common = [
                "--config",
                str(configs / "single_task.yaml"),
                f"--data.tasks=[{task}]",
                f"--trainer.default_root_dir={run}",
                *SMALL,
                *gpu,
            ]
            _run(
                f"fit single-task {task} (fsdp, {precision})",
                ["fit", *common, "--trainer.strategy=fsdp"],
            )
            checkpoints[task] = run / "checkpoints" / "last.ckpt"
            if not checkpoints[task].is_file():
                raise Failed(f"no FSDP checkpoint at {checkpoints[task]}")
            _run(
                f"test single-task {task} (fsdp)",
                ["test", *common, "--trainer.strategy=fsdp", f"--ckpt_path={checkpoints[task]}"],
            )
        sources = "{" + ", ".join(f"{t}: {p}" for t, p in checkpoints.items()) + "}"
        for realign in ("adapters", "heads"):
            run = root / f"merge_{realign}"
            common = [
                "--config",
                str(configs / "merge.yaml"),
                "--data.tasks=[segmentation, depth]",
                f"--merge.checkpoints={sources}",
                "--merge.scaling=0.5",
                f"--merge.realign={realign}",
                f"--trainer.default_root_dir={run}",
                "--trainer.strategy=fsdp",
                *SMALL,
                *gpu,
            ]
            _run(f"fit merge + {realign} from FSDP checkpoints (fsdp)", ["fit", *common])
            _run(
                f"test merge + {realign} (fsdp)",
                ["test", *common, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
            )
        for weighting in ("equal", "uncertainty", "gradnorm"):
            run = root / f"mtl_{weighting}"
            args_mtl = [
                "fit",
                "--config",
                str(configs / "mtl.yaml"),
                "--data.tasks=[segmentation, depth]",
                f"--model.weighting={weighting}",
                f"--trainer.default_root_dir={run}",
                "--trainer.strategy=fsdp",
                *SMALL,
                *gpu,
            ]
            if weighting == "gradnorm":
                _run("fit joint MTL gradnorm (fsdp: refused)", args_mtl, 2, "ddp_find_unused")
            else:
                _run(f"fit joint MTL {weighting} (fsdp)", args_mtl)
        run = root / "single_ddp"
        _run(
            "fit single-task segmentation (ddp)",
            [
                "fit",
                "--config",
                str(configs / "single_task.yaml"),
                "--data.tasks=[segmentation]",
                f"--trainer.default_root_dir={run}",
                "--trainer.strategy=ddp_find_unused_parameters_true",
                *SMALL,
                *gpu,
            ],
        )
    except Failed as err:
        print(f"[strategy] FAILED: {err}")
        raise SystemExit(1) from None
    finally:
        if not args.out:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print("[strategy] all stages passed")


if __name__ == "__main__":
    main()
