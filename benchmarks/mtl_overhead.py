"""Per-step time and peak memory of every joint-MTL weighting, relative to ``equal``.

Each measurement trains ``JointMTLModule`` under ``Trainer.fit`` on one fixed three-task batch
(segmentation, depth, normals) for ``--warmup`` untimed and ``--steps`` timed steps:

* time: mean wall time of a timed step (device synchronised);
* peak memory: on CUDA ``max_memory_allocated`` during the steps; on CPU the peak resident set
  during the steps (Linux ``VmHWM``, reset before each measurement through
  ``/proc/self/clear_refs``) minus the resident set before the first step.

Measurements share one process (``--isolate``: one fresh process each, cleaner CPU memory
numbers, slower); freed memory is handed back to the system (``malloc_trim``) between them.

Gradient aggregators are measured with ``jacobian_of: parameters`` (the (T, P) jacobian of the
encoder) and ``features`` (the jacobian of the features the heads read); loss weightings have
one row. The table is Markdown, ready for docs/mtl.md.

Usage::

    python benchmarks/mtl_overhead.py                       # the synthetic configs' encoder
    python benchmarks/mtl_overhead.py --size paper --device cuda
    python benchmarks/mtl_overhead.py --methods equal upgrad pcgrad
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SIZES, Setup, _quiet, _RepeatedBatch, make_batch  # noqa: E402

from lightning_simo.modules.joint import JointMTLModule  # noqa: E402
from lightning_simo.weighting import WEIGHTINGS  # noqa: E402

__all__ = ["BENCH_SIZES", "measure"]

TASKS = ("segmentation", "depth", "normals")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "mtl.yaml"


def _synthetic_setup() -> Setup:
    """The encoder and head of configs/synthetic/mtl.yaml (randomly initialised), batch 8."""
    model = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    encoder = {k: v for k, v in model["encoder"].items() if k != "checkpoint"}
    height, width = encoder["model_kwargs"]["img_size"]
    return Setup(encoder, model["head"], height, width, batch_size=8, steps=5, warmup=2)


#: The synthetic configs' model beside train_throughput's sizes.
BENCH_SIZES: dict[str, Setup] = {**SIZES, "synthetic": _synthetic_setup()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    """Give freed heap back to the system and restart the peak-RSS counter (Linux >= 4.0)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


class _Meter(L.Callback):
    """Wall time and peak memory over the timed steps."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = 0.0
        self.elapsed = 0.0
        self.steps = 0
        self.baseline_kib = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _reset_peak_rss()
        self.baseline_kib = _status_kib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self._sync()
            self.elapsed += time.perf_counter() - self.start
            self.steps += 1


def measure(
    setup: Setup, method: str, jacobian_of: str, device: str, precision: str
) -> dict[str, float]:
    """One measurement in this process: seconds per step and peak bytes."""
    dev = torch.device(device)
    torch.manual_seed(0)
    module = JointMTLModule(
        tasks=list(TASKS),
        num_classes={"segmentation": 13},
        encoder=setup.encoder,
        head=setup.head,
        schedule="constant",
        weighting=method,
        jacobian_of=jacobian_of,
        grad_clip=None,
    )
    batch = make_batch(setup, setup.batch_size, dev)
    total = setup.warmup + setup.steps
    meter = _Meter(setup.warmup, dev)
    trainer = L.Trainer(
        accelerator="cpu" if dev.type == "cpu" else "gpu",
        devices=1 if dev.type == "cpu" else [dev.index or 0],
        precision=precision,
        max_steps=total,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    trainer.fit(module, train_dataloaders=_RepeatedBatch(batch, total))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = max(0, _status_kib("VmHWM") - meter.baseline_kib) * 1024
    return {"seconds": meter.elapsed / max(1, meter.steps), "peak_bytes": peak}


def _run_child(args: argparse.Namespace, method: str, mode: str) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        mode,
        "--size",
        args.size,
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  {method} ({mode}) failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(lines[-1])


def _row(method: str, mode: str, got: dict[str, float], base: dict[str, float]) -> str:
    ms, mib = 1e3 * got["seconds"], got["peak_bytes"] / 2**20
    time_ratio = got["seconds"] / base["seconds"]
    mem_ratio = got["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
    return f"| {method} | {mode} | {ms:.0f} | {time_ratio:.2f}x | {mib:.0f} | {mem_ratio:.2f}x |"


def _methods(requested: list[str] | None) -> list[str]:
    names = requested or WEIGHTINGS.names()
    return ["equal", *[n for n in names if n != "equal"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(BENCH_SIZES), default="synthetic")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="Trainer precision")
    parser.add_argument("--methods", nargs="+", help="weightings to measure (default: all)")
    parser.add_argument("--steps", type=int, help="timed steps (default: per size)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: per size)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: per size)")
    parser.add_argument("--isolate", action="store_true", help="one process per measurement")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet()
    setup = BENCH_SIZES[args.size]
    args.steps = args.steps or setup.steps
    args.warmup = args.warmup or setup.warmup
    args.batch_size = args.batch_size or setup.batch_size
    setup = dataclasses.replace(
        setup, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size
    )
    if args.child:
        method, mode = args.child
        print(json.dumps(measure(setup, method, mode, args.device, args.precision)))
        return 0

    print(
        f"# {args.size} encoder, batch {setup.batch_size} at {setup.height}x{setup.width}, "
        f"{args.device}, {args.precision}, {setup.steps} timed steps after {setup.warmup}",
        flush=True,
    )
    print("\n| method | jacobian_of | ms / step | time vs equal | peak MiB | memory vs equal |")
    print("|---|---|---|---|---|---|", flush=True)
    base: dict[str, float] | None = None
    for method in _methods(args.methods):
        cls = WEIGHTINGS.get(method)
        modes = ["parameters", "features"] if cls.requires_jacobian else ["-"]
        if not getattr(cls, "supports_features", True):
            modes = ["parameters"]
        for mode in modes:
            jacobian_of = "parameters" if mode == "-" else mode
            if args.isolate:
                got = _run_child(args, method, jacobian_of)
            else:
                try:
                    got = measure(setup, method, jacobian_of, args.device, args.precision)
                except (ValueError, RuntimeError) as err:  # e.g. nash_mtl without cvxpy
                    print(f"| {method} | {mode} | skipped: {err} | | | |", flush=True)
                    got = None
            if got is None:
                continue
            base = base or got  # equal comes first
            print(_row(method, mode, got, base), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
