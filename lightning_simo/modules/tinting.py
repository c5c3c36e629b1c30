"""Model Tinting for dense tasks: label-free re-alignment of a merged SIMO model.

After merging, only two small things train: the layer-wise merge coefficients
``λ_{l,k}`` (one scalar per encoder parameter tensor ``l`` and task ``k``, so the merged encoder is
``θ0 + Σ_k λ_{l,k} τ_{k,l}``) and, in ``tinting`` mode, one layer of each task's head (the
"tinted" layer, by default the head's final 1x1 conv ``out``). No label is ever read: each task's
own fine-tuned model (fine-tuned encoder + fine-tuned head) is the teacher, and the merged model is
trained towards its predictions on unlabelled images:

- segmentation: per-pixel cross-entropy to the teacher's argmax, keeping a pixel only when the
  teacher may be trusted over the merged model (:func:`confidence_filter`, the "Model Tinting++"
  variant of the released code); ``confidence_filter: false`` is plain Model Tinting, which
  trains on every pixel;
- depth-like and other regression tasks: L1 to the teacher's output;
- normals: ``1 - cos`` to the normalised teacher output;
- edges: binary cross-entropy to the teacher's sigmoid (soft targets: the teacher's uncertainty
  on thin boundaries is kept instead of being rounded away).

``adamerging`` mode trains the coefficients only, with the same teacher losses (the entropy
objective of AdaMerging has no counterpart for regression maps, the teachers do).

The schedule follows the released tinting code: manual optimisation, Adam without weight decay or
schedule, and per batch one loss and one Adam step per task, visited in a shuffled order. Gradients
are set to ``None`` before each step, so the tinted layers of the tasks not being visited receive
no update from Adam's momentum.

The MergeCallback builds the net (θ0, fine-tuned heads attached) and then calls
:meth:`TintingModule.configure_tinting`. Its α (fixed or searched) only decides the encoder that is
merged and reported before tinting; the coefficients of this module always start at
``coefficient_init`` for every layer and task, as in the tinting reference (set ``coefficient_init``
to the searched α to start from it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_simo.merging.cache import SampleCache
from lightning_simo.merging.layerwise import LayerwiseMerge
from lightning_simo.models.encoders import EncoderOutput
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.tasks import Targets, Task, argmax_target, keep_mask

__all__ = [
    "LayerwiseMerge",
    "TintingModule",
    "confidence_filter",
    "task_order",
    "teacher_targets",
    "tint_loss",
]


# ----------------------------------------------------------------------------- pseudo-labels
def teacher_targets(task: Task, output: Tensor) -> Targets:
    """What a teacher's raw output becomes as a training target for ``task``
    (:meth:`Task.pseudo_target`; segmentation keeps its argmax and probability, ``int16``)."""
    return task.pseudo_target(output)


def confidence_filter(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel pseudo-labels and which of them to train on.

    Args:
        student_logits: the merged model's logits ``B x C x H x W``.
        teacher_logits: the fine-tuned model's logits, same shape.

    Returns:
        ``(targets, keep_mask)``: the teacher's argmax ``B x H x W`` (``int64``) and a boolean mask
        that drops the pixels where the models disagree and the merged model is the more
        confident one (its mistakes there are more likely the teacher's).
    """
    labels, confidence = argmax_target(teacher_logits.detach().float())
    return labels.long(), keep_mask(student_logits, labels, confidence)


