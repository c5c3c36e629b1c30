"""Low-rank block adapters for representation re-alignment of a frozen (merged) encoder.

An adapter rewrites each block's output in place through a forward hook, so the encoder's own
parameter names (``backbone.*``) never change: merging, task vectors and checkpoints of the
unadapted encoder keep working, and adapter weights live apart under ``adapters.*``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ADAPTER_FORMS", "BlockAdapter"]

ADAPTER_FORMS = ("lora", "residual")


class BlockAdapter(nn.Module):
    """A rank-``r`` correction of a block output ``y``.

    ``lora`` (SIMO paper): ``y + B A y`` with ``B`` zero-initialised.
    ``residual`` (the SIMO authors' code, after Representation Surgery): ``y - up(ReLU(down(y)))``
    with ``up`` zero-initialised. Both start as the identity, so re-alignment starts exactly at the
    merged model.
    """

    def __init__(self, dim: int, rank: int = 16, form: str = "lora") -> None:
        super().__init__()
        if form not in ADAPTER_FORMS:
            raise ValueError(f"Adapter form must be one of {ADAPTER_FORMS}, got {form!r}.")
        if rank < 1:
            raise ValueError(f"Adapter rank must be >= 1, got {rank}.")
        self.form = form
        self.down = nn.Linear(dim, rank, bias=form == "residual")
        self.up = nn.Linear(rank, dim, bias=form == "residual")
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        channels_first = y.dim() == 4  # CNN stage output B x C x H x W
        z = y.movedim(1, -1) if channels_first else y
        if self.form == "lora":
            z = z + self.up(self.down(z))
        else:
            z = z - self.up(nn.functional.relu(self.down(z)))
        return z.movedim(-1, 1) if channels_first else z
