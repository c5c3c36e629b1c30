#!/usr/bin/env bash
# One short check of a GPU machine (under 5 minutes on one node): CUDA and bf16, the suite's
# stages under DDP and FSDP on every visible GPU (benchmarks/strategy_check.py), training
# throughput of the suite vs a plain PyTorch loop (benchmarks/train_throughput.py), and lazy
# merging with the arithmetic on the GPU. Without CUDA the CPU-safe parts run (tiny throughput,
# lazy merge on the CPU) and the rest prints a SKIP line; the script exits 0 either way unless
# something that ran failed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, package installed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1

read -r GPUS BF16 < <($PY - <<'EOF'
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, int(n > 0 and torch.cuda.is_bf16_supported()))
EOF
)
echo "[gpu_check] torch $($PY -c 'import torch; print(torch.__version__)'), CUDA devices: $GPUS, bf16: $BF16"

echo "[gpu_check] lazy merge (device: $([ "$GPUS" -gt 0 ] && echo cuda || echo cpu))"
$PY - "$GPUS" <<'EOF'
import sys, tempfile
from pathlib import Path
import torch
from safetensors.torch import save_file
from lightning_simo.merging import merge
from lightning_simo.merging.lazy import LazyStateDict, merge_lazily

device = "cuda" if int(sys.argv[1]) > 0 else "cpu"
folder = Path(tempfile.mkdtemp())
g = torch.Generator().manual_seed(0)
theta0 = {f"w{i}": torch.randn(512, 1024, generator=g).half() for i in range(8)}
paths = []
for t in range(3):
    tuned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).half() for k, v in theta0.items()}
    paths.append(folder / f"t{t}.safetensors")
    save_file(tuned, str(paths[-1]))
save_file(theta0, str(folder / "theta0.safetensors"))
lazy = [LazyStateDict(p) for p in paths]
for method in ("task_arithmetic", "ties"):
    expected = merge(theta0, [dict(s) for s in lazy], method)
    got = dict(merge_lazily(LazyStateDict(folder / "theta0.safetensors"), lazy, method, device=device))
    worst = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    assert all(v.device.type == "cpu" for v in got.values())
    assert worst <= 1e-3, (method, worst)
    print(f"[gpu_check]   {method} on {device}: max |lazy - cpu| = {worst:.2e}")
EOF

if [ "$GPUS" -eq 0 ]; then
  echo "[gpu_check] throughput, tiny model on the CPU (the suite vs a plain loop)"
  $PY benchmarks/train_throughput.py --size tiny --device cpu --repeat 1
  echo "[gpu_check] SKIP: no CUDA device: bf16, DDP and FSDP stages and GPU throughput not run"
  exit 0
fi

echo "[gpu_check] DDP and FSDP stages on $GPUS GPU(s)"
$PY benchmarks/strategy_check.py --devices "$GPUS"
echo "[gpu_check] throughput, paper step on one GPU (the suite vs a plain loop)"
$PY benchmarks/train_throughput.py --size paper --device cuda --repeat 1
echo "[gpu_check] all checks passed"
