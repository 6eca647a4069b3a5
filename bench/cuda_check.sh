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
# Each part has a time cap (together 7.7 minutes) so that a hang in one leaves the others their
# time, and each writes its JSON as it measures, so a cap loses only what was not measured yet. Nothing is
# downloaded: the models are random, at 7B's shapes. It needs requirements.txt's packages where it
# runs (transformers 5.23.0, decord, av, rouge-score: carry their wheels to a machine without them).
set -o pipefail
out=${1:?usage: bench/cuda_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)   # absolute: the script runs from the repository root
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

# sdpa only: with flash-attn installed gpu.py would also run every configuration with it, twice the time.
echo "== a. all 28 layers with LoRA r=64, against bench/memory.py (the first step and the second: cuDNN off at decode)"
timeout ${STEP_TIMEOUT:-190} python bench/gpu.py --layers 28 --lora-rank 64 --repeat 2 --attn sdpa \
  --json "$out/gpu_lora28.json" 2>&1 | tee "$out/gpu_lora28.log"
echo "a. exit $?"

echo "== b. decode: eager against compiled, 8 and 32 rows, 256 tokens (4 layers; per layer it scales)"
timeout ${DECODE_TIMEOUT:-160} python bench/gpu.py --layers 4 --repeat 1 --completion 256 --attn sdpa --decode \
  --decode-prompts 1 4 --decode-repeats 2 "${bw[@]}" --json "$out/gpu_decode.json" 2>&1 | tee "$out/gpu_decode.log"
echo "b. exit $?"

echo "== c. the decode attention at new key lengths, per sdpa backend; the 2-process FSDP tests"
timeout 30 python bench/sdpa_new_lengths.py --json "$out/sdpa.json" 2>&1 | tee "$out/sdpa.log"
# The torch build's FSDP2 (the last CUDA run found torch 2.11's layout) through 2-process runs
# against 1: on gloo with CUDA hidden from both, as a 1-GPU machine cannot give 2 processes a GPU
# each, and a 1-process run on the GPU in bf16 is no reference for 2 on the CPU in fp32.
CUDA_VISIBLE_DEVICES= timeout ${TESTS_TIMEOUT:-80} python -m pytest -q -p no:cacheprovider -x tests/test_distributed.py \
  -k "(match_one and qwen2_5_vl) or sharded_pieces or shard_per_process" 2>&1 | tee "$out/pytest_distributed.log"
echo "c. exit $?"
