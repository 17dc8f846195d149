#!/usr/bin/env bash
# GPU check: the CUDA path of the memory layer, one sparse update on CUDA, and `memfit bench serve --quick`.
#
# NOT RUN YET: written in a session without a GPU (no CUDA device was lent to it). No figures in this
# repository come from it; run it on a CUDA machine and commit its output file.
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]        (default benchmarks/results/gpu/gpu_check.txt)
#
# Needs: the repository's .venv with a CUDA build of torch (the CPU wheel reports cuda=False and every
# step below then says so and fails), a few minutes. Steps:
#   1. device report (torch, CUDA, GPU name, memory);
#   2. pytest -m gpu tests/memlm/test_gpu.py: memory read on CUDA == CPU reference (plain and row
#      overlay, whole-model logits); a sparse update on CUDA moves only the selected rows, every other
#      tensor bit-identical, and its delta reverts exactly; the Triton memory read (memlm.fused,
#      MEMFIT_MEMORY_KERNEL=triton) == the embedding-bag reference in fp32 and bf16;
#   3. one sparse update of the default model on CUDA (tiny test model when the default is not built):
#      seconds, rows changed, frozen tensors unchanged;
#   4. memfit bench serve --quick (engine vs generate() vs the dense-matched model; bench serve runs
#      them on the host's CPU today, so these are that host's CPU figures, not GPU serving figures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu/gpu_check.txt}"
mkdir -p "$(dirname "$OUT")"
PY="${PYTHON:-.venv/bin/python}"
exec > >(tee "$OUT") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), load $(cut -d' ' -f1-3 /proc/loadavg)"
fail=0

echo "== 1. device"
"$PY" - <<'PY' || fail=1
import torch
print("torch", torch.__version__, "cuda build", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no CUDA device: this script needs one"
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}")
PY

echo "== 2. CUDA path vs CPU reference (pytest -m gpu)"
timeout 600 "$PY" -m pytest -q -m gpu tests/memlm/test_gpu.py tests/memlm/test_fused.py -rs || fail=1

echo "== 3. one sparse update on CUDA"
timeout 600 "$PY" - <<'PY' || fail=1
import glob, time, torch
from pathlib import Path
from memlm.paths import default_model_dir
from memlm.updater import UpdateSettings, sparse_update
from service.engine import load_model
d = default_model_dir("default")
if not (d / "model.safetensors").exists():
    d = Path(sorted(glob.glob(".pytest_cache/memfit-tiny/*/model.safetensors"))[0]).parent
model, tok = load_model(d, "cuda")
from memlm.background import BackgroundStats  # noqa: E402
bg = BackgroundStats.load(d)
before = {k: v.clone() for k, v in model.state_dict().items()}
text = "The capital of Zorblandia is Quenfirth. Question: What is the capital of Zorblandia?\nAnswer: Quenfirth"
ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
torch.cuda.synchronize(); t0 = time.perf_counter()
delta = sparse_update(model, [batch], bg, UpdateSettings(steps=30, early_stop=False))
torch.cuda.synchronize(); dt = time.perf_counter() - t0
tables = {f"model.layers.{i}.memory.values.weight" for i in model.config.memory_layers}
after = model.state_dict()
frozen_ok = all(torch.equal(after[k], v) for k, v in before.items() if k not in tables)
rows = {i: int((after[f"model.layers.{i}.memory.values.weight"] != before[f"model.layers.{i}.memory.values.weight"]).any(-1).sum()) for i in model.config.memory_layers}
print(f"model {d}: 30-step update {dt:.3f} s on {torch.cuda.get_device_name(0)}; rows changed {rows}; frozen tensors bit-identical: {frozen_ok}")
assert frozen_ok
PY

echo "== 4. memfit bench serve --quick"
timeout 900 "$PY" -m memfit.cli bench serve --quick --out benchmarks/results/gpu/serve || fail=1

echo "== done: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
