"""The dual-cone projection of UPGrad and DualProj, solvable without quadprog.

TorchJD's default projector (``QuadprogProjector``) needs the optional ``qpsolvers`` and
``quadprog`` packages. The problem it solves, ``min_v v^T G v`` subject to ``v >= u`` (Jacobian
Descent, Proposition 1), is a non-negative least-squares problem once ``v = u + x`` and
``G = L L^T``: ``min_{x >= 0} ||L^T x + L^T u||^2``. scipy's active-set NNLS (Lawson-Hanson)
solves it exactly, so :class:`NNLSProjector` returns the same unique optimum as quadprog on the
same regularised Gramian; it plugs into TorchJD's ``UPGrad``/``DualProj`` through their
``projector`` argument. :func:`default_projector` prefers TorchJD's own when it is installed.
"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor
from torchjd.linalg import DualConeProjector, QuadprogProjector

__all__ = ["NNLSProjector", "default_projector"]


class NNLSProjector(DualConeProjector):
    """Dual-cone projection weights by NNLS on the Cholesky factor of the regularised Gramian.

    The Gramian is first divided by its trace (0 when the trace is below ``norm_eps``) and
    ``reg_eps`` is added to its diagonal, exactly as TorchJD's ``QuadprogProjector`` does, so
    that both projectors answer the same problem.
    """

    def __init__(self, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}")
        if reg_eps == 0:
            raise ValueError("reg_eps must be positive: the NNLS form needs a definite Gramian")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        trace = G.diagonal().sum()
        G = torch.zeros_like(G) if trace < self.norm_eps else G / trace
        G = G + self.reg_eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        gram = G.detach().cpu().double().numpy()
        factor = np.linalg.cholesky(gram).T  # gram = factor.T @ factor
        u = U.detach().cpu().double().numpy()
        flat = u.reshape(-1, u.shape[-1])
        out = np.stack([row + nnls(factor, -factor @ row)[0] for row in flat])
        return torch.as_tensor(out.reshape(u.shape), dtype=G.dtype, device=G.device)

    def __repr__(self) -> str:
        return f"NNLSProjector(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


def default_projector(norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> DualConeProjector:
    """TorchJD's quadprog projector when its packages are installed, else :class:`NNLSProjector`."""
    if find_spec("qpsolvers") is not None and find_spec("quadprog") is not None:
        return QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)
    return NNLSProjector(norm_eps=norm_eps, reg_eps=reg_eps)
