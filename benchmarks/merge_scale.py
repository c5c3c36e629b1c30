"""Lazy merging of many large checkpoints vs loading everything first: peak RSS and wall time.

Writes N synthetic task checkpoints of a ViT-L (timm ``vit_large_patch16_224`` shapes, 304 M
parameters, fp16 safetensors, 0.6 GB each) plus θ0 under a temporary folder in /tmp, then
merges them with task arithmetic and TIES (global trimming, density 0.2) for N = 2, 4, 8 in two
ways, each in its own subprocess so the kernel's peak-RSS counter (``VmHWM``) belongs to that
run alone:

* ``in-memory``: ``safetensors.torch.load_file`` every input, ``merge``, ``save_file``;
* ``lazy``: ``LazyStateDict`` inputs, ``merge_lazily`` (row blocks of 1 M coordinates),
  ``write_sharded`` with ``--max-shard-size`` (500 MB: the writer holds at most one shard, so
  the output is never buffered whole; with Hugging Face's 5 GB default a ViT-L's 0.6 GB output
  would be).

Both write the merged model to disk; the timed region is load + merge + write. Peak RSS is the
whole process's (Python and torch included, about 0.3 GB), as a machine has to provide it. After
the timed region each worker hashes every output tensor (SHA-256); the lazy and in-memory
outputs must be identical. The checkpoints are deleted at the end (``--keep`` keeps them).

Usage: ``python benchmarks/merge_scale.py [--tasks 2 4 8] [--model vit_large_patch16_224]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {"task_arithmetic": {"scaling": 0.3}, "ties": {"density": 0.2, "scaling": 1.0}}
TARGET_PEAK_GB = 1.5
TARGET_FLAT = 0.10
TARGET_WALL_RATIO = 1.2


def _shapes(model: str) -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def write_checkpoints(folder: Path, model: str, n_tasks: int) -> list[Path]:
    """θ0 and ``n_tasks`` fine-tuned copies (θ0 + small noise), fp16, one tensor at a time."""
    from safetensors.torch import save_file

    shapes = _shapes(model)
    generator = torch.Generator().manual_seed(0)
    theta0 = {k: (0.02 * torch.randn(s, generator=generator)).half() for k, s in shapes.items()}
    paths = [folder / "theta0.safetensors"]
    save_file(theta0, str(paths[0]))
    for task in range(n_tasks):
        tuned = {
            k: (v.float() + 0.002 * torch.randn(v.shape, generator=generator)).half()
            for k, v in theta0.items()
        }
        paths.append(folder / f"task{task}.safetensors")
        save_file(tuned, str(paths[-1]))
        del tuned
    return paths


# ----------------------------------------------------------------------------- worker


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _sha(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def worker(
    mode: str, method: str, paths: list[Path], out: Path, threads: int, shard: str
) -> dict[str, object]:
    from safetensors.torch import load_file, save_file

    from lightning_simo.merging import merge
    from lightning_simo.merging.lazy import LazyStateDict, merge_lazily
    from lightning_simo.merging.sharded import write_sharded

    options = METHODS[method]
    torch.set_num_threads(threads)
    baseline = _peak_rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    if mode == "in-memory":
        theta0 = load_file(str(paths[0]))
        finetuned = [load_file(str(p)) for p in paths[1:]]
        merged = merge(theta0, finetuned, method, **options)
        out.mkdir()
        save_file(merged, str(out / "model.safetensors"))
        del theta0, finetuned, merged
    else:
        theta0 = LazyStateDict(paths[0])
        finetuned = [LazyStateDict(p) for p in paths[1:]]
        write_sharded(merge_lazily(theta0, finetuned, method, **options), out, shard)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_rss_bytes()
    result = LazyStateDict(out)
    digest = hashlib.sha256()
    for key in sorted(result):
        digest.update(f"{key}\0{_sha(result[key])}\n".encode())
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss": peak,
        "baseline_rss": baseline,
        "sha": digest.hexdigest(),
    }


def _run_worker(
    mode: str, method: str, paths: list[Path], out: Path, threads: int, shard: str
) -> dict[str, object]:
    command = [sys.executable, __file__, "--threads", str(threads), "--max-shard-size", shard]
    command += ["--worker", mode, method]
    command += [str(out), *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {method} failed:\n{done.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--model", default="vit_large_patch16_224")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dir", default="/tmp", help="where the temporary checkpoints go")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--inputs", help="reuse the checkpoints a --keep run left in this folder")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of each run (both modes)"
    )
    parser.add_argument(
        "--max-shard-size", default="500MB", help="shard size of the lazy run's output"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, method, out, *paths = args.worker
        paths = [Path(p) for p in paths]
        result = worker(mode, method, paths, Path(out), args.threads, args.max_shard_size)
        print(json.dumps(result))
        return

    folder = Path(args.inputs or tempfile.mkdtemp(prefix="merge_scale_", dir=args.dir))
    try:
        started = time.perf_counter()
        if args.inputs:
            paths = [folder / "theta0.safetensors"]
            paths += [folder / f"task{t}.safetensors" for t in range(max(args.tasks))]
        else:
            paths = write_checkpoints(folder, args.model, max(args.tasks))
        params = sum(torch.Size(s).numel() for s in _shapes(args.model).values())
        size = paths[1].stat().st_size / 1e9
        print(
            f"{args.model}: {params / 1e6:.0f} M parameters, fp16 checkpoints of {size:.2f} GB; "
            f"ready in {time.perf_counter() - started:.0f} s in {folder}; {args.threads} "
            f"torch thread(s) per run; lazy output in shards of {args.max_shard_size}"
        )
        header = (
            f"{'method':<16} {'N':>2} | {'peak RSS GB mem':>15} {'lazy':>6} | "
            f"{'wall s mem':>10} {'lazy':>6} {'lazy/mem':>8} | {'cpu s mem':>9} {'lazy':>6} | same"
        )
        print(header)
        print("-" * len(header))
        lazy_peak: dict[tuple[str, int], float] = {}
        failures: list[str] = []
        for method in args.methods:
            for n in args.tasks:
                inputs = paths[: n + 1]
                run = (inputs, folder / "out", args.threads, args.max_shard_size)
                mem = _run_worker("in-memory", method, *run)
                lazy = _run_worker("lazy", method, *run)
                same = mem["sha"] == lazy["sha"]
                ratio = lazy["wall_s"] / mem["wall_s"]
                lazy_peak[method, n] = lazy["peak_rss"] / 1e9
                print(
                    f"{method:<16} {n:>2} | {mem['peak_rss'] / 1e9:>15.2f} "
                    f"{lazy['peak_rss'] / 1e9:>6.2f} | {mem['wall_s']:>10.1f} "
                    f"{lazy['wall_s']:>6.1f} {ratio:>8.2f} | {mem['cpu_s']:>9.1f} "
                    f"{lazy['cpu_s']:>6.1f} | {'yes' if same else 'NO'}",
                    flush=True,
                )
                if not same:
                    failures.append(f"{method} N={n}: lazy output differs from in-memory")
                if ratio > TARGET_WALL_RATIO:
                    failures.append(f"{method} N={n}: wall ratio {ratio:.2f} > {TARGET_WALL_RATIO}")
        low, high = min(args.tasks), max(args.tasks)
        for method in args.methods:
            peak, flat = (
                lazy_peak[method, high],
                lazy_peak[method, high] / lazy_peak[method, low] - 1,
            )
            print(
                f"{method}: lazy peak RSS at N={high} {peak:.2f} GB (target <= {TARGET_PEAK_GB}), "
                f"{100 * flat:+.1f}% vs N={low} (target within {100 * TARGET_FLAT:.0f}%)"
            )
            if peak > TARGET_PEAK_GB or abs(flat) > TARGET_FLAT:
                failures.append(f"{method}: peak RSS target missed")
        print("targets: " + ("all met" if not failures else "; ".join(failures)))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
