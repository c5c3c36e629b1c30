"""Task jacobians for gradient aggregation: rows in chunks, stored in float32, never in ``.grad``.

Rows are computed with ``torch.autograd.grad``, which leaves ``.grad`` (and DDP's gradient
hooks) alone; the applied direction then reaches the parameters through one ordinary backward
of a linear surrogate (:func:`surrogate`), so Lightning's ``manual_backward`` (loss scaling,
DDP's reducer) sees exactly one backward per step, as it expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["flat_grads", "split_like", "surrogate", "task_jacobian"]


def flat_grads(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate gradients as one float32 vector (``None``, an unused input, counts as 0)."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, like)
        ]
    )


def task_jacobian(losses: Tensor, inputs: Sequence[Tensor], chunk: int = 1) -> Tensor:
    """The (T, P) float32 jacobian of the (T,) ``losses`` with respect to ``inputs``.

    ``chunk`` rows are computed per backward call: 1 is a plain loop (least memory); more uses
    ``is_grads_batched`` (vmap over the backward), faster where every op has a batching rule;
    where one does not, the rows fall back to the loop instead of failing. The graph is
    retained for the caller's final backward.
    """
    count = losses.numel()
    size = sum(p.numel() for p in inputs)
    out = torch.empty(count, size, dtype=torch.float32, device=losses.device)
    eye = torch.eye(count, dtype=losses.dtype, device=losses.device)
    batched = chunk > 1
    for start in range(0, count, chunk):
        rows = eye[start : start + chunk]
        if batched and rows.shape[0] > 1:
            try:
                grads = torch.autograd.grad(
                    losses,
                    inputs,
                    rows,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except (RuntimeError, NotImplementedError):
                # an op without a batching rule (TorchJD issue #154's "Cannot access storage
                # of BatchedTensorImpl"): rows one at a time from here on
                batched = False
            else:
                for i in range(rows.shape[0]):
                    out[start + i] = flat_grads(
                        [None if g is None else g[i] for g in grads], inputs
                    )
                continue
        for i in range(rows.shape[0]):
            grads = torch.autograd.grad(
                losses, inputs, rows[i], retain_graph=True, allow_unused=True
            )
            out[start + i] = flat_grads(grads, inputs)
    return out


def split_like(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Cut a flat vector into tensors shaped (and typed) like ``like``."""
    pieces, start = [], 0
    for t in like:
        pieces.append(vector[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return pieces


def surrogate(pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> Tensor:
    """``sum <x, g>`` over (tensors, gradients) pairs: its backward gives each ``x`` the gradient
    ``g`` (through ``x``'s graph when ``x`` is an activation)."""
    total = None
    for tensors, grads in pairs:
        for x, g in zip(tensors, grads):
            term = (x * g.detach().to(x.dtype)).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("nothing to back-propagate: no trainable tensor received a gradient")
    return total
