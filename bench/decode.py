"""Rollout speed: P prompts x G completions decoded one group at a time (P generate calls of G
rows over transformers' growing cache, the way rollout.generate worked before) against all P x
G rows in one decode (rollout.generate), over a static KV cache, the growing one, or the static
one with the language model's decode step through torch.compile (--decode static, dynamic,
compiled). All through rollout.generate, one prefill per group, the same seeds: a prompt's
completions are the same every way (same_tokens; rows_identical, the share of rows that are,
since a last-bit difference of the logits between batch shapes can meet a near tie).

    python bench/decode.py                                  # CPU: P=4, G=8, 32 and 256 tokens
    python bench/decode.py --paths static compiled --prompts 1 4 --lengths 256 --device cuda

The model and prompts are bench/step.py's (its scaled-down Qwen2.5-VL with 7B's visual-token
counts: 16 frames and an image a prompt), completions forced to exactly each length
(min_new_tokens), sampled at the training settings. For each setting the paths alternate call
by call, so a slow spell of the machine falls on all of them. The compiled path's first call
compiles: its seconds minus the median of the later calls are compile_seconds, left out of
tokens/s = P x G x length / the median seconds of a whole rollout (prefill included, the same in
every path); decode tokens/s leaves the prefill out (a one-token rollout of the same prompts,
timed apart). With --weights-gb and --bandwidth-gbs (bench/gpu.py --decode sets them for the 7B
shapes) each decode rate is also set against the bound of reading the weights once per decode
step: rows / (weights / bandwidth). Writes --json when given.
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
import step  # noqa: E402
import tiny  # noqa: E402

# per-group: one generate per prompt (G rows each) over a dynamic cache, as rollout.generate worked
# before; the others decode all P x G rows together, with the --decode of that name.
PATHS = ("per-group", "static", "dynamic", "compiled")


def run_path(path, model, prompts, tokenizer, g, gen, seeds):
    """One rollout of the P prompts by `path`: [P*G, T] completion ids."""
    if path == "per-group":
        ids = [rollout.generate(model, encoding.select_prompt(prompts, i), tokenizer, g, gen, [seed],
                                decode="dynamic").completion_ids for i, seed in enumerate(seeds)]
        return torch.nn.utils.rnn.pad_sequence([r for x in ids for r in x], batch_first=True,
                                               padding_value=gen.pad_token_id)
    return rollout.generate(model, prompts, tokenizer, g, gen, seeds, decode=path).completion_ids


def timed_path(path, model, prompts, tokenizer, g, gen, seeds, cuda):
    """run_path under bf16 autocast on CUDA, synchronised: (seconds, completion ids)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        ids = run_path(path, model, prompts, tokenizer, g, gen, seeds)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, ids


def measure(model, prompts, tokenizer, g, length, repeats, device, paths=PATHS, weights_gb=None, bandwidth_gbs=None):
    """Seconds of each call per path, alternating, and whether every path sampled the same."""
    p = prompts["input_ids"].shape[0]
    gen = rollout.sampling_config(tokenizer, length)
    gen.min_new_tokens = length
    cuda = device.type == "cuda"
    seconds = {path: [] for path in paths}
    same, agree = True, []
    for i in range(repeats + 1):  # call 0: the compiled path compiles
        ids = {}
        for path in paths:
            t, ids[path] = timed_path(path, model, prompts, tokenizer, g, gen, [1000 * i + k for k in range(p)], cuda)
            seconds[path].append(t)
        same &= all(torch.equal(ids[paths[0]], ids[q]) for q in paths[1:])
        agree += [float((ids[paths[0]] == ids[q]).all(1).float().mean()) for q in paths[1:]]
    median = {q: statistics.median(s[1:]) for q, s in seconds.items()}
    rate = {q: p * g * length / median[q] for q in median}
    # The prefill alone (a rollout of one token, the fastest of two calls), so that the decode's
    # own rate can be set against the bandwidth bound: rows x (length - 1) / (rollout - prefill).
    one = rollout.sampling_config(tokenizer, 1)
    one.min_new_tokens = 1
    prefill = {path: min(timed_path(path, model, prompts, tokenizer, g, one, list(range(p)), cuda)[0] for _ in range(2))
               for path in paths}
    # None where the rollout was no slower than its prefill (a few tokens on a noisy machine)
    decode_rate = {q: p * g * (length - 1) / (median[q] - prefill[q]) if median[q] > prefill[q] else None
                   for q in median}
    # same_tokens: every row of every call identical every way; rows_identical: the share of rows
    # that were (a row can differ where a last-bit difference of the logits meets a near tie)
    out = {"prompts": p, "num_generations": g, "rows": p * g, "length": length, "seconds": seconds,
           "median_seconds": median, "tokens_per_second": rate, "prefill_seconds": prefill,
           "decode_tokens_per_second": decode_rate, "same_tokens": bool(same),
           "rows_identical": sum(agree) / max(1, len(agree))}
    if "per-group" in paths:
        out["speedup_over_per_group"] = {q: median["per-group"] / median[q] for q in paths if q != "per-group"}
    if "compiled" in paths:
        out["compile_seconds"] = seconds["compiled"][0] - median["compiled"]
    if weights_gb and bandwidth_gbs:  # the decode rate if each step only read the weights once
        bound = p * g * bandwidth_gbs / weights_gb
        out["weight_bandwidth_bound_tokens_per_second"] = bound
        out["fraction_of_bound"] = {q: None if r is None else r / bound for q, r in decode_rate.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[4], help="P: prompts decoded together")
    parser.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256], help="completion tokens")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["per-group", "static", "dynamic"],
                        help="per-group (one generate per prompt, dynamic cache), or all rows together with "
                             "--decode static, dynamic or compiled")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path and setting, after the first")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and prompts (the test)")
    parser.add_argument("--weights-gb", type=float, default=None, help="bytes the decode step reads (the weights)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="the device's memory bandwidth, GB/s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here (bench/decode.json is the committed "
                                                    "CPU run)")
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
        # Prompts of different lengths (image-only ones among them where the data has some).
        encoded = [encoding.encode_prompt(s, tokenizer, budget) for s in samples[:max(args.prompts)]]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "paths": args.paths, "results": []}
    for p in args.prompts:
        prompts = {k: (v.to(device) if torch.is_tensor(v) else v)
                   for k, v in encoding.collate_prompts(encoded[:p], tokenizer).items()}
        for length in args.lengths:
            r = measure(model, prompts, tokenizer, args.num_generations, length, args.repeats, device, args.paths,
                        args.weights_gb, args.bandwidth_gbs)
            r["prompt_tokens"] = [int(e["input_ids"].shape[0]) for e in encoded[:p]]
            out["results"].append(r)
            rates = ", ".join(f"{q} {r['tokens_per_second'][q]:,.0f} tok/s" for q in args.paths)
            print(f"P={p} G={args.num_generations} {length} tokens: {rates}; same tokens: {r['same_tokens']} "
                  f"(rows identical {r['rows_identical']:.1%})", flush=True)
            if args.json:  # after each setting: a later failure keeps the earlier ones
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
