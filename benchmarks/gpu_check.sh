#!/usr/bin/env bash
# GPU check: the CUDA path of the memory layer and the updater against the CPU reference, then the GPU
# figures of benchmarks/gpu_bench.py (each against a baseline in the same run).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default benchmarks/results/gpu)
#
# Needs a CUDA build of torch: PYTHON (default .venv/bin/python) must see the GPU. On the lent device
# machines, whose python3 holds torch with CUDA, run it as
#   PYTHON=python3 PYTHONPATH=$PWD:/tmp/site bash benchmarks/gpu_check.sh "$OUT"
# after installing wheels of transformers 5.24, platformdirs and regex (transformers 5.24 needs a newer
# regex than that image has) to /tmp/site (../.library/device/README.md).
# Steps:
#   1. device report (torch, CUDA, GPU name, memory);
#   2. pytest -m gpu tests/memlm/test_gpu.py tests/memlm/test_fused.py: memory read on CUDA == CPU
#      reference (plain and row overlay, whole-model logits); a sparse update on CUDA moves only the
#      selected rows, every other tensor bit-identical, and its delta reverts exactly; the Triton memory
#      read (memlm.fused, MEMFIT_MEMORY_KERNEL=triton) == the embedding-bag reference in fp32 and bf16;
#   3. benchmarks/gpu_bench.py: sparse update vs full finetuning on CUDA and vs the CPU, the fused read
#      vs embedding_bag, whole-model decode steps with either read (default preset shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-benchmarks/results/gpu}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-.venv/bin/python}"
exec > >(tee "$OUTDIR/gpu_check.txt") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), load $(cut -d' ' -f1-3 /proc/loadavg)"
fail=0

echo "== 1. device"
"$PY" - <<'PY' || fail=1
import torch, transformers
print("torch", torch.__version__, "cuda build", torch.version.cuda, "available", torch.cuda.is_available(),
      "transformers", transformers.__version__)
assert torch.cuda.is_available(), "no CUDA device: this script needs one"
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}")
PY

echo "== 2. CUDA path vs CPU reference (pytest -m gpu)"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/memlm/test_gpu.py tests/memlm/test_fused.py -rs || fail=1

echo "== 3. benchmarks/gpu_bench.py"
timeout 300 "$PY" benchmarks/gpu_bench.py --out "$OUTDIR/gpu_bench.json" || fail=1

echo "== done: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
