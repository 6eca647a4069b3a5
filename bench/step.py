"""Time one GRPO-CARE training step by phase, ours (each group's prompt and video through the
model once: one prefill shared by the G samples in generation, and the group packed into one
row for the reference and policy forwards) and, with --baseline repeat, the public code's way
side by side (the prompt repeated G times: G vision passes and G prompt forwards in each of
generation, reference scoring and the policy update).

    python bench/step.py                      # ours only
    python bench/step.py --baseline repeat    # both, and the ratio
    python bench/step.py --device cuda --baseline repeat

The model is scaled down but keeps what decides the ratio: Qwen2.5-VL-7B's visual-token counts
(16 frames at 128 x 28 x 28 pixels: 256 patches = 64 tokens per frame, plus a 256-token image)
and its ratio of vision-tower to language-model-layer parameters (0.10). Phases: generation,
reference scoring (no grad), policy forward + backward + AdamW step; vision encoding is the
time spent inside the vision tower's forward (a hook), part of the phases. Frames through the
vision tower are counted by a hook on the tower (video grid t x temporal patch size). Peak
memory: torch.cuda.max_memory_allocated on GPU, bench/memory.py's allocation tracker on CPU.
Writes bench/step.json.
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

import care  # noqa: E402
import data  # noqa: E402
import encoding  # noqa: E402
import models  # noqa: E402
import reference  # noqa: E402
import rollout  # noqa: E402
import tiny  # noqa: E402
import baselines  # noqa: E402
from memory import LiveBytes  # noqa: E402

# Vision tower 0.137M parameters, language-model layers 1.33M: a ratio of 0.103, as in
# Qwen2.5-VL-7B (0.677B / 6.53B).
MODEL = dict(hidden=192, layers=4, heads=4, vision_hidden=40, vision_depth=2)
# The official visual budget, every frame and image at its maximum.
_B = encoding.VisualBudget()
BUDGET = dict(max_frames=_B.max_frames, min_frames=_B.max_frames, video_min_pixels=_B.video_max_pixels,
              video_max_pixels=_B.video_max_pixels, image_min_pixels=_B.image_max_pixels,
              image_max_pixels=_B.image_max_pixels)


class VisionMeter:
    """Frames through the vision tower and the time spent in its forward, by hooks."""

    def __init__(self, model, temporal):
        self.frames, self.seconds, self._t0, self.temporal = 0, 0.0, None, temporal
        model.model.visual.register_forward_pre_hook(self._start)
        model.model.visual.register_forward_hook(self._stop, with_kwargs=True)

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, module, args, kwargs, out):
        self.seconds += time.perf_counter() - self._t0
        self.frames += int(kwargs["grid_thw"][:, 0].sum()) * self.temporal


def build(workdir, seed=0):
    model_dir = tiny.build_model(os.path.join(workdir, "model"), seed=seed, **MODEL)
    root = tiny.build_seed_bench(os.path.join(workdir, "data"), n_train=4, n_val=1, n_frames=16)
    return model_dir, root


def run(ours, args, model_dir, root):
    """A generator: one training step per next(), then the summary. main() alternates the two
    paths step by step, so a slow spell of the machine falls on both."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    tokenizer = tiny.build_tokenizer()
    policy = models.load_model(model_dir, "sdpa").to(device).train()
    policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ref = reference.make_reference(models.load_model(model_dir, "sdpa")).to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    budget = encoding.budget_from_checkpoint(model_dir, **BUDGET)
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root)
    sample = next(s for s in samples if s.video and s.image)
    prompts = {k: (v.to(device) if torch.is_tensor(v) else v)
               for k, v in encoding.collate_prompts([encoding.encode_prompt(sample, tokenizer, budget)], tokenizer).items()}
    gen = rollout.sampling_config(tokenizer, args.completion)
    gen.min_new_tokens = args.completion  # the same amount of work in both paths
    meters = {m: VisionMeter(m, budget.temporal_patch_size) for m in (policy, ref)}
    g, chunk = args.num_generations, args.chunk
    cuda = device.type == "cuda"
    times = {p: [] for p in ("generation", "reference", "policy", "vision", "step")}
    frames, peaks = [], []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for step in range(args.warmup + args.steps):
        tracker = None if cuda else LiveBytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for m in meters.values():
            m.frames, m.seconds = 0, 0.0
        sync()
        t0 = time.perf_counter()
        with tracker or torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            completions = rollout.generate(policy, prompts, tokenizer, g, gen, seeds=[step],
                                    batch_inputs=None if ours else baselines.repeated_inputs)
            sync()
            t1 = time.perf_counter()
            with torch.no_grad():
                rollout.completion_logprobs(ref, completions, chunk, layout=None if ours else baselines.repeated)
            sync()
            t2 = time.perf_counter()
            logp = rollout.completion_logprobs(policy, completions, chunk, layout=None if ours else baselines.repeated)
            loss, _ = care.policy_loss(logp, torch.linspace(-1, 1, g, device=device), completions.completion_mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
        yield
        if step < args.warmup:
            continue
        times["generation"].append(t1 - t0)
        times["reference"].append(t2 - t1)
        times["policy"].append(t3 - t2)
        times["vision"].append(sum(m.seconds for m in meters.values()))
        times["step"].append(t3 - t0)
        frames.append(sum(m.frames for m in meters.values()))
        peaks.append(torch.cuda.max_memory_allocated() if cuda else tracker.peak)
    prompt_tokens = int(prompts["input_ids"].shape[1])
    # Tokens of the G sequences (prompt + completion each) for both paths: the same work, so
    # tokens/s compares them directly.
    tokens = {"generation": g * args.completion, "reference": g * (prompt_tokens + args.completion),
              "policy": g * (prompt_tokens + args.completion)}
    median = {k: statistics.median(v) for k, v in times.items()}
    yield {
        "path": "ours" if ours else "repeat",
        "seconds": median,  # median over the timed steps
        "tokens_per_second": {k: tokens[k] / median[k] for k in tokens},
        "vision_frames_per_prompt_per_step": frames[-1],
        "video_frames": int(prompts["video_grid_thw"][0, 0]) * budget.temporal_patch_size,
        "peak_memory_mib": max(peaks) / 2**20,
        "prompt_tokens": prompt_tokens,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", choices=["none", "repeat"], default="none")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32, help="tokens per completion (forced)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "step.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, root = build(tmp)
        paths = [run(True, args, model_dir, root)]
        if args.baseline == "repeat":
            paths.append(run(False, args, model_dir, root))
        for _ in range(args.warmup + args.steps):
            for path in paths:
                next(path)
        results = [next(path) for path in paths]
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "num_generations": args.num_generations,
           "completion_tokens": args.completion, "results": results}
    print(f"{out['device']}, G={args.num_generations}, {results[0]['prompt_tokens']}-token prompt "
          f"({results[0]['video_frames']} frames + an image), {args.completion}-token completions\n")
    print("| path | generation s | reference s | policy s | vision s | step s | frames through vision* | peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        s = r["seconds"]
        print(f"| {r['path']} | {s['generation']:.2f} | {s['reference']:.2f} | {s['policy']:.2f} | "
              f"{s['vision']:.2f} | {s['step']:.2f} | {r['vision_frames_per_prompt_per_step']} | "
              f"{r['peak_memory_mib']:.0f} |")
    print("\n* per prompt per step; an image counts as 2 frames (one temporal patch)")
    if len(results) == 2:
        out["step_speedup"] = results[1]["seconds"]["step"] / results[0]["seconds"]["step"]
        out["vision_frames_ratio"] = (results[1]["vision_frames_per_prompt_per_step"]
                                      / results[0]["vision_frames_per_prompt_per_step"])
        print(f"\nstep {out['step_speedup']:.2f}x faster than the repeat baseline; "
              f"{out['vision_frames_ratio']:.0f}x fewer frames through the vision tower")
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
