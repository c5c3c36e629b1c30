"""The dense task registry: the one place that says what a task is.

Datamodules say *which* tasks a dataset carries; models, losses, metrics, merging and evaluation
read everything else from here, so adding a task is one registration and nothing more.

Conventions for targets (shared by every dataset):

- segmentation-like tasks: ``int64`` ``H x W`` class indices, ``-1`` = ignore;
- depth-like tasks (depth, disparity): ``float32`` ``1 x H x W``, ``0`` = invalid;
- normals: ``float32`` ``3 x H x W`` unit vectors in the camera frame, all-zero = invalid;
- edges: ``float32`` ``1 x H x W`` in {0, 1} (binary boundary map), no invalid pixels;
- other regression tasks (autoencoder, keypoints, edge texture): ``float32`` ``C x H x W``;
  every pixel is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_simo import metrics as M

__all__ = [
    "IGNORE_INDEX",
    "NORMAL_LOSSES",
    "Task",
    "available_tasks",
    "build_task",
    "build_tasks",
    "register_task",
]

IGNORE_INDEX = -1
NORMAL_LOSSES = ("cosine", "l1")


def _segmentation_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred.float(), target.long(), ignore_index=IGNORE_INDEX)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid entries that is 0 (with a gradient) when nothing is valid, never NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _depth_valid(target: Tensor) -> Tensor:
    return target != 0


def _normals_valid(target: Tensor) -> Tensor:
    return target.abs().sum(dim=1, keepdim=True) > 0


def _depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    return _masked_mean((pred.float() - target.float()).abs(), _depth_valid(target))


def _regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.float()).abs().mean()


def _normals_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    pred = F.normalize(pred.float(), dim=1)
    cos = (pred * target.float()).sum(dim=1, keepdim=True)
    return _masked_mean(1.0 - cos, _normals_valid(target))


def _normals_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    pred = F.normalize(pred.float(), dim=1)
    per_pixel = (pred - target.float()).abs().sum(dim=1, keepdim=True)
    return _masked_mean(per_pixel, _normals_valid(target))


def _edges_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred.float(), target.float())


# ----------------------------------------------------------------------------- visualisers
def _palette(num_classes: int) -> Tensor:
    """A fixed, well-separated colour per class (deterministic across runs and ranks)."""
    g = torch.Generator().manual_seed(1234)
    base = torch.tensor(
        [
            [0.90, 0.10, 0.15],
            [0.24, 0.71, 0.29],
            [1.00, 0.88, 0.10],
            [0.00, 0.51, 0.78],
            [0.96, 0.51, 0.19],
            [0.57, 0.12, 0.71],
            [0.27, 0.94, 0.94],
            [0.94, 0.20, 0.90],
            [0.82, 0.96, 0.24],
            [0.98, 0.75, 0.83],
            [0.00, 0.50, 0.50],
            [0.86, 0.75, 1.00],
            [0.67, 0.43, 0.16],
        ]
    )
    if num_classes <= len(base):
        return base[:num_classes]
    extra = torch.rand(num_classes - len(base), 3, generator=g)
    return torch.cat([base, extra])


def _show_segmentation(x: Tensor, num_classes: int) -> Tensor:
    labels = x.argmax(0) if x.dim() == 3 else x
    labels = labels.long()
    pal = _palette(num_classes).to(x.device)
    out = pal[labels.clamp(0, num_classes - 1)].permute(2, 0, 1)
    return out * (labels != IGNORE_INDEX).unsqueeze(0)


def _show_scalar(x: Tensor) -> Tensor:
    x = x.float()[0] if x.dim() == 3 else x.float()
    valid = x != 0
    if valid.any():
        lo, hi = x[valid].min(), x[valid].max()
        x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * valid
    # a perceptually ordered ramp (dark blue -> yellow) without importing matplotlib
    stops = torch.tensor(
        [[0.05, 0.03, 0.35], [0.20, 0.55, 0.55], [0.99, 0.91, 0.14]], device=x.device
    )
    pos = x * 2
    lo_idx = pos.floor().clamp(0, 1).long()
    frac = (pos - lo_idx).unsqueeze(-1)
    rgb = stops[lo_idx] * (1 - frac) + stops[lo_idx + 1] * frac
    return rgb.permute(2, 0, 1) * valid.unsqueeze(0) if valid.any() else rgb.permute(2, 0, 1)


def _show_normals(x: Tensor) -> Tensor:
    x = F.normalize(x.float(), dim=0)
    return ((x + 1) / 2).clamp(0, 1)


def _show_edges(x: Tensor) -> Tensor:
    x = x.float()
    if x.min() < 0 or x.max() > 1:  # logits from a head
        x = torch.sigmoid(x)
    return x[:1].expand(3, -1, -1).clone()


def _show_signed(x: Tensor) -> Tensor:
    x = x.float()
    if x.shape[0] == 3:
        return ((x + 1) / 2).clamp(0, 1)
    return _show_scalar(x[:1] - x[:1].min() + 1e-3)


# ----------------------------------------------------------------------------- the Task type
@dataclass(frozen=True)
class Task:
    """Everything the rest of the suite needs to know about one dense task.

    ``metrics`` maps each reported metric name to whether higher is better; ``primary`` is the one
    metric used for normalised performance and Δ_MTL (the SIMO paper's choice per task).
    """

    name: str
    kind: str
    channels: int
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(repr=False)
    metrics_factory: Callable[[], M.DenseMetric] = field(repr=False)
    metrics: dict[str, bool]
    primary: str
    invalid: str
    visualize_fn: Callable[[Tensor], Tensor] = field(repr=False)
    num_classes: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Task loss in fp32 (mixed precision must not degrade regression losses)."""
        return self.loss_fn(pred, target)

    def make_metrics(self) -> M.DenseMetric:
        return self.metrics_factory()

    def visualize(self, x: Tensor) -> Tensor:
        """A ``3 x H x W`` float image in [0, 1] of one prediction or target (no batch dim)."""
        return self.visualize_fn(x.detach().float().cpu() if x.is_floating_point() else x.cpu())

    @property
    def higher_is_better(self) -> bool:
        return self.metrics[self.primary]

    @property
    def is_classification(self) -> bool:
        return self.kind in ("segmentation", "edges")


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task factory ``f(num_classes=None, normal_loss=...) -> Task`` under ``name``."""

    def wrap(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in _REGISTRY:
            raise ValueError(f"Task {name!r} is registered twice.")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)


def build_task(name: str, num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
    """Build a task by name, with the per-dataset facts it needs (class count)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown task {name!r}. Known tasks: {', '.join(available_tasks())}. "
            "Fix the task name in the config (e.g. --data.tasks '[depth]')."
        )
    if normal_loss not in NORMAL_LOSSES:
        raise ValueError(f"normal_loss must be one of {NORMAL_LOSSES}, got {normal_loss!r}.")
    return _REGISTRY[name](num_classes=num_classes, normal_loss=normal_loss)


