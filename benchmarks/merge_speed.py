"""Merge engine vs a flatten-everything implementation: wall time and peak memory.

Three fine-tuned copies of a ViT encoder (random weights: timm ``vit_base_patch14_dinov2``, 86.6M
parameters, or ``vit_small_patch14_dinov2`` with ``--size small``) are merged with task
arithmetic and with TIES (global trimming, density 0.2) by

* the engine (``lightning_simo.merging.merge``: tensor by tensor, thresholds from a sampled bracket and one counting pass), and
* the straightforward reference below: concatenate every task vector into an
  ``(n_tasks x n_params)`` matrix, ``kthvalue`` per row, then whole-matrix arithmetic.

Each variant runs in its own subprocess so that measurements do not leak into each other.
Memory is the peak resident set size (RSS) *during the merge* minus the RSS just before it: the
inputs are built first, freed heap memory is returned to the OS (``malloc_trim``), the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``), and ``VmHWM`` is read afterwards. RSS is
what the machine actually has to provide; torch's own allocator statistics are not available on
CPU. Wall time and process CPU time are both reported: on a machine shared with other jobs the
wall time mostly measures the neighbours, while single-threaded CPU time stays comparable.
Results are compared through a SHA-256 of every output tensor and must be identical.

The reference functions are also the ground truth of ``tests/test_merging.py``.

``--methods`` (all data-free methods, or the ones named) instead measures each data-free method
(TSV, Iso-C/CTS, consensus, MagMax, Model Stock, Breadcrumbs, DELLA, WUDI) in the engine against
its straightforward implementation in ``benchmarks/method_references.py`` (every task vector
materialised first, per-key stacks, the reference code's own operations), each in its own
subprocess as above. Results must agree to 1e-5 of the task-vector scale (SVDs and sums in a
different order are not bit-identical; the largest difference is printed).

Usage: ``python benchmarks/merge_speed.py [--size base|small] [--repeat N]
[--methods [NAME ...]] [--wudi-iterations N]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["reference_task_arithmetic_flat", "reference_ties_flat"]

MODELS = {
    "base": "vit_base_patch14_dinov2",
    "small": "vit_small_patch14_dinov2",
    "tiny": "vit_tiny_patch16_224",
}
VARIANTS = ("engine-task_arithmetic", "flat-task_arithmetic", "engine-ties", "flat-ties")
DATA_FREE = (
    "tsv", "iso_c", "iso_cts", "consensus", "magmax", "model_stock", "breadcrumbs", "della", "wudi"
)  # fmt: skip
METHOD_VARIANTS = tuple(f"{side}-{m}" for m in DATA_FREE for side in ("engine", "reference"))
N_TASKS = 3
DENSITY = 0.2
SCALING = 0.3


# ----------------------------------------------------------------------------- references


def _flat_setup(
    pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]
) -> tuple[list[str], torch.dtype, Tensor, Tensor]:
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    wide = any(t[k].dtype == torch.float64 for t in [pretrained, *finetuned] for k in keys)
    dtype = torch.float64 if wide else torch.float32
    base = torch.cat([pretrained[k].to(dtype).reshape(-1) for k in keys])
    matrix = torch.stack(
        [torch.cat([ft[k].to(dtype).reshape(-1) for k in keys]) - base for ft in finetuned]
    )
    return keys, dtype, base, matrix


def _unflatten(
    pretrained: Mapping[str, Tensor], keys: Sequence[str], flat: Tensor
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    chunks: dict[str, Tensor] = {}
    for key in keys:
        n = pretrained[key].numel()
        chunks[key] = flat[offset : offset + n].reshape(pretrained[key].shape)
        offset += n
    for key, value in pretrained.items():
        if key in chunks:
            out[key] = chunks[key].to(value.dtype).clone()
        else:
            out[key] = value.clone()
    return out


def reference_task_arithmetic_flat(
    pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], scaling: float
) -> dict[str, Tensor]:
    """theta_0 + scaling * sum of the rows of the concatenated task-vector matrix."""
    keys, _, base, matrix = _flat_setup(pretrained, finetuned)
    return _unflatten(pretrained, keys, base + matrix.sum(dim=0) * scaling)


def reference_ties_flat(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float,
    scaling: float,
    merge_rule: str = "mean",
) -> dict[str, Tensor]:
    """FusionBench's ``ties_merging`` (after the TIES authors' code), on the flattened model.

    Trim (``topk_values_mask``): per task row, the threshold is the ``(n - int(n * density))``-th
    smallest magnitude and every value at or above it is kept. Elect (``resolve_sign``): the sign
    of the column sums; zero signs take the sign of the sum of all signs (0 on an exact tie).
    Disjoint merge (``disjoint_merge``): a value is selected where it is positive under a
    positive sign and negative otherwise; ``mean`` divides the selected sum by the number of
    non-zero selected values (at least 1), ``sum`` does not, ``max`` takes the largest selected
    magnitude times the sign. Result: ``theta_0 + scaling * merged``.
    """
    keys, _, base, matrix = _flat_setup(pretrained, finetuned)
    n = matrix.shape[1]
    rank = max(1, n - int(n * density))  # density 1 keeps all (the reference needs rank >= 1)
    magnitude = matrix.abs()
    kth = magnitude.kthvalue(rank, dim=1, keepdim=True).values
    trimmed = matrix * (magnitude >= kth)
    del magnitude
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    selected = trimmed * torch.where(signs[None] > 0, trimmed > 0, trimmed < 0)
    if merge_rule == "max":
        merged = selected.abs().max(dim=0).values * signs
    else:
        merged = selected.sum(dim=0)
        if merge_rule == "mean":
            merged = merged / (selected != 0).sum(dim=0).float().clamp(min=1)
    return _unflatten(pretrained, keys, base + scaling * merged)


# ----------------------------------------------------------------------------- measurement


def make_inputs(size: str) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Random ViT weights for theta_0 and three seeded perturbations as fine-tuned copies."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODELS[size], pretrained=False)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    finetuned = []
    for task in range(N_TASKS):
        generator = torch.Generator().manual_seed(1000 + task)
        finetuned.append(
            {
                k: v + 0.01 * torch.randn(v.shape, generator=generator)
                if v.is_floating_point()
                else v.clone()
                for k, v in pretrained.items()
            }
        )
    return pretrained, finetuned


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _digest(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _method_merge(variant: str, pretrained, finetuned, wudi_iterations: int):
    """A closure running one data-free variant (``engine-<method>`` / ``reference-<method>``)."""
    from lightning_simo.merging import merge
    from lightning_simo.merging.methods import _stable_seed

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import method_references

    side, method = variant.split("-", 1)
    options = {"iterations": wudi_iterations} if method == "wudi" else {}
    if side == "engine":
        return lambda: merge(pretrained, finetuned, method, **options)
    if method == "della":

        def draws(task: int, key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
            generator = torch.Generator().manual_seed(_stable_seed(0, task, key))
            return torch.rand(shape, generator=generator, dtype=dtype)

        options["draws"] = draws
    return lambda: method_references.REFERENCES[method](pretrained, finetuned, **options)


def run_variant(
    variant: str, size: str, wudi_iterations: int = 10, save: str | None = None
) -> dict[str, float | str]:
    from lightning_simo.merging import merge

    pretrained, finetuned = make_inputs(size)
    method_run = None
    if variant in METHOD_VARIANTS:
        method_run = _method_merge(variant, pretrained, finetuned, wudi_iterations)
    _release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
    before = _status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    if method_run is not None:
        out = method_run()
    elif variant == "engine-task_arithmetic":
        out = merge(pretrained, finetuned, "task_arithmetic", scaling=SCALING)
    elif variant == "flat-task_arithmetic":
        out = reference_task_arithmetic_flat(pretrained, finetuned, SCALING)
    elif variant == "engine-ties":
        out = merge(pretrained, finetuned, "ties", density=DENSITY, scaling=SCALING)
    elif variant == "flat-ties":
        out = reference_ties_flat(pretrained, finetuned, DENSITY, SCALING)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    if save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in out.items()}, save)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": (peak - before) / 1024,
        "digest": _digest(out),
        "params": sum(v.numel() for v in pretrained.values()),
    }


def _measure(variant: str, args: argparse.Namespace, *extra: str) -> dict[str, float | str]:
    """Best of ``args.repeat`` runs of ``variant``, each in a fresh subprocess."""
    runs = []
    for _ in range(args.repeat):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                *("--size", args.size, "--threads", str(args.threads)),
                *("--wudi-iterations", str(args.wudi_iterations)),
                *("--worker", variant),
                *extra,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert all(r["digest"] == runs[0]["digest"] for r in runs), f"{variant} not deterministic"
    return {
        "wall_s": min(float(r["wall_s"]) for r in runs),
        "cpu_s": min(float(r["cpu_s"]) for r in runs),
        "peak_mib": min(float(r["peak_mib"]) for r in runs),
        "digest": runs[0]["digest"],
        "params": runs[0]["params"],
    }


def _print_table(
    results: Mapping[str, Mapping[str, float | str]], args: argparse.Namespace
) -> None:
    params = int(next(iter(results.values()))["params"])
    print(
        f"{MODELS[args.size]}: {params / 1e6:.1f}M params x {N_TASKS} tasks, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print(f"{'variant':24s} {'wall (s)':>9s} {'CPU (s)':>8s} {'peak RSS delta (MiB)':>21s}")
    for variant, result in results.items():
        print(
            f"{variant:24s} {float(result['wall_s']):9.2f} {float(result['cpu_s']):8.2f} "
            f"{float(result['peak_mib']):21.0f}"
        )


def _max_difference(engine: str, reference: str, scale: float) -> float:
    """Largest |engine - reference| over all tensors, in units of the task-vector scale."""
    from safetensors.torch import load_file

    a, b = load_file(engine), load_file(reference)
    assert list(a) == list(b), "engine and reference return different keys"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a) / scale


def main_methods(args: argparse.Namespace) -> None:
    """Every data-free method: engine vs straightforward implementation, same inputs."""
    import tempfile

    methods = args.methods or list(DATA_FREE)
    unknown = sorted(set(methods) - set(DATA_FREE))
    if unknown:
        raise SystemExit(f"unknown data-free method(s) {unknown}; choose from {list(DATA_FREE)}")
    results: dict[str, dict[str, float | str]] = {}
    differences: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in methods:
            saved = {}
            for side in ("engine", "reference"):
                variant = f"{side}-{method}"
                saved[side] = str(Path(folder) / f"{variant}.safetensors")
                results[variant] = _measure(variant, args, "--save", saved[side])
            differences[method] = _max_difference(saved["engine"], saved["reference"], 0.01)
    _print_table(results, args)
    print(f"(WUDI with {args.wudi_iterations} Adam steps per matrix)")
    for method in methods:
        engine, ref = results[f"engine-{method}"], results[f"reference-{method}"]
        time_ratio = float(engine["cpu_s"]) / float(ref["cpu_s"])
        wall_ratio = float(engine["wall_s"]) / float(ref["wall_s"])
        memory = float(engine["peak_mib"]) / max(float(ref["peak_mib"]), 1e-9)
        same = "identical" if engine["digest"] == ref["digest"] else (
            f"max difference {differences[method]:.1e} x the task-vector scale"
        )  # fmt: skip
        print(
            f"{method}: engine takes {time_ratio:.2f}x the CPU time ({wall_ratio:.2f}x wall) and "
            f"{memory:.2f}x the peak memory of the straightforward implementation; {same}"
        )
    # WUDI's Adam steps normalise the gradient, so where it is near zero a rounding difference
    # between the closed-form and the autograd gradient changes a step by up to lr
    differ = [m for m in methods if differences[m] > (1e-3 if m == "wudi" else 1e-5)]
    assert not differ, f"engine and reference differ for {differ}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(MODELS), default="base")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, best kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in every variant (0: torch's default). One thread by default: "
        "on a shared machine, multi-threaded runs mostly measure the neighbours' load",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="benchmark the data-free methods (all, or those named) instead of TA / TIES",
    )
    parser.add_argument(
        "--wudi-iterations", type=int, default=10, help="Adam steps per matrix in WUDI runs"
    )
    parser.add_argument("--worker", choices=VARIANTS + METHOD_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_variant(args.worker, args.size, args.wudi_iterations, args.save)
        print(json.dumps(result))
        return
    if args.methods is not None:
        main_methods(args)
        return

    results = {variant: _measure(variant, args) for variant in VARIANTS}
    _print_table(results, args)
    for method in ("task_arithmetic", "ties"):
        engine, flat = results[f"engine-{method}"], results[f"flat-{method}"]
        assert engine["digest"] == flat["digest"], f"{method}: engine and reference differ"
        wall = float(flat["wall_s"]) / float(engine["wall_s"])
        cpu = float(flat["cpu_s"]) / float(engine["cpu_s"])
        memory = float(engine["peak_mib"]) / float(flat["peak_mib"])
        print(
            f"{method}: engine is {wall:.2f}x faster in wall time ({cpu:.2f}x in CPU time) and "
            f"uses {memory:.2f}x the peak memory of the flat implementation; results identical"
        )


if __name__ == "__main__":
    main()
