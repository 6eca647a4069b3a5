"""Decode speed: HF generate (dynamic KV cache, eager forward) against static_decode (static KV
cache, torch.compile'd forward), both through rollout.generate with one prefill per group.

    python bench/decode.py                                   # CPU, bench/step.py's model, G=8
    python bench/decode.py --lengths 32 256 768 --json bench/decode.json
    python bench/decode.py --device cuda --json bench/decode_gpu.json

The model and prompt are bench/step.py's (its scaled-down Qwen2.5-VL with 7B's visual-token
counts: a 1,665-token prompt of 16 frames and an image), G completions forced to exactly each
length (min_new_tokens), sampled at the training settings. For each length the two paths
alternate call by call, so a slow spell of the machine falls on both. The static path's first
call at a length includes torch.compile: its seconds minus the median of the later calls is
reported as compile_seconds and left out of tokens/s. tokens/s = G x length / median seconds
of a whole rollout.generate call (prefill included, the same in both). same_tokens: whether both
paths sampled identical tokens from the same seed in every timed call. Writes --json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import data  # noqa: E402
import encoding  # noqa: E402
import models  # noqa: E402
import rollout  # noqa: E402
import static_decode  # noqa: E402
import step  # noqa: E402
import tiny  # noqa: E402


def measure(model, prompts, tokenizer, g, length, repeats, device):
    """Seconds of each call, per path, alternating; and whether their tokens agreed."""
    gen = rollout.sampling_config(tokenizer, length)
    gen.min_new_tokens = length
    cuda = device.type == "cuda"
    seconds = {"hf": [], "static": []}
    same = True
    for i in range(repeats + 1):  # call 0: the static path compiles
        ids = {}
        for path in ("hf", "static"):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                run = rollout.generate if path == "hf" else static_decode.generate
                out = run(model, prompts, tokenizer, g, gen, seeds=[i])
            if cuda:
                torch.cuda.synchronize()
            seconds[path].append(time.perf_counter() - t0)
            ids[path] = out.completion_ids
        same &= torch.equal(ids["hf"], ids["static"])
    median = {p: statistics.median(s[1:]) for p, s in seconds.items()}
    return {"length": length, "seconds": seconds, "median_seconds": median,
            "tokens_per_second": {p: g * length / median[p] for p in median},
            "static_speedup": median["hf"] / median["static"],
            "compile_seconds": seconds["static"][0] - median["static"],
            "same_tokens": bool(same)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 768])
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and length, after the first")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and prompt (the test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "decode.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tokenizer = tiny.build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model_dir = tiny.build_model(os.path.join(tmp, "model"))
            root = tiny.build_seed_bench(os.path.join(tmp, "data"), n_train=4, n_val=1)
            budget = encoding.budget_from_checkpoint(model_dir, max_frames=4, video_max_pixels=56 * 56,
                                                     image_max_pixels=56 * 56, video_min_pixels=28 * 28,
                                                     image_min_pixels=28 * 28)
        else:
            model_dir, root = step.build(tmp)
            budget = encoding.budget_from_checkpoint(model_dir, **step.BUDGET)
        model = models.load_model(model_dir, "sdpa").to(device).eval()
        samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root)
        sample = next(s for s in samples if s.video and s.image)
        prompts = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in encoding.collate_prompts(
            [encoding.encode_prompt(sample, tokenizer, budget)], tokenizer).items()}
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "num_generations": args.num_generations, "prompt_tokens": int(prompts["input_ids"].shape[1]),
           "results": []}
    for length in args.lengths:
        r = measure(model, prompts, tokenizer, args.num_generations, length, args.repeats, device)
        out["results"].append(r)
        print(f"{length} tokens: hf {r['tokens_per_second']['hf']:.0f} tok/s, static "
              f"{r['tokens_per_second']['static']:.0f} tok/s ({r['static_speedup']:.2f}x), compile "
              f"{r['compile_seconds']:.1f} s, same tokens: {r['same_tokens']}", flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
