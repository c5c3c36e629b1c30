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

A :class:`Task` also carries what the rest of the suite used to re-derive from its kind: how a
teacher's output becomes a pseudo-target and the distillation loss to it (Model Tinting), whether
its output must be positive (heads), how geometric augmentation acts on its target
(:class:`TargetGeometry`, declared when the task is registered so transforms can read it by name)
and its loss family (loss weightings). No module outside this one compares task names or kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_simo import metrics as M
from lightning_simo.registry import Registry

__all__ = [
    "DEPTH",
    "IGNORE_INDEX",
    "INVERSE_DEPTH",
    "LABEL",
    "LOSS_FAMILIES",
    "NORMAL",
    "NORMAL_LOSSES",
    "SCALAR",
    "TargetGeometry",
    "Task",
    "argmax_target",
    "available_tasks",
    "build_task",
    "build_tasks",
    "keep_mask",
    "masked_mean",
    "register_task",
    "task_geometry",
    "unregister_task",
]

IGNORE_INDEX = -1
NORMAL_LOSSES = ("cosine", "l1")
LOSS_FAMILIES = ("classification", "regression")
"""How a loss weighting treats a task (uncertainty weighting scales the two differently)."""

Targets = tuple[Tensor, ...]
"""A teacher's output as a distillation target (only what the loss needs, so caches stay small)."""


@dataclass(frozen=True)
class TargetGeometry:
    """How geometric augmentation acts on a task's target map.

    Args:
        label: integer class ids (``-1`` = ignore): resampled by nearest neighbour and padded
            as ignore; otherwise a float map (``H x W`` or ``H x W x C`` in numpy samples).
        zoom_exponent: zooming in by ``s`` looks like moving ``s`` times closer, so values are
            multiplied by ``s ** zoom_exponent`` (depth ``-1``, inverse depth / disparity ``+1``).
        mirror_x: a horizontal flip negates channel 0 (camera-frame vectors such as normals).
    """

    label: bool = False
    zoom_exponent: int = 0
    mirror_x: bool = False


LABEL = TargetGeometry(label=True)
SCALAR = TargetGeometry()
DEPTH = TargetGeometry(zoom_exponent=-1)
INVERSE_DEPTH = TargetGeometry(zoom_exponent=1)
NORMAL = TargetGeometry(mirror_x=True)


def _segmentation_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred.float(), target.long(), ignore_index=IGNORE_INDEX)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid entries that is 0 (with a gradient) when nothing is valid, never NaN, and
    non-finite values at invalid entries cannot leak into the result."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp_min(1)


def _depth_valid(target: Tensor) -> Tensor:
    return target != 0


def _normals_valid(target: Tensor) -> Tensor:
    return target.abs().sum(dim=1, keepdim=True) > 0


def _depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    return masked_mean((pred.float() - target.float()).abs(), _depth_valid(target))


def _regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.float()).abs().mean()


def _normals_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    pred = M.unit_vectors(pred.float())
    cos = (pred * target.float()).sum(dim=1, keepdim=True)
    return masked_mean(1.0 - cos, _normals_valid(target))


def _normals_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    pred = M.unit_vectors(pred.float())
    per_pixel = (pred - target.float()).abs().sum(dim=1, keepdim=True)
    return masked_mean(per_pixel, _normals_valid(target))


def _edges_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred.float(), target.float())


# ----------------------------------------------------------------------------- distillation
def _raw_target(output: Tensor) -> Targets:
    return (output,)


def _unit_target(output: Tensor) -> Targets:
    return (M.unit_vectors(output),)


def _sigmoid_target(output: Tensor) -> Targets:
    return (torch.sigmoid(output),)


def argmax_target(output: Tensor) -> Targets:
    """Argmax (``int16``) and its probability: the confidence filter needs nothing else."""
    confidence, labels = output.softmax(dim=1).max(dim=1)
    return labels.to(torch.int16), confidence


def _l1_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    (target,) = targets
    return (student - target).abs().mean(), None


def _cosine_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    (target,) = targets
    cosine = (M.unit_vectors(student) * target).sum(dim=1)
    return (1.0 - cosine).mean(), None


def _bce_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    (target,) = targets
    return F.binary_cross_entropy_with_logits(student, target), None


@torch.no_grad()
def keep_mask(student_logits: Tensor, labels: Tensor, teacher_confidence: Tensor) -> Tensor:
    """Pixels whose pseudo-label is trusted: the two models agree, or the teacher is at least as
    confident as the merged model (no fixed threshold)."""
    confidence, prediction = student_logits.detach().float().softmax(dim=1).max(dim=1)
    agree = prediction == labels.long()
    return agree | (teacher_confidence >= confidence)


def _filtered_ce_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    labels, confidence = targets
    keep = keep_mask(student, labels, confidence)
    per_pixel = F.cross_entropy(student, labels.long(), reduction="none")
    return masked_mean(per_pixel, keep), keep.float().mean()


