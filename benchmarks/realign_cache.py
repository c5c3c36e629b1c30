"""Head re-alignment with cached encoder features vs running the frozen encoder every epoch.

Head re-alignment trains only the task heads on top of a frozen merged encoder, so the encoder's
features of a training sample never change: ``MergeCallback(cache_features=True)`` computes them
once (first epoch) and serves them from memory afterwards. This benchmark measures what that
saves with the real pieces: the same ``SIMOModule`` + ``MergeCallback`` setup as
``configs/synthetic/merge.yaml`` (ViT with patch 8, width 128, 6 blocks, 64x80 synthetic scenes,
linear heads with 4x pixel shuffle), trained for a few epochs on ``--images`` un-augmented scenes,
once with the cache and once without, in one process.

θ0 is a randomly initialised encoder and each "fine-tuned" checkpoint is θ0 plus seeded noise:
the cost of an epoch does not depend on what the weights are. A one-batch fit runs first (not
timed) so one-time start-up costs fall on neither variant. Epochs are timed from
``on_train_epoch_start`` to ``on_train_epoch_end`` (validation is off); on a GPU the device is
synchronised at both ends. Process CPU time is printed next to wall time: on a shared machine it
is the steadier of the two.

Usage: ``python benchmarks/realign_cache.py [--images 500] [--epochs 5] [--batch-size 32]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.callbacks.realign import FeatureCache
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.models.encoders import Encoder
from lightning_simo.modules.simo import SIMOModule

__all__ = ["EpochTimer", "main", "make_checkpoints", "run_realignment"]

TASKS = ("segmentation", "depth", "normals")
HEAD = {"kind": "linear", "upsample": 4}


class EpochTimer(L.Callback):
    """Wall and process-CPU seconds of every training epoch (device work included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = self._cpu_start = 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)


def encoder_config(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic default encoder of ``configs/synthetic/merge.yaml``, resized by the flags."""
    return {
        "name": "vit_small_patch16_224",
        "model_kwargs": {
            "patch_size": args.patch,
            "embed_dim": args.embed_dim,
            "depth": args.depth,
            "num_heads": args.num_heads,
            "img_size": [args.height, args.width],
        },
        "indices": [1, 2, 4, 5] if args.depth == 6 else [-4, -3, -2, -1],
    }


def make_checkpoints(
    folder: Path, encoder: dict[str, Any], num_classes: dict[str, int], seed: int = 0
) -> tuple[str, dict[str, str]]:
    """θ0 as a foundation-like checkpoint and one single-task checkpoint per task."""
    torch.manual_seed(seed)
    theta0 = Encoder(encoder).state_dict()
    foundation = folder / "foundation.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in theta0.items()}}, foundation)
    paths = {}
    for task in TASKS:
        single = SIMOModule(
            tasks=[task],
            num_classes=num_classes,
            encoder={**encoder, "checkpoint": str(foundation)},
            head=HEAD,
        )
        with torch.no_grad():
            for p in single.net.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths[task] = str(folder / f"{task}.ckpt")
        torch.save({"state_dict": single.state_dict()}, paths[task])
    return str(foundation), paths


def run_realignment(
    dm: SyntheticDataModule,
    encoder: dict[str, Any],
    checkpoints: dict[str, str],
    cache: bool,
    epochs: int,
    accelerator: str,
    limit_train_batches: int | None = None,
) -> tuple[EpochTimer, SIMOModule]:
    """Head re-alignment for ``epochs`` epochs; the timer holds the seconds of each epoch."""
    L.seed_everything(0, verbose=False)
    module = SIMOModule(
        tasks=list(TASKS),
        num_classes=dm.num_classes,
        encoder=encoder,
        head=HEAD,
        head_lr=1e-3,
        schedule="constant",
    )
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        limit_train_batches=limit_train_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            MergeCallback(
                checkpoints=checkpoints, scaling=0.5, realign="heads", cache_features=cache
            ),
            timer,
        ],
    )
    trainer.fit(module, datamodule=dm)
    return timer, module


def _later(seconds: list[float]) -> float:
    """Median of the epochs after the first (the first one fills the cache)."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="training scenes (val split)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the cache pays off from the second epoch on")

    dm = SyntheticDataModule(
        tasks=list(TASKS),
        num_train=1,
        num_val=args.images,
        num_test=1,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        augment=False,
        train_split="val",
    )
    start = time.perf_counter()
    dm.scenes("val")  # rendered once, outside the timings, shared by both runs
    render = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        foundation, checkpoints = make_checkpoints(Path(tmp), encoder_config(args), dm.num_classes)
        encoder = {**encoder_config(args), "checkpoint": foundation}
        run_realignment(
            dm, encoder, checkpoints, False, 1, args.accelerator, limit_train_batches=1
        )  # warm-up, not timed
        direct_timer, _ = run_realignment(
            dm, encoder, checkpoints, False, args.epochs, args.accelerator
        )
        cached_timer, module = run_realignment(
            dm, encoder, checkpoints, True, args.epochs, args.accelerator
        )
    direct, cached = direct_timer.seconds, cached_timer.seconds
    direct_cpu, cached_cpu = direct_timer.cpu_seconds, cached_timer.cpu_seconds

    cache = module.feature_source
    assert isinstance(cache, FeatureCache) and len(cache) == args.images
    device = str(module.device)
    if module.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(module.device)})"
    else:
        device += f" ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in module.net.encoder.parameters())
    print(
        f"head re-alignment, {args.images} scenes {args.height}x{args.width}, batch "
        f"{args.batch_size}, {args.epochs} epochs; encoder ViT patch {args.patch}, width "
        f"{args.embed_dim}, {args.depth} blocks ({params / 1e6:.2f}M params); {device}; "
        f"scenes rendered in {render:.1f} s (not timed)"
    )
    print(f"{'':5s} {'---------- wall ----------':>34s} {'---------- CPU ----------':>34s}")
    print(
        f"{'epoch':>5s} {'encoder (s)':>12s} {'cached (s)':>11s} {'speed-up':>9s} "
        f"{'encoder (s)':>12s} {'cached (s)':>11s} {'speed-up':>9s}"
    )
    rows = zip(direct, cached, direct_cpu, cached_cpu, strict=True)
    for i, (d, c, dc, cc) in enumerate(rows, start=1):
        print(f"{i:5d} {d:12.3f} {c:11.3f} {d / c:8.2f}x {dc:12.3f} {cc:11.3f} {dc / cc:8.2f}x")
    total_d, total_c = sum(direct), sum(cached)
    cpu_d, cpu_c = sum(direct_cpu), sum(cached_cpu)
    print(
        f"{'all':>5s} {total_d:12.3f} {total_c:11.3f} {total_d / total_c:8.2f}x "
        f"{cpu_d:12.3f} {cpu_c:11.3f} {cpu_d / cpu_c:8.2f}x"
    )
    later_d, later_c = _later(direct), _later(cached)
    print(
        f"seconds per epoch after the first (median): {later_d:.3f} with the encoder, "
        f"{later_c:.3f} cached -> {later_d / later_c:.2f}x faster; first epoch (fills the "
        f"cache): {direct[0]:.3f} vs {cached[0]:.3f} s; whole run {total_d / total_c:.2f}x"
    )
    later_dc, later_cc = _later(direct_cpu), _later(cached_cpu)
    print(
        f"CPU seconds per epoch after the first (median): {later_dc:.3f} vs {later_cc:.3f} "
        f"-> {later_dc / later_cc:.2f}x"
    )


if __name__ == "__main__":
    main()
