"""Statistics that data-based merge methods need, gathered with plain torch (no Lightning).

Each function runs one task's own fine-tuned model (its encoder, and for the Fisher its head and
loss) on training images and returns one ``{encoder key: tensor}`` mapping; :data:`STATISTICS`
maps the option name a method declares (``grams``, ``fishers``) to the function that fills it, so
the MergeCallback gathers what a method asks for without knowing the method.

- Gram matrices (RegMean): the inputs ``x`` of every ``nn.Linear`` of the encoder, flattened over
  batch and tokens, ``G = Σ x^T x / rows`` (FusionBench's running mean over rows), keyed by the
  layer's weight key. Labels are never read.
- Diagonal Fisher: the squared gradient of the task's own loss per batch, summed over batches and
  divided by the number of samples (FusionBench's regression form), keyed by parameter name.

Both stop before the first batch once ``samples`` images were seen (whole batches, as FusionBench).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_simo.merging.data_based import FISHER_STATISTIC, REGMEAN_STATISTIC

__all__ = [
    "STATISTICS",
    "diagonal_fisher",
    "gather_statistics",
    "input_grams",
    "statistics_of",
]

Batches = Iterable[Mapping[str, Tensor]]


@torch.no_grad()
def input_grams(
    encoder: nn.Module, batches: Batches, samples: int, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Gram matrices of the inputs of every linear layer of ``encoder`` (in eval mode)."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_hook(hook(f"{name}.weight"))
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear)
    ]
    was_training = encoder.training
    encoder.eval()
    try:
        seen = 0
        for batch in batches:
            if seen >= samples:
                break
            images = batch["image"].to(device)
            encoder(images)
            seen += int(images.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    return {name: (total / rows[name]).cpu() for name, total in sums.items()}


def diagonal_fisher(
    encoder: nn.Module,
    loss: Callable[[Mapping[str, Tensor]], Tensor],
    batches: Batches,
    samples: int,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Diagonal Fisher of ``encoder``'s floating parameters under ``loss(batch)`` (eval mode)."""
    params = {n: p for n, p in encoder.named_parameters() if p.is_floating_point()}
    flags = {n: p.requires_grad for n, p in params.items()}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = encoder.training
    encoder.eval()
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            if seen >= samples:
                break
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            for p in params.values():
                p.grad = None
            with torch.enable_grad():
                loss(batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    total[n] += p.grad.detach().float() ** 2
            seen += int(batch["image"].shape[0])
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
        encoder.train(was_training)
    return {n: (value / max(seen, 1)).cpu() for n, value in total.items()}


def _gather_grams(
    net: nn.Module, tasks: Mapping[str, Any], task: str, batches: Batches, samples: int, device: Any
) -> dict[str, Tensor]:
    return input_grams(net.encoder, batches, samples, device)


def _gather_fisher(
    net: nn.Module, tasks: Mapping[str, Any], task: str, batches: Batches, samples: int, device: Any
) -> dict[str, Tensor]:
    spec = tasks[task]
    head_flags = [p.requires_grad for p in net.heads[task].parameters()]

    def loss(batch: Mapping[str, Tensor]) -> Tensor:
        pred = net.forward_heads(net.encoder(batch["image"]), [task])[task]
        return spec.loss(pred, batch[task])

    try:
        net.heads[task].eval()
        return diagonal_fisher(net.encoder, loss, batches, samples, device)
    finally:
        for p, flag in zip(net.heads[task].parameters(), head_flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)


Gather = Callable[[nn.Module, Mapping[str, Any], str, Batches, int, Any], dict[str, Tensor]]
STATISTICS: dict[str, Gather] = {REGMEAN_STATISTIC: _gather_grams, FISHER_STATISTIC: _gather_fisher}
"""Option name -> ``gather(net, tasks, task, batches, samples, device)``; ``net`` holds the task's
fine-tuned encoder and head when called."""


def statistics_of(method: str) -> list[str]:
    """The statistics a merge method needs from data (empty for a data-free method)."""
    from lightning_simo.merging.methods import MERGE_METHODS

    return [name for name in STATISTICS if name in MERGE_METHODS.get(method).options]


def gather_statistics(
    wanted: Sequence[str],
    net: nn.Module,
    tasks: Mapping[str, Any],
    encoders: Sequence[Mapping[str, Tensor]],
    batches: Callable[[], Batches],
    samples: int,
    device: Any,
) -> dict[str, list[dict[str, Tensor]]]:
    """Every statistic in ``wanted``, one mapping per task, each through that task's own encoder
    (loaded into ``net.encoder`` in turn; the caller loads the merged weights afterwards)."""
    out: dict[str, list[dict[str, Tensor]]] = {name: [] for name in wanted}
    for task, weights in zip(tasks, encoders, strict=True):
        net.encoder.load_state_dict(weights, strict=False)
        for name in wanted:
            out[name].append(STATISTICS[name](net, tasks, task, batches(), samples, device))
    return out
