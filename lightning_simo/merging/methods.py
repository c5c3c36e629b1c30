"""Merge methods: pure functions from (theta_0, [theta_t]) to one merged state dict.

``merge(pretrained, finetuned, method, **options)`` validates the options, checks that all state
dicts describe the same architecture, and runs a registered method. Methods work tensor by
tensor: no step ever builds an ``(n_tasks x n_params)`` matrix or concatenates a whole model, so
merging three ViT-B encoders needs little more than the inputs and the output in memory. Global
TIES trimming, which ranks magnitudes over the whole model, finds each task vector's exact
threshold in one counting pass bracketed by a strided sample (a radix select over the float bit
patterns decides when the bracket misses).

Numerics follow :mod:`lightning_simo.merging.task_vectors` (the one casting rule and the one
``theta_0 + alpha * tau``): everything is computed in float32 (float64 if an input tensor is
float64), so bf16 and fp16 checkpoints merge without accumulating rounding errors; each result is
cast back to the pretrained tensor's dtype. Integer tensors (e.g. ``num_batches_tracked``) are copied from
``pretrained``. The result never shares memory with the inputs.

New methods plug in with :func:`register_merge_method`; see :class:`MergeInputs` for the per-key
accessors a method receives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.task_vectors import (
    add_scaled,
    cast_like,
    check_compatible,
    compute_dtype,
    is_bn_running_stat,
)
from lightning_simo.registry import Registry

__all__ = [
    "BN_STATS_POLICIES",
    "MERGE_METHODS",
    "MergeFn",
    "MergeInputs",
    "MergeMethod",
    "Option",
    "iter_merge",
    "keep_count",
    "merge",
    "register_merge_method",
]

BN_STATS_POLICIES = ("merge", "pretrained", "reestimate")
"""BatchNorm running statistics: merged like weights, kept from theta_0, or re-estimated on data
afterwards (the MergeCallback's ``bn_stats``; re-estimating needs data, so ``merge`` keeps
theta_0's and the callback does the rest)."""
_COMMON_OPTIONS = ("bn_stats", "keys")
_DIGIT_BITS = 16
_DIGITS = 1 << _DIGIT_BITS
_SAMPLE = 1 << 22  # magnitudes per task that bracket a global TIES threshold
_SAMPLE_MARGIN = 0.0005  # extra bracket width, as a fraction of the sample
# A narrow bracket keeps few undecided values (memory flat in the number of tasks); a missed one
# costs the radix select's two passes, never a wrong threshold.


@dataclass(frozen=True)
class MergeInputs:
    """What a merge method sees: the inputs, the keys to merge, and the compute dtype.

    ``keys`` are the floating-point keys selected for merging (in ``pretrained`` order); every
    other key is copied from ``pretrained`` by :func:`merge`. Accessors convert to ``dtype`` on
    the fly, one key at a time, so methods never hold more than one tensor per task.
    ``on_finish(key)`` is called each time a method finishes a key (progress bars).
    """

    pretrained: Mapping[str, Tensor]
    finetuned: Sequence[Mapping[str, Tensor]]
    keys: tuple[str, ...]
    dtype: torch.dtype
    on_finish: Callable[[str], None] | None = field(default=None, compare=False)

    @property
    def n_tasks(self) -> int:
        return len(self.finetuned)

    @property
    def numel(self) -> int:
        """Number of merged coordinates (per task)."""
        shapes = tensor_metadata(self.pretrained)
        return sum(shapes[k].numel() for k in self.keys)

    def theta0(self, key: str) -> Tensor:
        return self.pretrained[key].to(self.dtype)

    def thetas(self, key: str) -> list[Tensor]:
        return [ft[key].to(self.dtype) for ft in self.finetuned]

    def task_vectors(self, key: str) -> list[Tensor]:
        """``theta_t - theta_0`` for every task at ``key`` (fresh tensors, safe to modify)."""
        base = self.theta0(key)
        return [ft[key].to(self.dtype) - base for ft in self.finetuned]

    def task_vector_samples(self, key: str, stride: int) -> list[Tensor]:
        """Every ``stride``-th entry of each flattened task vector at ``key`` (fresh tensors).

        Subclasses whose task vectors are not ``theta_t - theta_0`` must override it."""
        base = self.pretrained[key].reshape(-1)[::stride].to(self.dtype)
        return [ft[key].reshape(-1)[::stride].to(self.dtype) - base for ft in self.finetuned]

    def scaled(self, key: str, tau: Tensor, alpha: float | Tensor) -> Tensor:
        """``theta_0 + alpha * tau`` at ``key``, finished (the step most methods end with)."""
        return self.finish(key, add_scaled(self.pretrained[key], tau.to(self.dtype), alpha))

    def finish(self, key: str, value: Tensor) -> Tensor:
        """Cast a merged value back to the pretrained tensor's dtype and device."""
        if self.on_finish is not None:
            self.on_finish(key)
        return cast_like(value, self.pretrained[key])


MergeFn = Callable[[MergeInputs, Mapping[str, Any]], dict[str, Tensor]]
Granularity = bool | Callable[[Mapping[str, Any]], bool]


def tensor_metadata(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Shapes and dtypes of ``state_dict`` without reading its data.

    A lazy state dict (one that reads from disk on access) offers ``metadata()``, a mapping of
    meta-device tensors, so checks of keys, shapes and dtypes cost no I/O; an in-memory dict is
    its own metadata.
    """
    describe = getattr(state_dict, "metadata", None)
    return describe() if callable(describe) else state_dict


class _Invalid(ValueError):
    """Raised by option checks with the expected range; :func:`_validate` adds the context."""


@dataclass(frozen=True)
class Option:
    """One option of a merge method: its default and a check returning the normalised value."""

    default: Any
    check: Callable[[Any], Any]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function and how its options are validated."""

    name: str
    fn: MergeFn
    options: Mapping[str, Option] = field(default_factory=dict)
    validate: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    keywise: Granularity = False
    elementwise: Granularity = False
    prepass: Callable[[MergeInputs, Mapping[str, Any]], dict[str, Any]] | None = None
    """For a method that is not keywise because of model-wide statistics: computes them in a
    streaming pass (one key at a time) and returns the options with them added, with which
    ``fn`` then runs one key at a time. Streams use it (bounded memory); :func:`merge` does
    not (it holds every result anyway, and one pass fewer is faster)."""

    def is_keywise(self, options: Mapping[str, Any]) -> bool:
        """Whether each key's result depends on that key's inputs only (so results can be
        produced and written one key at a time)."""
        return self.keywise(options) if callable(self.keywise) else self.keywise

    def is_elementwise(self, options: Mapping[str, Any]) -> bool:
        """Whether splitting tensors into pieces (as extra keys) leaves every coordinate's result
        unchanged, global statistics included: lazy merging then reads big tensors in chunks."""
        return self.elementwise(options) if callable(self.elementwise) else self.elementwise

    def normalise(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validated options with defaults filled in (raises ``ValueError``)."""
        if self.validate is not None:
            return self.validate(options)
        return _validate(self.name, self.options, options)


MERGE_METHODS: Registry[MergeMethod] = Registry(
    "merge method", "set merge.method (or the `method` argument of merge) to one of them"
)


def register_merge_method(
    name: str,
    fn: MergeFn | None = None,
    *,
    options: Mapping[str, Option] | None = None,
    validate: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    replace: bool = False,
    keywise: Granularity = False,
    elementwise: Granularity = False,
    prepass: Callable[[MergeInputs, Mapping[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """Register ``fn`` under ``name`` (usable as a decorator when ``fn`` is omitted).

    ``fn(inputs, options)`` returns ``{key: merged tensor}`` for every key in ``inputs.keys``
    (use ``inputs.finish`` to cast). ``options`` declares the accepted options; ``validate``
    replaces the declarative check entirely when options depend on each other. ``keywise`` and
    ``elementwise`` (a bool, or a function of the validated options) tell :func:`iter_merge` and
    lazy merging how finely the method can be streamed; the safe default is neither.
    ``prepass`` (see :class:`MergeMethod`) lets streams run a method one key at a time after a
    pass that gathers its model-wide statistics.
    """

    def add(function: MergeFn) -> MergeFn:
        spec = MergeMethod(
            name, function, dict(options or {}), validate, keywise, elementwise, prepass
        )
        MERGE_METHODS.register(name, spec, replace=replace)
        return function

    return add if fn is None else add(fn)


# ----------------------------------------------------------------------------- option checks


def _real(value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid(expected)
    return float(value)


def _non_negative(value: Any) -> float:
    expected = "a finite number >= 0"
    number = _real(value, expected)
    if not (math.isfinite(number) and number >= 0):
        raise _Invalid(expected)
    return number


def _density(value: Any) -> float:
    expected = "a number in (0, 1]"
    number = _real(value, expected)
    if not 0 < number <= 1:
        raise _Invalid(expected)
    return number


def _drop_rate(value: Any) -> float:
    expected = "a number in [0, 1)"
    number = _real(value, expected)
    if not 0 <= number < 1:
        raise _Invalid(expected)
    return number


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _Invalid("an integer")
    return int(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Invalid("one of " + ", ".join(repr(c) for c in choices))
        return value

    return check


def _validate(
    method: str, spec: Mapping[str, Option], options: Mapping[str, Any], context: str = ""
) -> dict[str, Any]:
    """Check ``options`` against ``spec``; messages name the option and its valid range."""
    for name in options:
        if name not in spec:
            valid = ", ".join(sorted([*spec, *_COMMON_OPTIONS]))
            raise ValueError(
                f"unknown option {name!r} for merge method {method!r}{context}; "
                f"valid options: {valid}"
            )
    result: dict[str, Any] = {}
    for name, option in spec.items():
        value = options.get(name, option.default)
        try:
            result[name] = option.check(value)
        except _Invalid as err:
            raise ValueError(
                f"option {name!r} of merge method {method!r}{context} must be {err}, got {value!r}"
            ) from None
    return result


# ----------------------------------------------------------------------------- helpers


def keep_count(density: float, n: int) -> int:
    """The rank, counted from the largest, of the magnitude TIES trims at among ``n``.

    The TIES authors' ``topk_values_mask`` (kept by FusionBench's ``ties_merging_utils``) takes
    the ``(n - int(density * n))``-th smallest magnitude as the threshold and keeps every value at
    or above it: that is the ``int(density * n) + 1``-th largest, so ``int(density * n) + 1``
    values survive when no magnitudes tie. ``density = 1`` keeps everything (the reference's
    ``kthvalue(0)`` would fail there). Note that mergekit's ``magnitude`` sparsification keeps
    exactly ``int(density * n)`` values per tensor instead (an ``argsort``, ties broken by
    position); this engine follows the TIES authors.
    """
    return min(n, int(density * n) + 1)


def _accumulate(values: Iterable[Tensor]) -> Tensor:
    """Sum in task order; a fixed order makes results reproducible bit for bit."""
    iterator = iter(values)
    total = next(iterator).clone()
    for value in iterator:
        total += value
    return total


def _nonzero_count(values: Tensor) -> int:
    """``count_nonzero`` through float kernels, several times faster on CPUs (exact: 0/1 sums
    in float32 stay exact below 2**24 entries, larger tensors sum in float64)."""
    dtype = torch.float32 if values.numel() < 1 << 24 else torch.float64
    return int(torch.sign(values).abs_().sum(dtype=dtype))


def _int_view(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    if dtype == torch.float64:
        return torch.int64, 64
    if dtype == torch.float32:
        return torch.int32, 32
    raise ValueError(f"radix select supports float32/float64, got {dtype}")


KeyObserver = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
"""Called by the counting pass of :func:`_bracketed_select` with each key's flat sum, in task
order, of the values above the brackets (``|tau| > hi``), the flat indices where some task has a
non-zero magnitude inside its bracket, every task's values there (``tasks x len(indices)``),
and which of those are above and which inside their task's bracket."""


def _kth_largest_magnitudes(inputs: MergeInputs, k: int) -> list[Tensor]:
    """The k-th largest ``|tau_t|`` over all merged keys, for every task, exactly.

    :func:`_bracketed_select`, and the radix select below when its bracket misses. Profiling the
    radix select showed its time in the two histogram passes (``bincount`` and the prefix
    compaction of the second digit), each as long as the merge itself.
    """
    found = _bracketed_select(inputs, k)
    return _kth_largest_magnitudes_radix(inputs, k) if found is None else found[0]


def _sample_brackets(inputs: MergeInputs, k: int) -> list[tuple[Tensor, Tensor]]:
    """Per task, two magnitudes ``(lo, hi)`` from a strided sample that very likely enclose the
    k-th largest magnitude (sample quantiles a few standard deviations around the target)."""
    n = inputs.numel
    stride = max(1, n // _SAMPLE)
    samples: list[list[Tensor]] = [[] for _ in range(inputs.n_tasks)]
    for key in inputs.keys:
        for task, sample in enumerate(inputs.task_vector_samples(key, stride)):
            samples[task].append(sample.abs_())
    brackets = []
    for parts in samples:
        sample = torch.cat(parts)
        m = sample.numel()
        rank = k * m / n  # the target's expected rank in the sample (0-based from the top)
        spread = 6.0 * math.sqrt(max(rank * (1.0 - rank / m), 1.0)) + _SAMPLE_MARGIN * m
        upper, lower = int(rank - spread), int(math.ceil(rank + spread))
        # the sample's (upper + 1)-th and (lower + 1)-th largest values
        hi = sample.kthvalue(m - upper).values if upper >= 0 else sample.new_tensor(math.inf)
        lo = sample.kthvalue(m - lower).values if lower < m else sample.new_tensor(0.0)
        brackets.append((lo, hi))
    return brackets


def _bracketed_select(
    inputs: MergeInputs, k: int, observer: KeyObserver | None = None
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The k-th largest ``|tau_t|`` per task in one pass over the data, with the non-zero
    magnitudes inside each task's bracket (in key order), or ``None`` when the sample's bracket
    missed it (a sample unlike the data).

    The pass only counts the values above the bracket and collects the few inside it;
    ``kthvalue`` over that small set gives the exact answer. ``observer`` sees every key during
    the pass, so model-wide statistics that depend on the thresholds only through the undecided
    values (TIES's majority sign) are gathered in the same read. Every full-size operation is a
    float kernel (``hardshrink``, sums): comparisons that produce boolean tensors cost several
    times more on CPUs, and the entries inside the brackets are found once per key for all
    tasks. Exact zeros never enter the collected values; they are counted, as they are the
    smallest magnitudes.
    """
    brackets = _sample_brackets(inputs, k)
    lows = torch.stack([lo for lo, _ in brackets])[:, None]
    tops = torch.stack([hi for _, hi in brackets])[:, None]
    # hardshrink arguments, once: |x| > ceiling is above the bracket, |x| > floor at least in it
    ceilings = [float(hi) for _, hi in brackets]
    floors = [_just_below(lo) for lo, _ in brackets]
    from_zero = [float(lo) == 0.0 for lo, _ in brackets]  # every exact zero is inside
    above = [0] * inputs.n_tasks
    zeros = [0] * inputs.n_tasks
    inside: list[list[Tensor]] = [[] for _ in range(inputs.n_tasks)]
    for key in inputs.keys:
        taus = [tau.reshape(-1) for tau in inputs.task_vectors(key)]
        kept: Tensor | None = None  # the sum of the values above the brackets, in task order
        spread: Tensor | None = None  # sum of |inside values|: non-zero where any task is inside
        for task, tau in enumerate(taus):
            over = torch.nn.functional.hardshrink(tau, ceilings[task])
            at_least = torch.nn.functional.hardshrink(tau, floors[task])
            above[task] += _nonzero_count(over)
            if from_zero[task]:
                zeros[task] += tau.numel() - _nonzero_count(at_least)
            middle = at_least.sub_(over).abs_()
            spread = middle if spread is None else spread.add_(middle)
            kept = over if kept is None else kept.add_(over)
        assert spread is not None and kept is not None
        where = spread.nonzero().squeeze(1)
        values = torch.stack([tau.index_select(0, where) for tau in taus])
        magnitude = values.abs()
        high = magnitude > tops.to(magnitude)
        mid = (magnitude >= lows.to(magnitude)) & ~high & (magnitude != 0)
        for task in range(inputs.n_tasks):
            inside[task].append(magnitude[task][mid[task]])
        if observer is not None:
            observer(kept, where, values, high, mid)
    result: list[Tensor] = []
    collected: list[Tensor] = []
    for task in range(inputs.n_tasks):
        values = torch.cat(inside[task])
        needed = k - above[task]
        if not 0 < needed <= values.numel() + zeros[task]:
            return None
        if needed > values.numel():
            result.append(values.new_zeros(()).cpu())
        else:
            result.append(values.kthvalue(values.numel() - needed + 1).values.cpu())
        collected.append(values)
    return result, collected


def _kth_largest_magnitudes_radix(inputs: MergeInputs, k: int) -> list[Tensor]:
    """The k-th largest ``|tau_t|`` over all merged keys, for every task, without concatenation.

    Non-negative IEEE floats sort like their bit patterns read as integers, so the k-th largest
    magnitude is found one 16-bit digit at a time (most significant first): one pass builds a
    histogram of the current digit among values that share the already-fixed higher digits, and
    the cumulative counts from the top tell which digit the k-th value has. Two passes for
    float32, four for float64; memory is one histogram per task. The result is exact, ties
    included, and equals ``kthvalue`` over the concatenated magnitudes.
    """
    int_dtype, bits = _int_view(inputs.dtype)
    prefixes = [0] * inputs.n_tasks
    remaining = [k] * inputs.n_tasks
    for shift in range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist: Tensor | None = None
        for key in inputs.keys:
            for task, tau in enumerate(inputs.task_vectors(key)):
                pattern = tau.abs_().view(int_dtype).reshape(-1)
                if shift + _DIGIT_BITS < bits:
                    pattern = pattern[(pattern >> (shift + _DIGIT_BITS)) == prefixes[task]]
                    digits = (pattern >> shift) & (_DIGITS - 1)
                else:  # the sign bit is 0, so the top digit needs no mask
                    digits = pattern >> shift
                counts = torch.bincount(digits, minlength=_DIGITS)
                if hist is None:
                    hist = torch.zeros(
                        inputs.n_tasks, _DIGITS, dtype=torch.int64, device=counts.device
                    )
                hist[task] += counts
        assert hist is not None
        # from_top[j] = how many values have a digit >= (_DIGITS - 1 - j)
        from_top = hist.flip(1).cumsum(1).cpu()
        for task in range(inputs.n_tasks):
            j = int(torch.searchsorted(from_top[task], remaining[task]))
            above = int(from_top[task, j - 1]) if j > 0 else 0
            remaining[task] -= above
            prefixes[task] = (prefixes[task] << _DIGIT_BITS) | (_DIGITS - 1 - j)
    return [torch.tensor(p, dtype=int_dtype).view(inputs.dtype) for p in prefixes]


def _select_keys(
    pretrained: Mapping[str, Tensor], keys: Iterable[str] | None, bn_stats: str
) -> tuple[str, ...]:
    if keys is None:
        wanted = None
    else:
        if isinstance(keys, str):
            raise ValueError("option 'keys' must be an iterable of key names, not one string")
        requested = list(keys)
        wanted = set(requested)
        unknown = next((k for k in requested if k not in pretrained), None)
        if unknown is not None:
            raise ValueError(
                f"option 'keys' names {unknown!r}, which is not in the pretrained state dict"
            )
    return tuple(
        key
        for key, value in pretrained.items()
        if value.is_floating_point()
        and (wanted is None or key in wanted)
        and not (bn_stats != "merge" and is_bn_running_stat(key))
    )


def _compute_dtype(
    pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], keys: Sequence[str]
) -> torch.dtype:
    """One dtype for the whole merge (:func:`compute_dtype` over every merged tensor), so global
    statistics such as TIES thresholds are taken in a single precision."""
    wide = any(
        compute_dtype(pretrained[key], *(ft[key] for ft in finetuned)) == torch.float64
        for key in keys
    )
    return torch.float64 if wide else torch.float32


# ----------------------------------------------------------------------------- the entry point


def merge(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str,
    *,
    progress: bool | Callable[[str], None] = False,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned state dicts that share the ``pretrained`` starting point.

    Args:
        pretrained: theta_0, e.g. ``encoder_state_dict`` of the foundation checkpoint.
        finetuned: theta_t per task, same keys and shapes as ``pretrained``.
        method: a key of :data:`MERGE_METHODS` (``average``, ``task_arithmetic``, ``ties``,
            ``dare`` built in).
        options: the method's options (see each method), plus two common ones:
            ``bn_stats``: ``"merge"`` (default) merges BatchNorm running statistics like
            weights (note that ``theta_0 + scaling * sum(tau)`` can drive a ``running_var``
            negative when ``scaling * n_tasks > 1``); ``"pretrained"`` keeps theta_0's;
            ``"reestimate"`` also keeps theta_0's here, because re-estimating needs data: a
            Lightning callback does it afterwards.
            ``keys``: merge only these keys; all others are copied from ``pretrained``.
        progress: ``True`` shows a progress bar over the merged tensors (long merges); a callable
            is called with each finished key instead.

    Returns:
        A new state dict with ``pretrained``'s keys, order and per-tensor dtypes.
    """
    spec, method_options, inputs = _prepare(pretrained, finetuned, method, options)
    merged: dict[str, Tensor] = {}
    if inputs is not None:
        with _progress(progress, f"merging ({method})", len(inputs.keys)) as on_finish:
            inputs = dataclasses.replace(inputs, on_finish=on_finish)
            merged = spec.fn(inputs, method_options)
        _check_complete(merged, inputs.keys, method)
    result: dict[str, Tensor] = {}
    for key, value in pretrained.items():
        if key in merged:
            result[key] = cast_like(merged[key], value)
        else:
            result[key] = value.detach().clone()
    return result


def iter_merge(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str,
    **options: Any,
) -> Iterator[tuple[str, Tensor]]:
    """:func:`merge` as a stream of ``(key, merged tensor)`` in ``pretrained``'s key order.

    The values are those of :func:`merge`, bit for bit. A keywise method (each key's result
    depends on that key only) runs one key at a time, so a consumer that writes each tensor
    out holds one key's inputs and result, never the model. Other methods (e.g. TIES, whose
    sign election needs a model-wide majority) first gather those statistics in a pass of their
    own when they can (``prepass``) and then also run one key at a time; the rest run over all
    keys first and hand their results out one by one. Options are validated before the first
    value.
    """
    spec, method_options, inputs = _prepare(pretrained, finetuned, method, options)
    return _stream(pretrained, spec, method_options, inputs)


def _stream(
    pretrained: Mapping[str, Tensor],
    spec: MergeMethod,
    method_options: dict[str, Any],
    inputs: MergeInputs | None,
) -> Iterator[tuple[str, Tensor]]:
    keys = set(inputs.keys) if inputs is not None else set()
    merged: dict[str, Tensor] = {}
    keywise = spec.is_keywise(method_options)
    if inputs is not None and not keywise and spec.prepass is not None:
        method_options = spec.prepass(inputs, method_options)
        keywise = True
    if inputs is not None and not keywise:
        merged = spec.fn(inputs, method_options)
        _check_complete(merged, inputs.keys, spec.name)
    for key in tensor_metadata(pretrained):
        if key not in keys:
            yield key, pretrained[key].detach().clone()
            continue
        if key in merged:
            value = merged.pop(key)
        else:
            one = MergeInputs(inputs.pretrained, inputs.finetuned, (key,), inputs.dtype)
            value = spec.fn(one, method_options).get(key)
            if value is None:
                _check_complete({}, (key,), spec.name)
        reference = tensor_metadata(pretrained)[key]
        yield key, value.to(dtype=reference.dtype)


def _prepare(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str,
    options: Mapping[str, Any],
) -> tuple[MergeMethod, dict[str, Any], MergeInputs | None]:
    """Validate method, options and inputs; the inputs of the method (``None``: nothing to
    merge). Shapes and dtypes come from :func:`tensor_metadata`, so lazy inputs are not read."""
    spec = MERGE_METHODS.get(method)
    options = dict(options)
    bn_stats = options.pop("bn_stats", "merge")
    if bn_stats not in BN_STATS_POLICIES:
        raise ValueError(
            f"option 'bn_stats' must be one of {', '.join(map(repr, BN_STATS_POLICIES))}, "
            f"got {bn_stats!r}"
        )
    keys = options.pop("keys", None)
    method_options = spec.normalise(options)
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError("merge needs at least one fine-tuned state dict")
    names = [f"finetuned {i}" for i in range(len(finetuned))]
    reference = tensor_metadata(pretrained)
    described = [tensor_metadata(ft) for ft in finetuned]
    check_compatible(reference, described, names=names, reference_name="pretrained")
    merge_keys = _select_keys(reference, keys, bn_stats)
    if not merge_keys:
        return spec, method_options, None
    dtype = _compute_dtype(reference, described, merge_keys)
    return spec, method_options, MergeInputs(pretrained, finetuned, merge_keys, dtype)


def _check_complete(merged: Mapping[str, Tensor], keys: Sequence[str], method: str) -> None:
    missing = next((k for k in keys if k not in merged), None)
    if missing is not None:
        raise RuntimeError(f"merge method {method!r} returned no value for key {missing!r}")


@contextlib.contextmanager
def _progress(
    progress: bool | Callable[[str], None], label: str, total: int
) -> Iterator[Callable[[str], None] | None]:
    """The ``on_finish`` hook for :class:`MergeInputs`: a rich progress bar over the merged
    tensors, the caller's own callable, or nothing. Methods that finish a key more than once
    (multi-pass ones) only make the bar full early; it never blocks them."""
    if callable(progress):
        yield progress
        return
    if not progress:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        job = bar.add_task(label, total=total)
        yield lambda key: bar.update(job, advance=1)


# ----------------------------------------------------------------------------- methods


def _average(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Uniform mean of the fine-tuned weights (model soup)."""
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        total = _accumulate(inputs.thetas(key))
        out[key] = inputs.finish(key, total.div_(inputs.n_tasks))
    return out


def _task_arithmetic(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """theta_0 + scaling * sum_t tau_t (Ilharco et al., 2023)."""
    scaling = options["scaling"]
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        out[key] = inputs.scaled(key, _accumulate(inputs.task_vectors(key)), scaling)
    return out


def _disjoint(
    trimmed: Sequence[Tensor], elected: Tensor, rule: str, signed: bool = False
) -> Tensor:
    """Mean, sum or signed max magnitude of the trimmed values that agree with ``elected``.

    A value agrees when it is positive where ``elected > 0`` and negative elsewhere (the
    reference's ``torch.where(sign > 0, v > 0, v < 0)``, which also decides an elected sign of
    0); 0 where none agree. ``max`` is the largest agreeing magnitude times ``elected``.
    ``signed``: the caller guarantees that wherever ``elected`` is 0 every value is 0 or the
    coordinate is recomputed later, so the cheaper ``value * elected > 0`` decides.
    """
    if signed:
        # |value| where it carries the elected sign (elected is -1, 0 or 1): float kernels only,
        # one task at a time; same-signed values sum to the sign times their magnitudes' sum,
        # rounding alike, and + 0.0 leaves no negative zeros
        total = count = None
        for value in trimmed:
            agreeing = torch.relu(torch.mul(value, elected))
            if total is None:
                total, count = agreeing, torch.sign(agreeing)
            elif rule == "max":
                torch.maximum(total, agreeing, out=total)
            else:
                total.add_(agreeing)
                count.add_(torch.sign(agreeing))
        total = total.mul_(elected).add_(0.0)
        return total if rule != "mean" else total.div_(count.clamp_(min=1))
    positive = elected > 0
    agree = [torch.where(positive, value > 0, value < 0) for value in trimmed]
    if rule == "max":
        largest = _maximum(torch.where(a, v.abs(), 0.0) for a, v in zip(agree, trimmed))
        return largest.mul_(elected)
    total = _accumulate(torch.where(a, v, 0.0) for a, v in zip(agree, trimmed))
    if rule == "sum":
        return total
    count = _accumulate(a.to(total.dtype) for a in agree)
    return total.div_(count.clamp_(min=1))


def _maximum(values: Iterable[Tensor]) -> Tensor:
    iterator = iter(values)
    result = next(iterator).clone()
    for value in iterator:
        torch.maximum(result, value, out=result)
    return result


def _ties(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

    * trim: keep each task vector's ``keep_count(density, n)`` largest magnitudes; precisely,
      keep ``|tau| >= v_k`` where ``v_k`` is the k-th largest magnitude, so values tied with
      ``v_k`` are all kept. ``trim_scope="global"`` ranks over all merged tensors together (as
      the paper's code), ``"tensor"`` ranks within each tensor.
    * elect: the sign of ``sum_t trimmed_t`` per coordinate. Where that sum is exactly zero, the
      overall majority sign is used: the sign of the sum of the elected signs over all merged
      coordinates (more positive than negative coordinates -> +1; an exact tie -> 0, which, as
      in the reference code, then selects the negative values). Coordinates whose trimmed values
      are all zero merge to 0 either way.
    * disjoint merge: mean (``merge_rule="mean"``), sum (``"sum"``) or largest magnitude times
      the elected sign (``"max"``) of the trimmed values that carry the elected sign. Result:
      ``theta_0 + scaling * merged``.

    Equal, bit for bit, to FusionBench's ``ties_merging`` (``topk_values_mask``,
    ``resolve_sign``, ``disjoint_merge``) on the flattened task vectors with global trimming.

    The majority sign is only known after every coordinate was elected, so coordinates with a
    zero sum but non-zero trimmed values (exact cancellations, rare) are remembered and patched
    at the end; this saves a full pass over the model.
    """
    density, scaling, rule = options["density"], options["scaling"], options["merge_rule"]
    known = options.get(_TIES_MODEL_WIDE)
    thresholds = _ties_thresholds(inputs, options) if known is None else known["thresholds"]
    out: dict[str, Tensor] = {}
    balance = 0.0  # sum of the elected signs (exact in float64 up to 2**53 coordinates)
    pending: list[tuple[str, Tensor, list[Tensor]]] = []
    for key in inputs.keys:
        trimmed, elected, where = _ties_elect(inputs, key, density, thresholds)
        balance += float(elected.sum(dtype=torch.float64))
        if where.numel():
            pending.append((key, where, [t.reshape(-1)[where] for t in trimmed]))
        out[key] = inputs.scaled(key, _disjoint(trimmed, elected, rule, signed=True), scaling)
    # the reference's sign of the summed elected signs: 0 when they balance exactly
    majority = float((balance > 0) - (balance < 0)) if known is None else known["majority"]
    for key, where, values in pending:
        out[key] = out[key].contiguous()
        elected = torch.full_like(values[0], majority)
        merged = _disjoint(values, elected, rule)
        base = inputs.pretrained[key].reshape(-1)[where]
        out[key].view(-1)[where] = cast_like(add_scaled(base, merged, scaling), out[key])
    return out


_TIES_MODEL_WIDE = "_model_wide"
"""The option under which :func:`_ties_prepass` hands the model-wide statistics to ``_ties``."""


def _ties_thresholds(inputs: MergeInputs, options: Mapping[str, Any]) -> list[Tensor] | None:
    """Global trimming's per-task thresholds (``None``: each tensor ranks its own)."""
    if options["trim_scope"] != "global":
        return None
    return _kth_largest_magnitudes(inputs, keep_count(options["density"], inputs.numel))


def _ties_elect(
    inputs: MergeInputs, key: str, density: float, thresholds: list[Tensor] | None
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Trim and elect at ``key``: the trimmed task vectors, the elected signs, and the flat
    indices whose trimmed values cancel exactly (they take the model-wide majority sign)."""
    taus = inputs.task_vectors(key)
    if thresholds is None:
        k = keep_count(density, taus[0].numel())
        limits = [t.abs().reshape(-1).kthvalue(t.numel() - k + 1).values for t in taus]
    else:
        limits = [limit.to(taus[0].device) for limit in thresholds]
    trimmed = [_trim(t, limit) for t, limit in zip(taus, limits)]
    total = _accumulate(trimmed)
    elected = torch.sign(total)
    # non-zero exactly where the kept values are not all zero but their sum is (float kernels)
    cancelled = _accumulate(t.abs() for t in trimmed).mul_(1 - elected.abs())
    if not cancelled.numel() or not float(cancelled.max()):
        return trimmed, elected, cancelled.new_empty(0, dtype=torch.long)
    return trimmed, elected, cancelled.reshape(-1).nonzero().squeeze(1)


def _just_below(limit: Tensor) -> float:
    """The next float below ``limit`` (0 for 0): ``hardshrink`` keeps ``|x| > lambd``, so with
    this ``lambd`` it keeps exactly ``|x| >= limit``."""
    return float(torch.nextafter(limit, torch.zeros_like(limit)))


def _trim(tau: Tensor, limit: Tensor) -> Tensor:
    """``tau`` where ``|tau| >= limit``, else 0 (the reference's ``M * mask``, in one kernel).

    Kept zeros (``limit`` 0) and dropped values are both 0, so the signs, sums and merged values
    equal the reference's."""
    return torch.nn.functional.hardshrink(tau, _just_below(limit))


def _ties_prepass(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Any]:
    """Thresholds and the majority sign, so a stream can then merge each key on its own.

    With global trimming both come from the one counting pass of the threshold selection
    (:class:`_ElectionTally`); per-tensor trimming, or a bracket that missed, costs one
    election pass of its own. Bounded memory either way."""
    density = options["density"]
    if options["trim_scope"] == "global":
        tally = _ElectionTally()
        found = _bracketed_select(inputs, keep_count(density, inputs.numel), tally)
        if found is not None:
            thresholds, inside = found
            majority = tally.majority(thresholds, inside)
            return {**options, _TIES_MODEL_WIDE: {"thresholds": thresholds, "majority": majority}}
    thresholds = _ties_thresholds(inputs, options)
    balance = 0.0
    for key in inputs.keys:
        _, elected, _ = _ties_elect(inputs, key, density, thresholds)
        balance += float(elected.sum(dtype=torch.float64))
    majority = float((balance > 0) - (balance < 0))
    return {**options, _TIES_MODEL_WIDE: {"thresholds": thresholds, "majority": majority}}


class _ElectionTally:
    """The sum of TIES's elected signs over the model, gathered while the thresholds are found.

    Before the thresholds are known, a coordinate is decided when none of its non-zero
    magnitudes lies inside its task's bracket: its kept values, so its elected sign, are known.
    With exactly one inside a bracket (almost every other coordinate) there are two candidate
    signs, with and without that value; both are kept (one byte beside the value the selection
    keeps anyway) and chosen once the value's threshold is known. Coordinates with two or more
    undecided values (rare) keep their task vectors. Sums run in task order over the same values
    as the merge itself, so the signs, and the majority, are the merge's exactly.
    """

    def __init__(self) -> None:
        self.balance = 0
        self.codes: list[list[Tensor]] = []
        self.undecided: list[Tensor] = []

    def __call__(
        self, kept: Tensor, where: Tensor, values: Tensor, high: Tensor, mid: Tensor
    ) -> None:
        if not self.codes:
            self.codes = [[] for _ in range(values.shape[0])]
        without = torch.sign(kept)
        # every coordinate as if decided, then the undecided ones replaced
        self.balance += int(without.sum(dtype=torch.float64))
        if not where.numel():
            return
        self.balance -= int(without.index_select(0, where).sum(dtype=torch.float64))
        zero = values.new_zeros(())
        without = torch.sign(_accumulate(torch.where(high, values, zero).unbind(0)))
        with_value = torch.sign(_accumulate(torch.where(high | mid, values, zero).unbind(0)))
        open_count = mid.sum(0)
        # code 0: several undecided values; else 1 + 3 (s_without + 1) + (s_with + 1)
        code = ((without + 1) * 3 + with_value + 2).to(torch.int8)
        code.masked_fill_(open_count != 1, 0)
        for task in range(values.shape[0]):
            self.codes[task].append(code[mid[task]])
        several = open_count > 1
        if bool(several.any()):
            self.undecided.append(values[:, several])

    def majority(self, thresholds: list[Tensor], inside: list[Tensor]) -> float:
        """The sign of the summed elected signs (0 when they balance exactly)."""
        balance = self.balance_given(thresholds, inside)
        return float((balance > 0) - (balance < 0))

    def balance_given(self, thresholds: list[Tensor], inside: list[Tensor]) -> int:
        """The sum of the elected signs, given every task's threshold and the magnitudes inside
        its bracket (in the order the codes were gathered)."""
        balance = self.balance
        for task, (limit, values) in enumerate(zip(thresholds, inside)):
            code = (
                torch.cat(self.codes[task]).to(torch.int64) if self.codes else values.new_empty(0)
            )
            single = code > 0
            keep = values[single] >= limit.to(values.device)
            code = code[single] - 1
            balance += int(torch.where(keep, code % 3 - 1, code // 3 - 1).sum())
        for taus in self.undecided:
            limits = torch.stack([t.to(taus.device, taus.dtype) for t in thresholds])[:, None]
            kept = torch.where(taus.abs() >= limits, taus, 0.0)
            balance += int(torch.sign(_accumulate(kept.unbind(0))).sum(dtype=torch.float64))
        return balance


def _stable_seed(seed: int, task: int, key: str) -> int:
    """A 63-bit seed from (seed, task, key) that is the same in every process and Python run
    (Python's ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _DroppedInputs(MergeInputs):
    """Task vectors with DARE's random drop and rescale applied, regenerated identically on
    every access so multi-pass methods (global TIES) see the same dropped vectors each time."""

    drop_rate: float = 0.0
    seed: int = 0

    def task_vector_samples(self, key: str, stride: int) -> list[Tensor]:
        return [tau.reshape(-1)[::stride].clone() for tau in self.task_vectors(key)]

    def task_vectors(self, key: str) -> list[Tensor]:
        taus = super().task_vectors(key)
        if self.drop_rate == 0:
            return taus
        dropped = []
        for task, tau in enumerate(taus):
            generator = torch.Generator().manual_seed(_stable_seed(self.seed, task, key))
            # Drawn on the CPU so the mask does not depend on the device the tensors live on.
            keep = torch.rand(tau.shape, generator=generator) >= self.drop_rate
            keep = keep.to(tau.device)
            dropped.append(torch.where(keep, tau / (1.0 - self.drop_rate), 0.0))
        return dropped


_TA_OPTIONS = {"scaling": Option(1.0, _non_negative)}
_TIES_OPTIONS = {
    "density": Option(0.2, _density),
    "scaling": Option(1.0, _non_negative),
    "trim_scope": Option("global", _choice("global", "tensor")),
    "merge_rule": Option("mean", _choice("mean", "sum", "max")),
}
_DARE_OPTIONS = {
    "drop_rate": Option(0.9, _drop_rate),
    "seed": Option(0, _integer),
    "base": Option("task_arithmetic", _choice("task_arithmetic", "ties")),
}


def _validate_dare(options: Mapping[str, Any]) -> dict[str, Any]:
    base = options.get("base", _DARE_OPTIONS["base"].default)
    base_options = MERGE_METHODS.get(base).options if base in ("task_arithmetic", "ties") else {}
    context = f" with base {base!r}" if base_options else ""
    return _validate("dare", {**_DARE_OPTIONS, **base_options}, options, context)


def _dare(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """DARE (Yu et al., 2023): drop each task-vector entry with probability ``drop_rate``,
    rescale the survivors by ``1 / (1 - drop_rate)`` (so the expected task vector is unchanged),
    then merge with ``base`` (task arithmetic or TIES, with its own options).

    The mask of task ``t`` at ``key`` comes from a ``torch.Generator`` seeded with a stable hash
    of ``(seed, t, key)``: results are reproducible across runs, processes and devices, and do
    not depend on the order in which keys are visited.
    """
    base = options["base"]
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(MergeInputs)}
    dropped = _DroppedInputs(**fields, drop_rate=options["drop_rate"], seed=options["seed"])
    base_options = {k: v for k, v in options.items() if k not in _DARE_OPTIONS}
    return MERGE_METHODS.get(base).fn(dropped, base_options)


register_merge_method("average", _average, keywise=True, elementwise=True)
register_merge_method(
    "task_arithmetic", _task_arithmetic, options=_TA_OPTIONS, keywise=True, elementwise=True
)
# TIES elects signs against a model-wide majority (not keywise; streams gather it, and global
# thresholds, in a prepass); global trimming ranks over all coordinates, so splitting tensors
# changes nothing, while per-tensor trimming ranks per tensor.
register_merge_method(
    "ties",
    _ties,
    options=_TIES_OPTIONS,
    elementwise=lambda options: options["trim_scope"] == "global",
    prepass=_ties_prepass,
)
# DARE's masks are drawn per (task, key) over the key's whole shape: never split a tensor.
register_merge_method(
    "dare",
    _dare,
    options=_DARE_OPTIONS,
    validate=_validate_dare,
    keywise=lambda options: options["base"] == "task_arithmetic",
)
