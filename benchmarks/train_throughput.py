"""Training throughput of the Lightning suite vs a plain PyTorch loop doing the same work.

The step is the NYUv2 one of the SIMO paper: DINOv2 ViT-B/14 (timm ``vit_base_patch14_dinov2``,
random weights, blocks 2/5/8/11 with class tokens), three linear heads (segmentation with 13
classes, depth, normals), 280 x 378 crops, AdamW with separate encoder and head learning rates.
Both sides train the same ``SIMONet`` with the same losses from the task registry on the same
batch, kept on the device, so that the difference is what the suite adds around the step:

* suite: ``SIMOModule`` and ``Trainer.fit`` (no progress bar, logger, checkpointing or
  validation), so its per-step logging, hooks and precision plugin are included;
* plain: ``autocast`` (bf16) around forward and loss, ``zero_grad``, ``backward``, ``step``.

Images per second are timed over ``--steps`` steps after ``--warmup`` untimed ones (device
synchronised at both ends), in fp32 and in bf16 autocast, optionally with ``torch.compile`` of the
encoder and of each head on both sides. Each measurement is repeated ``--repeat`` times,
alternating the two sides, and the median is printed with the ratio suite / plain (target: at
least 0.95). The first-step losses of both sides are printed as a check that they do the same
work (equal up to rounding without ``--compile``).

Usage::

    python benchmarks/train_throughput.py --device cuda                  # the paper step
    python benchmarks/train_throughput.py --device cuda --compile
    python benchmarks/train_throughput.py --size tiny --device cpu       # seconds, any machine
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_simo.models.encoders import EncoderConfig
from lightning_simo.models.heads import HeadConfig
from lightning_simo.models.simo import SIMONet
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.tasks import IGNORE_INDEX, build_tasks
from lightning_simo.testing import quiet_trainer, tiny_vit

__all__ = ["SIZES", "Setup", "make_batch", "plain_throughput", "suite_throughput"]

TASKS = ("segmentation", "depth", "normals")
NUM_CLASSES = {"segmentation": 13}
LR, HEAD_LR, WEIGHT_DECAY = 1e-4, 1e-3, 1e-4
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class Setup:
    """Model and input of one benchmark size."""

    encoder: dict[str, Any]
    head: dict[str, Any]
    height: int
    width: int
    batch_size: int
    steps: int
    warmup: int


SIZES: dict[str, Setup] = {
    "paper": Setup(
        encoder={"name": "vit_base_patch14_dinov2", "indices": [2, 5, 8, 11]},
        head={"kind": "linear", "upsample": 1},
        height=280,
        width=378,
        batch_size=16,
        steps=50,
        warmup=10,
    ),
    "tiny": Setup(
        encoder=tiny_vit(),
        head={"kind": "linear", "upsample": 4},
        height=32,
        width=40,
        batch_size=8,
        steps=20,
        warmup=3,
    ),
}


def make_batch(setup: Setup, batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """One fixed batch with NYUv2-like targets (some ignored / invalid pixels), on ``device``."""
    g = torch.Generator().manual_seed(0)
    b, h, w = batch_size, setup.height, setup.width
    labels = torch.randint(0, NUM_CLASSES["segmentation"], (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < 0.05] = IGNORE_INDEX
    depth = 0.5 + 9.5 * torch.rand(b, 1, h, w, generator=g)
    depth[torch.rand(b, 1, h, w, generator=g) < 0.05] = 0.0
    normals = nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    batch = {
        "image": torch.rand(b, 3, h, w, generator=g),
        "segmentation": labels,
        "depth": depth,
        "normals": normals,
        "index": torch.arange(b),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _compile(net: SIMONet) -> None:
    """Compile the encoder and each head in place (the same graphs on both sides)."""
    net.encoder = torch.compile(net.encoder)  # type: ignore[assignment]
    for name in list(net.heads):
        net.heads[name] = torch.compile(net.heads[name])  # type: ignore[assignment]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- plain PyTorch
def plain_throughput(
    setup: Setup,
    batch: Mapping[str, Tensor],
    precision: str,
    steps: int,
    warmup: int,
    compile_model: bool,
) -> tuple[float, float]:
    """Images/s of a hand-written loop, and its first-step loss."""
    device = batch["image"].device
    torch.manual_seed(0)
    specs = build_tasks(list(TASKS), NUM_CLASSES)
    net = SIMONet(specs, EncoderConfig.coerce(setup.encoder), HeadConfig.coerce(setup.head))
    net.to(device).train()
    head_ids = {id(p) for p in net.heads.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in net.parameters() if id(p) not in head_ids], "lr": LR},
            {"params": list(net.heads.parameters()), "lr": HEAD_LR},
        ],
        weight_decay=WEIGHT_DECAY,
    )
    if compile_model:
        _compile(net)
    bf16 = precision == "bf16"
    first_loss = float("nan")
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            preds = net(batch["image"])
            losses = [specs[t].loss(preds[t], batch[t]) for t in specs]
            loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            first_loss = float(loss.detach())
    _sync(device)
    return steps * batch["image"].shape[0] / (time.perf_counter() - start), first_loss


# ----------------------------------------------------------------------------- Lightning suite
class _RepeatedBatch:
    """The same on-device batch ``length`` times (no loader cost on either side)."""

    def __init__(self, batch: Mapping[str, Tensor], length: int) -> None:
        self.batch = dict(batch)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for _ in range(self.length):
            yield self.batch


class _Timer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, last: int, device: torch.device) -> None:
        self.warmup, self.last, self.device = warmup, last, device
        self.start = self.elapsed = 0.0
        self.first_loss = float("nan")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx == 0:
            self.first_loss = float(outputs["loss"])
        if batch_idx == self.last:
            _sync(self.device)
            self.elapsed = time.perf_counter() - self.start


def suite_throughput(
    setup: Setup,
    batch: Mapping[str, Tensor],
    precision: str,
    steps: int,
    warmup: int,
    compile_model: bool,
) -> tuple[float, float]:
    """Images/s of ``SIMOModule`` under ``Trainer.fit``, and its first-step loss."""
    device = batch["image"].device
    torch.manual_seed(0)
    module = SIMOModule(
        tasks=list(TASKS),
        num_classes=NUM_CLASSES,
        encoder=setup.encoder,
        head=setup.head,
        lr=LR,
        head_lr=HEAD_LR,
        weight_decay=WEIGHT_DECAY,
        schedule="constant",
    )
    if compile_model:
        _compile(module.net)
    total = warmup + steps
    timer = _Timer(warmup, total - 1, device)
    accelerator = "cpu" if device.type == "cpu" else "gpu"
    devices: Any = 1 if device.type == "cpu" else [device.index or 0]
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=devices,
        precision=PRECISIONS[precision],
        max_steps=total,
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=_RepeatedBatch(batch, total))
    return steps * batch["image"].shape[0] / timer.elapsed, timer.first_loss


# ----------------------------------------------------------------------------- driver
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="timed steps (default: per size)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: per size)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: per size)")
    parser.add_argument(
        "--precision", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"]
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and heads")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per side (median)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step includes one-off setup)")
    return args


def _quiet() -> None:
    """Keep the Trainer's start-up banners and hints out of the results table."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _quiet()
    setup = SIZES[args.size]
    device = torch.device(args.device)
    steps = args.steps or setup.steps
    warmup = args.warmup or setup.warmup
    batch_size = args.batch_size or setup.batch_size
    batch = make_batch(setup, batch_size, device)
    print(
        f"size={args.size} ({setup.encoder['name']}, {setup.height}x{setup.width}), "
        f"batch={batch_size}, device={device}, steps={steps} (+{warmup} warm-up), "
        f"compile={args.compile}, repeat={args.repeat}, torch {torch.__version__}, "
        f"lightning {L.__version__}, threads={torch.get_num_threads()}"
    )
    print(
        f"{'precision':<10}{'plain img/s':>13}{'suite img/s':>13}{'suite/plain':>13}"
        f"{'first loss plain / suite':>30}"
    )
    worst = float("inf")
    for precision in args.precision:
        plain, suite = [], []
        for _ in range(args.repeat):
            rate, plain_loss = plain_throughput(
                setup, batch, precision, steps, warmup, args.compile
            )
            plain.append(rate)
            rate, suite_loss = suite_throughput(
                setup, batch, precision, steps, warmup, args.compile
            )
            suite.append(rate)
        ratio = statistics.median(suite) / statistics.median(plain)
        worst = min(worst, ratio)
        print(
            f"{precision:<10}{statistics.median(plain):>13.4g}{statistics.median(suite):>13.4g}"
            f"{ratio:>13.3f}{plain_loss:>18.6f} / {suite_loss:.6f}"
        )
    verdict = "yes" if worst >= 0.95 else "no"
    print(f"suite within 5% of the plain loop: {verdict} (worst ratio {worst:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