def build_tasks(
    names: list[str] | tuple[str, ...],
    num_classes: dict[str, int] | None = None,
    normal_loss: str = "cosine",
) -> dict[str, Task]:
    """Build several tasks, refusing duplicates (a task given twice is always a config mistake)."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"Task {n!r} is listed twice; list each task once.")
        seen.add(n)
    num_classes = num_classes or {}
    return {n: build_task(n, num_classes.get(n), normal_loss) for n in names}


def _segmentation_factory(name: str, default_classes: int | None) -> Callable[..., Task]:
    def factory(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
        n = num_classes or default_classes
        if n is None or n < 2:
            raise ValueError(
                f"Task {name!r} needs num_classes >= 2 (got {n}); the datamodule provides it "
                "through `num_classes`."
            )
        return Task(
            name=name,
            kind="segmentation",
            channels=n,
            num_classes=n,
            loss_fn=_segmentation_loss,
            metrics_factory=lambda: M.SegmentationMetrics(n, ignore_index=IGNORE_INDEX),
            metrics={"miou": True, "pixel_acc": True},
            primary="miou",
            invalid="label -1",
            visualize_fn=lambda x: _show_segmentation(x, n),
        )

    return factory


def _depth_factory(name: str) -> Callable[..., Task]:
    def factory(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
        return Task(
            name=name,
            kind="depth",
            channels=1,
            loss_fn=_depth_loss,
            metrics_factory=M.DepthMetrics,
            metrics={"abs_err": False, "rel_err": False},
            primary="abs_err",
            invalid="value 0",
            visualize_fn=_show_scalar,
        )

    return factory


def _regression_factory(name: str, channels: int) -> Callable[..., Task]:
    def factory(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
        return Task(
            name=name,
            kind="regression",
            channels=channels,
            loss_fn=_regression_loss,
            metrics_factory=M.RegressionMetrics,
            metrics={"abs_err": False},
            primary="abs_err",
            invalid="none (every pixel is valid)",
            visualize_fn=_show_signed,
        )

    return factory


@register_task("normals")
def _normals(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
    return Task(
        name="normals",
        kind="normals",
        channels=3,
        loss_fn=_normals_cosine_loss if normal_loss == "cosine" else _normals_l1_loss,
        metrics_factory=M.NormalMetrics,
        metrics={
            "mean": False,
            "median": False,
            "within_11_25": True,
            "within_22_5": True,
            "within_30": True,
        },
        primary="mean",
        invalid="all-zero vector",
        visualize_fn=_show_normals,
        options={"normal_loss": normal_loss},
    )


@register_task("edges")
def _edges(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
    return Task(
        name="edges",
        kind="edges",
        channels=1,
        loss_fn=_edges_loss,
        metrics_factory=M.EdgeMetrics,
        metrics={"f1": True, "precision": True, "recall": True},
        primary="f1",
        invalid="none (every pixel is valid)",
        visualize_fn=_show_edges,
    )


register_task("segmentation")(_segmentation_factory("segmentation", None))
register_task("part_segmentation")(_segmentation_factory("part_segmentation", 10))
register_task("depth")(_depth_factory("depth"))
register_task("disparity")(_depth_factory("disparity"))
register_task("autoencoder")(_regression_factory("autoencoder", 3))
register_task("keypoints2d")(_regression_factory("keypoints2d", 1))
register_task("edge_texture")(_regression_factory("edge_texture", 1))
