#!/usr/bin/env bash
# End-to-end demo on a CPU in a few minutes: a tiny random Qwen2.5-VL, a synthetic
# SEED-Bench-R1-layout dataset with real mp4 videos and images, a few GRPO-CARE and GRPO steps
# with torchrun (2 processes, FSDP), checkpoints, data-parallel evaluation on the L1/L2/L3 files
# (accuracy and consistency), a side-by-side comparison of the two runs, a few SFT steps and the
# attention analysis.
set -euo pipefail
cd "$(dirname "$0")"
pip install -q torch==2.13.0
pip install -q -r requirements.txt
OUT=${OUT:-out/demo}
rm -rf "$OUT"
python tiny.py seed-bench "$OUT/seed-bench" --train 16 --val 8
# A random tiny model, taught the <think>/<answer> format (not the answers) in a few SFT steps.
python tiny.py model "$OUT/tiny-model" --warm-up "$OUT/seed-bench"
# GRPO-CARE and the plain GRPO baseline, same data, seeds and budget, on 2 processes each.
for ALGO in care grpo; do
  torchrun --nproc_per_node 2 train.py --algo $ALGO \
      --model "$OUT/tiny-model" --data "$OUT/seed-bench/annotations/training_6k.jsonl" \
      --data-root "$OUT/seed-bench" --output-dir "$OUT/$ALGO" \
      --num-generations 4 --max-completion-length 24 --max-steps 4 --save-every 2 --ema-every 2 --prompts-per-device 2 \
      --lr 1e-4 --max-frames 4 --video-max-pixels 3136 --image-max-pixels 3136
  # Accuracy per level and L3 domain, and the consistency rate judged by the model itself.
  torchrun --nproc_per_node 2 evaluate.py --model "$OUT/$ALGO/checkpoint-000004/policy" --data-root "$OUT/seed-bench" \
      --data "$OUT"/seed-bench/annotations/validation_L{1,2,3}.jsonl --output-dir "$OUT/$ALGO/eval" \
      --max-new-tokens 24 --judge-max-new-tokens 24 --max-frames 4 --video-max-pixels 3136 --image-max-pixels 3136
done
python evaluate.py compare "$OUT/grpo/eval/summary.json" "$OUT/care/eval/summary.json"
# SEED-Bench-R1's supervised baseline: a few sft.py steps on the chain-of-thought file, then
# where each model's generated tokens attend (video and image tokens against text).
torchrun --nproc_per_node 2 sft.py --model "$OUT/tiny-model" --data "$OUT/seed-bench/annotations/training_with_cot_6k.jsonl" \
    --data-root "$OUT/seed-bench" --output-dir "$OUT/sft" --max-steps 2 --gradient-accumulation-steps 2 --lr 1e-4 \
    --max-frames 4 --video-max-pixels 3136 --image-max-pixels 3136
python analyze.py attention --models "$OUT/tiny-model" "$OUT/sft/checkpoint-000002/policy" "$OUT/care/checkpoint-000004/policy" \
    --labels base sft care --data "$OUT/seed-bench/annotations/validation_L1.jsonl" --data-root "$OUT/seed-bench" \
    --limit 4 --max-new-tokens 24 --max-frames 4 --video-max-pixels 3136 --image-max-pixels 3136 --output-dir "$OUT/attention"