def tint_loss(
    task: Task, student: Tensor, targets: Targets, filtered: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The loss of the merged model's output against a teacher's targets (:func:`teacher_targets`).

    Returns the loss and, for segmentation, the fraction of pixels the confidence filter kept
    (1 with ``filtered=False``; ``None`` for tasks that have no filter).
    """
    return task.distill_loss(student, targets, confidence_filter=filtered)


def task_order(tasks: Sequence[str], step: int) -> list[str]:
    """The tasks in a shuffled order that depends only on ``step`` (reproducible runs, and the
    same order on every rank)."""
    generator = torch.Generator().manual_seed(int(step))
    return [tasks[i] for i in torch.randperm(len(tasks), generator=generator).tolist()]


# ----------------------------------------------------------------------------- the module
class TintingModule(SIMOModule):
    """A merged SIMO model re-aligned by Model Tinting (or AdaMerging-style coefficients only).

    Before :meth:`configure_tinting` has run it behaves like a :class:`SIMOModule` (e.g. ``test``
    of the merged model with ``realign: none``); ``fit`` needs the MergeCallback with ``realign:
    tinting`` or ``adamerging``. Validation, test and predict use the merged encoder with the
    current coefficients and the tinted heads. Checkpoints store that merged encoder under
    ``net.encoder.*`` (plus the coefficients), so a plain SIMOModule loading one
    (``init_from`` / ``load_net_weights``) gets the re-aligned model.

    Args:
        tasks: the merged tasks (linked from the datamodule).
        tint_layer: the module inside each head that is tinted (``out``: the final 1x1 conv of
            every head of this project; any submodule name works).
        coefficient_init: initial value of every merge coefficient λ (0.3 in the reference).
        lr_coefficients: Adam learning rate of the coefficients.
        lr_tinted: Adam learning rate of the tinted layers.
        cache_teachers: compute the teachers' targets once per training sample (needs
            un-augmented training data; checked).
        confidence_filter: segmentation trains only on the pixels where the teacher may be
            trusted over the merged model (``true``, "Model Tinting++" of the released code) or
            on every pixel (``false``, plain Model Tinting).
        **kwargs: the other :class:`SIMOModule` arguments (encoder, head, reference metrics,
            ...); its optimiser settings (``lr``, ``schedule``, ``probe_epochs`` ...) are
            accepted and unused: tinting has its own optimiser.
    """

    def __init__(
        self,
        tasks: list[str],
        tint_layer: str = "out",
        coefficient_init: float = 0.3,
        lr_coefficients: float = 1e-2,
        lr_tinted: float = 1e-2,
        cache_teachers: bool = True,
        confidence_filter: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= coefficient_init <= 1.0:
            raise ValueError(f"coefficient_init must lie in [0, 1], got {coefficient_init}.")
        if lr_coefficients <= 0 or lr_tinted <= 0:
            raise ValueError(
                f"lr_coefficients and lr_tinted must be > 0, got {lr_coefficients}, {lr_tinted}."
            )
        super().__init__(tasks=tasks, **kwargs)
        self.automatic_optimization = False
        self.tint_layer = tint_layer
        self.coefficient_init = coefficient_init
        self.lr_coefficients = lr_coefficients
        self.lr_tinted = lr_tinted
        self.filtered = bool(confidence_filter)
        self.tint_heads = False
        self.layer_merge: LayerwiseMerge | None = None
        self.teacher_cache: SampleCache | None = (
            SampleCache("teacher targets", "`model.init_args.cache_teachers: false`", "cpu")
            if cache_teachers
            else None
        )
        # frozen copies of the fine-tuned heads and the fine-tuned encoders' buffers (e.g.
        # BatchNorm statistics); kept out of the state dict, they are rebuilt from the checkpoints
        self._teacher_heads: dict[str, nn.Module] = {}
        self._teacher_buffers: list[dict[str, Tensor]] = []
        self._target_layout: list[tuple[str, int]] = []  # (task, tensors) of cached targets

    # ------------------------------------------------------------------ set-up (MergeCallback)
    def configure_tinting(
        self,
        theta0: dict[str, Tensor],
        finetuned: list[dict[str, Tensor]],
        fine_tuned_heads: dict[str, dict[str, Tensor]],
        tint_heads: bool = True,
    ) -> None:
        """Create the coefficients, the teachers and the tinted layers; freeze everything else.

        Called once by the MergeCallback in ``setup``, before optimizers exist and before a
        checkpoint is restored (a resumed run gets its coefficients and tinted layers back).

        Args:
            theta0: the pretrained encoder state.
            finetuned: the fine-tuned encoder states, in the order of this module's tasks.
            fine_tuned_heads: each task's fine-tuned head state.
            tint_heads: train one layer of each head too (``tinting``), or the coefficients only
                (``adamerging``).
        """
        if self.layer_merge is not None:
            raise ValueError("Tinting is already configured for this module.")
        if len(finetuned) != len(self.tasks):
            raise ValueError(
                f"Got {len(finetuned)} fine-tuned encoders for the {len(self.tasks)} tasks "
                f"{self.tasks}."
            )
        missing = [t for t in self.tasks if t not in fine_tuned_heads]
        if missing:
            raise ValueError(f"No fine-tuned head given for task(s) {missing}.")
        encoder = self.net.encoder
        params = [
            (n, p)
            for n, p in encoder.named_parameters()
            if n.startswith("backbone.") and p.is_floating_point()
        ]
        for state, label in [(theta0, "the pretrained encoder")] + [
            (ft, f"the fine-tuned {t} encoder") for ft, t in zip(finetuned, self.tasks, strict=True)
        ]:
            absent = [n for n, _ in params if n not in state]
            if absent:
                raise ValueError(f"{label} has no tensor {absent[0]!r} ({len(absent)} missing).")
        device = params[0][1].device if params else torch.device("cpu")
        names = [n for n, _ in params]
        theta0_dev = {n: theta0[n].to(device) for n in names}
        self.layer_merge = LayerwiseMerge(
            theta0_dev, finetuned, names, self.coefficient_init, {n: p.dtype for n, p in params}
        )
        buffer_names = {n for n, _ in encoder.named_buffers()}
        self._teacher_buffers = [
            {n: v.detach().clone() for n, v in ft.items() if n in buffer_names} for ft in finetuned
        ]

        self.net.requires_grad_(False)
        for task in self.tasks:
            head = self.net.heads[task]
            head.load_state_dict(fine_tuned_heads[task])
            teacher = copy.deepcopy(head).eval()
            teacher.requires_grad_(False)
            self._teacher_heads[task] = teacher
            if tint_heads:
                self._tinted(task).requires_grad_(True)
        self.tint_heads = tint_heads

    def _tinted(self, task: str) -> nn.Module:
        head = self.net.heads[task]
        try:
            layer = head.get_submodule(self.tint_layer)
        except AttributeError:
            names = [
                n
                for n, m in head.named_modules()
                if n and next(m.parameters(recurse=False), None) is not None
            ]
            raise ValueError(
                f"The {task!r} head has no layer {self.tint_layer!r} to tint; layers with "
                f"weights: {', '.join(names)}."
            ) from None
        if next(layer.parameters(), None) is None:
            raise ValueError(f"Layer {self.tint_layer!r} of the {task!r} head has no weights.")
        return layer

    def tinted_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the tinted layers (none in ``adamerging`` mode)."""
        if not self.tint_heads:
            return []
        return [p for t in self.tasks for p in self._tinted(t).parameters()]

    # ------------------------------------------------------------------ forward
    def merged_features(self, images: Tensor) -> EncoderOutput:
        """Encoder features with the merged weights of the current coefficients."""
        if self.layer_merge is None:
            return self.net.encoder(images)
        return functional_call(self.net.encoder, self.layer_merge.merged(), (images,))

    def encode(self, batch: Mapping[str, Tensor]) -> EncoderOutput:
        """The merged encoder's features, so SIMOModule's validation / test / predict steps (and
        their metrics) evaluate the tinted model, not the encoder the MergeCallback built."""
        if self.layer_merge is None:
            return super().encode(batch)
        return self.merged_features(batch["image"])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Predictions of the merged model (``self.net(images)`` would use the MergeCallback's
        encoder instead)."""
        return self.net.forward_heads(self.merged_features(images))

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Each task's fine-tuned model (fine-tuned encoder + untouched fine-tuned head) on
        ``images``, resized to the image size."""
        if self.layer_merge is None:
            raise ValueError("Teachers exist only after configure_tinting.")
        size = images.shape[-2:]
        out = {}
        for k, task in enumerate(self.tasks):
            state = self.layer_merge.task_weights(k)
            state.update({n: b.to(images.device) for n, b in self._teacher_buffers[k].items()})
            feats = functional_call(self.net.encoder, state, (images,))
            pred = self._teacher_heads[task].to(images.device)(feats)
            if pred.shape[-2:] != size:
                pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            out[task] = pred
        return out

    def _compute_targets(self, images: Tensor) -> dict[str, Targets]:
        return {
            task: teacher_targets(self.task_specs[task], pred)
            for task, pred in self.teacher_outputs(images).items()
        }

    def batch_targets(self, batch: Mapping[str, Tensor]) -> dict[str, Targets]:
        """The teachers' targets for a training batch (from the cache when enabled)."""
        images = batch["image"]
        if self.teacher_cache is None or "index" not in batch:
            return self._compute_targets(images)

        def flat(missing: Tensor) -> list[Tensor]:
            targets = self._compute_targets(missing)
            self._target_layout = [(task, len(parts)) for task, parts in targets.items()]
            return [part for parts in targets.values() for part in parts]

        parts = iter(self.teacher_cache.get(batch["index"], images, flat))
        return {task: tuple(next(parts) for _ in range(n)) for task, n in self._target_layout}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.layer_merge is None:
            raise ValueError(_NOT_CONFIGURED)
        # frozen parts must not update BatchNorm statistics or use dropout
        self.net.eval()
        images = batch["image"]
        n = int(images.shape[0])
        targets = self.batch_targets(batch)
        optimizer = self.optimizers()
        losses = []
        for task in task_order(self.tasks, self.global_step):
            optimizer.zero_grad(set_to_none=True)
            pred = self.net.forward_heads(self.merged_features(images), [task])[task]
            loss, kept = tint_loss(self.task_specs[task], pred, targets[task], self.filtered)
            self.manual_backward(loss)
            optimizer.step()
            self.layer_merge.clamp_()
            losses.append(loss.detach())
            self.log(
                f"train/{task}/tint_loss", loss.detach(), batch_size=n, on_step=True, on_epoch=True
            )
            if kept is not None:
                self.log(
                    f"train/{task}/kept_fraction", kept, batch_size=n, on_step=True, on_epoch=True
                )
        self.log(
            "train/loss",
            torch.stack(losses).mean(),
            batch_size=n,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
        )
        lam = self.layer_merge.coefficients.detach()
        self.log("train/lambda_mean", lam.mean(), on_step=True, on_epoch=False)
        for k, task in enumerate(self.tasks):
            self.log(f"train/{task}/lambda_mean", lam[k].mean(), on_step=True, on_epoch=False)
        self.samples_seen += n

    def configure_optimizers(self) -> Any:
        if self.layer_merge is None:
            raise ValueError(_NOT_CONFIGURED)
        groups: list[dict[str, Any]] = [
            {
                "params": [self.layer_merge.coefficients],
                "lr": self.lr_coefficients,
                "name": "coefficients",
            }
        ]
        tinted = self.tinted_parameters()
        if tinted:
            groups.append({"params": tinted, "lr": self.lr_tinted, "name": "tinted"})
        return torch.optim.Adam(groups, weight_decay=0.0)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the merged encoder of the current coefficients under ``net.encoder.*``."""
        if self.layer_merge is None:
            return
        state = checkpoint.get("state_dict")
        if state is None:
            return
        with torch.no_grad():
            merged = self.layer_merge.merged()
        for name, value in merged.items():
            key = f"net.encoder.{name}"
            if key in state:
                state[key] = value.detach().to(state[key].dtype).clone()


_NOT_CONFIGURED = (
    "TintingModule trains only what Model Tinting sets up: add the MergeCallback with "
    "merge.realign: tinting (or adamerging) to the config; for other re-alignment modes use "
    "lightning_simo.modules.simo.SIMOModule."
)