def _ce_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy to the teacher's argmax on every pixel (plain Model Tinting: a teacher's
    pseudo-label exists wherever it predicts, so there is no invalid pixel to leave out)."""
    labels, _ = targets
    loss = F.cross_entropy(student, labels.long())
    return loss, torch.ones((), device=student.device)


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
    x = M.unit_vectors(x.float(), dim=0)
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
    pseudo_target_fn: Callable[[Tensor], Targets] = field(default=_raw_target, repr=False)
    distill_loss_fn: Callable[[Tensor, Targets], tuple[Tensor, Tensor | None]] = field(
        default=_l1_distill, repr=False
    )
    unfiltered_distill_loss_fn: Callable[[Tensor, Targets], tuple[Tensor, Tensor | None]] | None = (
        field(default=None, repr=False)
    )
    """``distill_loss_fn`` without its pseudo-label filter (``None``: the task filters nothing)."""
    positive: bool = False
    loss_family: str = "regression"
    colour_mapped: bool = False
    """Pictures draw its maps with one colour map over their value range (depth-like maps), so a
    prediction and its target can share one scale; other tasks draw themselves (``visualize``)."""

    def __post_init__(self) -> None:
        if self.loss_family not in LOSS_FAMILIES:
            raise ValueError(
                f"Task {self.name!r}: loss_family must be one of {LOSS_FAMILIES}, "
                f"got {self.loss_family!r}."
            )

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Task loss in fp32 (mixed precision must not degrade regression losses)."""
        return self.loss_fn(pred, target)

    def make_metrics(self) -> M.DenseMetric:
        return self.metrics_factory()

    def visualize(self, x: Tensor) -> Tensor:
        """A ``3 x H x W`` float image in [0, 1] of one prediction or target (no batch dim)."""
        return self.visualize_fn(x.detach().float().cpu() if x.is_floating_point() else x.cpu())

    def pseudo_target(self, output: Tensor) -> Targets:
        """A teacher's raw output as this task's distillation target (detached, fp32)."""
        return self.pseudo_target_fn(output.detach().float())

    def predict(self, output: Tensor) -> Tensor:
        """A head's raw ``B x C x H x W`` output as this task's prediction: class ids,
        probabilities, unit vectors or values (what predictions on disk hold)."""
        return self.pseudo_target(output)[0]

    def distill_loss(
        self, student: Tensor, targets: Targets, confidence_filter: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The student's output against :meth:`pseudo_target`; the second value is the fraction
        of pixels a filter kept (``None`` for a task without a filter). ``confidence_filter=False``
        trains on every pixel (the fraction is then 1)."""
        fn = self.distill_loss_fn
        if not confidence_filter and self.unfiltered_distill_loss_fn is not None:
            fn = self.unfiltered_distill_loss_fn
        return fn(student.float(), targets)

    @property
    def geometry(self) -> TargetGeometry:
        """How augmentation acts on this task's target (declared at registration)."""
        return task_geometry(self.name)

    @property
    def higher_is_better(self) -> bool:
        return self.metrics[self.primary]

    @property
    def is_classification(self) -> bool:
        return self.loss_family == "classification"


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Task]
    geometry: TargetGeometry


_TASKS: Registry[_Entry] = Registry(
    "task", hint="fix the task name in the config, e.g. --data.tasks '[depth]'"
)


def register_task(
    name: str,
    factory: Callable[..., Task] | None = None,
    *,
    geometry: TargetGeometry = SCALAR,
    replace: bool = False,
) -> Callable[..., Task]:
    """Register a task factory ``f(num_classes=None, normal_loss=...) -> Task`` under ``name``.

    ``geometry`` says how augmentation acts on the task's target; it is declared here, not in the
    factory, so transforms can read it by name without knowing the dataset's class counts. Used
    as a decorator when ``factory`` is omitted; a second registration of a name is refused.
    """

    def add(fn: Callable[..., Task]) -> Callable[..., Task]:
        _TASKS.register(name, _Entry(fn, geometry), replace=replace)
        return fn

    return add if factory is None else add(factory)


def unregister_task(name: str) -> None:
    """Remove a task (plugins and tests that register temporary tasks)."""
    _TASKS.unregister(name)


def available_tasks() -> list[str]:
    return _TASKS.names()


def task_geometry(name: str) -> TargetGeometry:
    return _TASKS.get(name).geometry


def build_task(name: str, num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
    """Build a task by name, with the per-dataset facts it needs (class count)."""
    if normal_loss not in NORMAL_LOSSES:
        raise ValueError(f"normal_loss must be one of {NORMAL_LOSSES}, got {normal_loss!r}.")
    return _TASKS.get(name).factory(num_classes=num_classes, normal_loss=normal_loss)


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
            pseudo_target_fn=argmax_target,
            distill_loss_fn=_filtered_ce_distill,
            unfiltered_distill_loss_fn=_ce_distill,
            loss_family="classification",
        )

    return factory


def _depth_factory(name: str) -> Callable[..., Task]:
    """Depth and inverse depth share everything but their geometry (given at registration)."""

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
            positive=True,
            colour_mapped=True,
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


@register_task("normals", geometry=NORMAL)
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
        pseudo_target_fn=_unit_target,
        distill_loss_fn=_cosine_distill,
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
        pseudo_target_fn=_sigmoid_target,
        distill_loss_fn=_bce_distill,
        loss_family="classification",
    )


register_task("segmentation", _segmentation_factory("segmentation", None), geometry=LABEL)
register_task("part_segmentation", _segmentation_factory("part_segmentation", 10), geometry=LABEL)
register_task("depth", _depth_factory("depth"), geometry=DEPTH)
register_task("disparity", _depth_factory("disparity"), geometry=INVERSE_DEPTH)
register_task("autoencoder", _regression_factory("autoencoder", 3))
register_task("keypoints2d", _regression_factory("keypoints2d", 1))
register_task("edge_texture", _regression_factory("edge_texture", 1))
