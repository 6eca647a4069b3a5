#!/usr/bin/env bash
# The first run on a CUDA machine, most valuable part first, each part's output written as it goes:
#   1. bench/gpu.py: one training step at Qwen2.5-VL-7B's shapes, by phase (time, memory, tokens/s),
#      bench/sdpa_new_lengths.py, and the step again with cuDNN's attention off
#   2. bench/step.py --device cuda --baseline repeat: ours against the repeated-prompt way
#   3. the test suite with CUDA visible (train.py and evaluate.py then pick cuda and bf16)
#
#   bash bench/cuda_first_run.sh OUTDIR
#
# Each part has a time cap so that a hang in one leaves the others their time.
set -o pipefail
out=${1:?usage: bench/cuda_first_run.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)   # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "accelerate", "tokenizers", "huggingface_hub", "av", "decord", "rouge_score", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "not importable:", type(e).__name__, e)
EOF
} 2>&1 | tee "$out/env.txt"

echo "== 1. bench/gpu.py"
timeout ${GPU_BENCH_TIMEOUT:-200} python bench/gpu.py --json "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
echo "bench/gpu.py exit $?"

echo "== 1b. attention at new key lengths, per SDPA backend; the step without cuDNN attention"
timeout 60 python bench/sdpa_new_lengths.py --json "$out/sdpa.json" 2>&1 | tee "$out/sdpa.log"
timeout ${GPU_BENCH_TIMEOUT:-200} python bench/gpu.py --layers 4 --repeat 1 --no-cudnn-sdp \
  --json "$out/gpu_no_cudnn.json" 2>&1 | tee "$out/gpu_no_cudnn.log"

echo "== 2. bench/step.py"
timeout ${STEP_BENCH_TIMEOUT:-60} python bench/step.py --device cuda --baseline repeat --json "$out/step.json" \
  2>&1 | tee "$out/step.log"
echo "bench/step.py exit $?"

echo "== 3. tests"
# pytest-xdist and pytest-timeout are not in requirements.txt: used where installed.
plugins=()
python -c "import xdist" 2>/dev/null && plugins+=(-n 8)
python -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 150)
OMP_NUM_THREADS=2 timeout ${TESTS_TIMEOUT:-210} python -m pytest -v "${plugins[@]}" -p no:cacheprovider \
  --tb=short -rfE tests 2>&1 | tee "$out/pytest.log"
echo "pytest exit $?"
