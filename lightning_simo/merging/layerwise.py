"""Layer-wise merging: ``θ0 + Σ_k λ_{l,k} τ_{k,l}`` with one trainable coefficient per tensor and task.

Model Tinting and AdaMerging train these coefficients; the merge itself is the core's
:func:`~lightning_simo.merging.task_vectors.add_scaled` on task vectors from
:func:`~lightning_simo.merging.task_vectors.task_vectors`, so its casting rule is every method's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_simo.merging.task_vectors import add_scaled, task_vectors

__all__ = ["LayerwiseMerge"]


class LayerwiseMerge(nn.Module):
    """Trainable layer-wise task arithmetic ``θ0 + Σ_k λ_{l,k} τ_{k,l}``.

    ``coefficients`` (``K x L``, persistent) are the only parameters. θ0 and the task vectors are
    non-persistent buffers: they follow the module across devices but are rebuilt from the
    single-task checkpoints on every run, so checkpoints stay the size of one model. The task
    vectors of one tensor are stacked over tasks so each merged tensor is one ``tensordot``.

    Args:
        theta0: the pretrained encoder state (keys as ``Encoder.state_dict()``).
        finetuned: one fine-tuned encoder state per task (same keys).
        names: the parameter tensors to merge, in a fixed order (the columns of ``coefficients``).
        init: initial value of every coefficient.
        dtypes: dtype of each merged tensor (the encoder's parameter dtypes); float32 by default.
    """

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        finetuned: Sequence[Mapping[str, Tensor]],
        names: Sequence[str],
        init: float,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        super().__init__()
        if not finetuned:
            raise ValueError("LayerwiseMerge needs at least one fine-tuned state.")
        self.names = list(names)
        self.dtypes = dict(dtypes or {})
        self.coefficients = nn.Parameter(torch.full((len(finetuned), len(self.names)), init))
        for i, name in enumerate(self.names):
            base = theta0[name].detach()
            others = [{name: ft[name].detach().to(base.device)} for ft in finetuned]
            taus = [tv[name] for tv in task_vectors({name: base}, others)]
            self.register_buffer(f"theta0_{i}", base.to(taus[0].dtype).clone(), persistent=False)
            self.register_buffer(f"tau_{i}", torch.stack(taus), persistent=False)

    @property
    def num_tasks(self) -> int:
        return int(self.coefficients.shape[0])

    def clamped(self) -> Tensor:
        """The coefficients as used by the merge: clamped to [0, 1] (keeps gradients inside)."""
        return self.coefficients.clamp(0.0, 1.0)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the stored coefficients back to [0, 1] (after an optimiser step), so logged and
        saved values are the ones the merge uses."""
        self.coefficients.clamp_(0.0, 1.0)

    def _theta0(self, i: int) -> Tensor:
        return getattr(self, f"theta0_{i}")

    def _tau(self, i: int) -> Tensor:
        return getattr(self, f"tau_{i}")

    def _cast(self, name: str, value: Tensor) -> Tensor:
        return value.to(self.dtypes.get(name, value.dtype))

    def merged(self) -> dict[str, Tensor]:
        """The merged tensors (differentiable in the coefficients)."""
        lam = self.clamped()
        return {
            name: self._cast(
                name, add_scaled(self._theta0(i), torch.tensordot(lam[:, i], self._tau(i), 1))
            )
            for i, name in enumerate(self.names)
        }

    def task_weights(self, k: int) -> dict[str, Tensor]:
        """Task ``k``'s fine-tuned tensors ``θ0 + τ_k`` (the teacher's encoder)."""
        return {
            name: self._cast(name, add_scaled(self._theta0(i), self._tau(i)[k]))
            for i, name in enumerate(self.names)
        }
