"""Low-rank block adapters for representation re-alignment of a frozen (merged) encoder.

An adapter rewrites each block's output in place through a forward hook, so the encoder's own
parameter names (``backbone.*``) never change: merging, task vectors and checkpoints of the
unadapted encoder keep working, and adapter weights live apart under ``adapters.*``
(:func:`add_adapters`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from lightning_simo.models.encoders import Encoder

__all__ = ["ADAPTER_FORMS", "BlockAdapter", "add_adapters"]

ADAPTER_FORMS = ("lora", "residual")


class BlockAdapter(nn.Module):
    """A rank-``r`` correction of a block output ``y``.

    ``lora`` (SIMO paper): ``y + B A y`` with ``B`` zero-initialised.
    ``residual`` (the SIMO authors' code, after Representation Surgery): ``y - up(ReLU(down(y)))``
    with ``up`` zero-initialised. Both start as the identity, so re-alignment starts exactly at the
    merged model, and neither has biases, as in the authors' code: ``2 · rank · dim`` parameters
    per adapter (4,096 at width 128 and rank 16). ``down`` keeps PyTorch's default Linear
    initialisation (Kaiming-uniform), which is also the authors'.
    """

    def __init__(self, dim: int, rank: int = 16, form: str = "lora") -> None:
        super().__init__()
        if form not in ADAPTER_FORMS:
            raise ValueError(f"Adapter form must be one of {ADAPTER_FORMS}, got {form!r}.")
        if rank < 1:
            raise ValueError(f"Adapter rank must be >= 1, got {rank}.")
        self.form = form
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, y: Tensor) -> Tensor:
        channels_first = y.dim() == 4  # CNN stage output B x C x H x W
        z = y.movedim(1, -1) if channels_first else y
        if self.form == "lora":
            z = z + self.up(self.down(z))
        else:
            z = z - self.up(nn.functional.relu(self.down(z)))
        return z.movedim(-1, 1) if channels_first else z


def add_adapters(encoder: Encoder, rank: int, form: str) -> list[RemovableHandle]:
    """Attach one adapter to the output of every encoder block (``encoder.adapters``)."""
    if hasattr(encoder, "adapters"):
        raise ValueError("The encoder already carries adapters.")
    blocks = encoder.block_modules()
    dims = [_block_width(encoder, i) for i in range(len(blocks))]
    encoder.adapters = nn.ModuleList(BlockAdapter(d, rank, form) for d in dims)
    handles = []
    for block, adapter in zip(blocks, encoder.adapters, strict=True):
        handles.append(block.register_forward_hook(_adapter_hook(adapter)))
    return handles


def _adapter_hook(adapter: BlockAdapter):  # noqa: ANN202 - a forward hook
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return adapter(output)

    return hook


def _block_width(encoder: Encoder, index: int) -> int:
    backbone = encoder.backbone
    if hasattr(backbone, "blocks"):
        return int(backbone.embed_dim)
    return int(backbone.feature_info[index]["num_chs"])
