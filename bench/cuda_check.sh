#!/usr/bin/env bash
# One GPU check, sized for under 8 minutes on one H100/H200, each part's output written as it goes:
#   a. the first full-depth step: all 28 decoder layers of Qwen2.5-VL-7B's shapes with --lora-rank 64
#      (bench/memory.py --plan: it fits on one GPU), per phase time and peak memory against the model
#   b. decode tokens/s, eager against --decode compiled, at 8 and 32 rows (P = 1 and 4, G = 8), each
#      against the bound of reading the bf16 weights once per step at the GPU's memory bandwidth
#   c. the last CUDA run's fixes re-timed: the decode attention without cuDNN (sdpa at new key
#      lengths), and the torch 2.11 FSDP path through the 2-process tests
#
#   bash bench/cuda_check.sh OUTDIR
#
# Each part has a time cap so that a hang in one leaves the others their time. Nothing is
# downloaded: the models are random, at 7B's shapes. It needs requirements.txt's packages where it
# runs (transformers 5.23.0, decord, av, rouge-score: carry their wheels to a machine without them).
set -o pipefail
out=${1:?usage: bench/cuda_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
case "$gpu" in  # memory bandwidth, GB/s (the vendors' figures)
  *H200*) bandwidth=4800 ;;
  *H100*PCIe*) bandwidth=2000 ;;
  *H100*) bandwidth=3350 ;;
  *A100*) bandwidth=2039 ;;
  *) bandwidth=0 ;;
esac
{
  echo "gpu: $gpu, memory bandwidth ${bandwidth} GB/s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/env.txt"
bw=(); [ "$bandwidth" -gt 0 ] && bw=(--bandwidth-gbs "$bandwidth")

echo "== a. all 28 layers with LoRA r=64, against bench/memory.py"
timeout ${STEP_TIMEOUT:-240} python bench/gpu.py --layers 28 --lora-rank 64 --repeat 1 \
  --json "$out/gpu_lora28.json" 2>&1 | tee "$out/gpu_lora28.log"
echo "a. exit $?"

echo "== b. decode: eager against compiled, 8 and 32 rows, 256 tokens (4 layers; per layer it scales)"
timeout ${DECODE_TIMEOUT:-150} python bench/gpu.py --layers 4 --repeat 1 --completion 256 --decode \
  --decode-prompts 1 4 --decode-repeats 2 "${bw[@]}" --json "$out/gpu_decode.json" 2>&1 | tee "$out/gpu_decode.log"
echo "b. exit $?"

echo "== c. the decode attention at new key lengths, per sdpa backend; the 2-process FSDP tests"
timeout 40 python bench/sdpa_new_lengths.py --json "$out/sdpa.json" 2>&1 | tee "$out/sdpa.log"
CUDA_VISIBLE_DEVICES=0 timeout ${TESTS_TIMEOUT:-120} python -m pytest -q -p no:cacheprovider -x \
  tests/test_distributed.py 2>&1 | tee "$out/pytest_distributed.log"
echo "c. exit $?"
