"""Evaluate a checkpoint on SEED-Bench-R1 validation files (or Video-R1-style eval files).

Near-greedy decoding (SPEC section 4), one answer per question, scored from the last <answer>
tag. Writes predictions.jsonl (one row per sample) and summary.json to --output-dir and
prints accuracy per level and per L3 domain.

    python evaluate.py --model runs/care/checkpoint-001500/policy --data-root SEED-Bench-R1 \
        --data SEED-Bench-R1/annotations/validation_L{1,2,3}.jsonl --output-dir runs/care/eval
"""

import argparse
import json
import os
from collections import defaultdict

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import data
import rewards
import rollout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="policy directory (HF format)")
    p.add_argument("--data", nargs="+", required=True, help="annotation files (JSONL or JSON)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=0.001)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--min-frames", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=16, help="16 for SEED-Bench-R1, 32 for general video benchmarks")
    p.add_argument("--video-max-pixels", type=int, default=128 * 28 * 28)
    p.add_argument("--image-max-pixels", type=int, default=256 * 28 * 28)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples of each file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-samples", action="store_true")
    return p.parse_args(argv)


def judge(sample, completion):
    """Score one completion. Like the paper's evaluation code, a completion with no <answer> tag
    is compared as a whole (so a bare "B" still counts); format validity is reported apart."""
    answer = rewards.extract_answer(completion)
    scored = completion if answer is not None else f"<answer>{completion.strip()}</answer>"
    return {
        "answer": answer,
        "correct": rewards.accuracy_reward(scored, sample.solution, sample.problem_type),
        "format_ok": bool(rewards.format_reward(completion)),
    }


def summarize(rows):
    """Accuracy and format rate overall, per level, and per (level, domain)."""
    groups = defaultdict(list)
    for r in rows:
        groups["all"].append(r)
        groups[r["level"] or "-"].append(r)
        if r["domain"]:
            groups[f"{r['level'] or '-'}/{r['domain']}"].append(r)
    return {name: {"n": len(rs), "accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs),
                   "format": 100.0 * sum(r["format_ok"] for r in rs) / len(rs)}
            for name, rs in sorted(groups.items())}


def format_table(summary):
    lines = ["| split | n | accuracy (%) | format (%) |", "| --- | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.1f} | {s['format']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    budget = data.budget_from_checkpoint(args.model, fps=args.fps, min_frames=args.min_frames,
                                         max_frames=args.max_frames, video_max_pixels=args.video_max_pixels,
                                         image_max_pixels=args.image_max_pixels)
    gen_config = rollout.sampling_config(tokenizer, args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, top_k=0, repetition_penalty=1.0)

    samples, skipped = [], []
    for path in args.data:
        file_samples, file_skips = data.load_samples(path, args.data_root, seed=args.seed,
                                                     skip_bad=args.skip_bad_samples)
        samples += file_samples[: args.limit] if args.limit else file_samples
        skipped += file_skips

    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as out:
        for start in tqdm(range(0, len(samples), args.batch_size), desc="eval"):
            batch, encoded = [], []
            for s in samples[start:start + args.batch_size]:
                try:
                    encoded.append(data.encode_prompt(s, tokenizer, budget))
                    batch.append(s)
                except data.DataError as e:
                    if not args.skip_bad_samples:
                        raise
                    skipped.append(str(e))
            if not encoded:
                continue
            prompts = {k: (v.to(device) if torch.is_tensor(v) else v)
                       for k, v in data.collate_prompts(encoded, tokenizer).items()}
            roll = rollout.generate(model, prompts, tokenizer, 1, gen_config)
            for s, text in zip(batch, roll.texts):
                row = {"sample_id": s.sample_id, "level": s.level, "domain": s.domain,
                       "problem_type": s.problem_type, "solution": s.solution, "completion": text,
                       **judge(s, text)}
                rows.append(row)
                out.write(json.dumps(row) + "\n")

    summary = summarize(rows)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"model": args.model, "data": args.data, "skipped": len(skipped),
                   "skipped_messages": skipped, "results": summary}, f, indent=2)
    print(format_table(summary))
    if skipped:
        print(f"{len(skipped)} samples skipped (--skip-bad-samples); see summary.json")
    return summary


if __name__ == "__main__":
    main()
