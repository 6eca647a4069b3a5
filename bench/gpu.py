"""One GRPO-CARE training step at Qwen2.5-VL-7B's shapes on one GPU, timed and measured by phase.

    python bench/gpu.py                          # 7B shapes, 4 and 8 decoder layers (2 and 4 under 100 GiB)
    python bench/gpu.py --layers 4 --json out.json
    python bench/gpu.py --tiny                   # a tiny model on CPU: the test keeps this file working
    python bench/gpu.py --layers 28 --lora-rank 64   # all 28 layers: LoRA fits on one GPU
    python bench/gpu.py --layers 4 --decode --decode-prompts 1 4   # and --decode static against
                                                                   # compiled, at 8 and 32 rows

The model is a randomly initialised Qwen2_5_VLForConditionalGeneration with Qwen2.5-VL-7B-Instruct's
shapes (bench/memory.py's QWEN25_VL_7B: hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064,
the 32-block vision tower) but only --layers decoder layers: the full 28 with fp32 weights, AdamW
state and an fp32 reference need 188 GiB (bench/memory.py --plan), more than one GPU. Two layer counts give each phase's
cost per decoder layer, and so the 28-layer figure. Nothing is downloaded.

The step is train.py's with one process, through the same public functions: a synthetic
SEED-Bench-R1 sample (tiny.build_seed_bench: a 16-frame video and an image) encoded at the
official visual budget (16 frames at 128 x 28 x 28 pixels, the image at 256 x 28 x 28), G=8
completions of exactly --completion tokens (min_new_tokens: a random model would stop at random
places), fp32 master weights with bf16 compute under torch.autocast (what accelerate's
mixed_precision="bf16" does with one process), activation checkpointing, then:

  rollout     rollout.generate (one prefill shared by the G samples)
  reference   reference.answer_logprob on an fp32 reference (reference.make_reference)
  policy      rollout.completion_logprobs with grad, care.policy_loss, backward
  optimizer   gradient clipping and an AdamW step (train.build_optimizer's two groups)
  ema         reference.ema_update

A short warm-up step first creates AdamW's state (as in a run's later steps); the measured step
then runs --repeat times with the same seed. The first of these meets each of the rollout's
sequence lengths for the first time (its seconds are kept as first_step_seconds: a kernel set
up per shape shows there), the last is the one reported. Each phase: seconds (torch.cuda.synchronize on both sides), peak allocated memory
(torch.cuda.max_memory_allocated, the peak reset before the phase), and for the rollout the
decode rate, from a second generate of one token (prefill only) subtracted from the full one.
Each phase's peak is set against bench/memory.py's estimate for the same shapes on one GPU
(no CUDA context: max_memory_allocated does not see it). --lora-rank R trains rank-R adapters
on the frozen fp32 base as train.py --lora-rank does (lora.py: CARE's reference an fp32 EMA of
the adapters over the same base, no second copy), which lets all 28 layers fit on one GPU.
With --decode, the same policy then decodes --completion tokens for each --decode-prompts P
(P x G rows) both ways, --decode static and compiled, alternating (bench/decode.measure; the
compiled path's first call, which compiles, kept apart as compile_seconds), each rate set
against reading the bf16 language-model weights once per step at --bandwidth-gbs. Writes --json.
"""

import argparse
import copy
import gc
import importlib.util
import json
import os
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
import memory  # noqa: E402
import reference  # noqa: E402
import rollout  # noqa: E402
import tiny  # noqa: E402

GiB = 2 ** 30
# The official visual budget, forced: the synthetic clips are small, so the minimum is the maximum.
_B = encoding.VisualBudget()
OFFICIAL_BUDGET = dict(max_frames=_B.max_frames, min_frames=_B.max_frames, video_min_pixels=_B.video_max_pixels,
                       video_max_pixels=_B.video_max_pixels, image_min_pixels=_B.image_max_pixels,
                       image_max_pixels=_B.image_max_pixels)
TINY_MODEL = dict(hidden=64, heads=4, vision_hidden=32, vision_depth=2)
PHASES = ("rollout", "reference", "policy", "optimizer", "ema")


def model_config(tokenizer, layers, tiny_model, attn):
    """Qwen2.5-VL-7B's config with `layers` decoder layers (or a tiny one), wired to the tiny
    tokenizer's special-token ids (all below the vocabulary size)."""
    from transformers import Qwen2_5_VLConfig
    ref = tiny.tiny_config(tokenizer, layers=layers, **TINY_MODEL)  # the token ids
    if tiny_model:
        config = ref
    else:
        spec = copy.deepcopy(memory.QWEN25_VL_7B)
        spec["text_config"].update(num_hidden_layers=layers, rms_norm_eps=1e-6,
                                   **{k: getattr(ref.text_config, k) for k in ("bos_token_id", "eos_token_id",
                                                                               "pad_token_id")})
        config = Qwen2_5_VLConfig(**spec, **{k: getattr(ref, k) for k in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    return config


def optimizer_for(model, lr=1e-6, weight_decay=0.01):
    """train.build_optimizer's AdamW: weight decay on matrices, not on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


class Meter:
    """Seconds and peak allocated bytes of each phase."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.rows = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, name, fn):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        row = {"seconds": time.perf_counter() - t0}
        if self.cuda:
            row.update(start_gib=start / GiB, peak_gib=torch.cuda.max_memory_allocated() / GiB,
                       end_gib=torch.cuda.memory_allocated() / GiB,
                       reserved_gib=torch.cuda.max_memory_reserved() / GiB)
        self.rows[name] = row
        return out


def prompt_batch(tokenizer, workdir, device, n=1):
    """n synthetic SEED-Bench-R1 prompts with a video and an image at the official budget."""
    root = tiny.build_seed_bench(os.path.join(workdir, "data"), n_train=4 * n, n_val=1, n_frames=16)
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root)
    chosen = [s for s in samples if s.video and s.image][:n]
    budget = encoding.VisualBudget(**OFFICIAL_BUDGET)
    batch = encoding.collate_prompts([encoding.encode_prompt(s, tokenizer, budget) for s in chosen], tokenizer)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def lora_settings(rank):
    """train.py's LoRA settings at their defaults, with rank: what lora.add_adapters reads."""
    import config
    cfg = config.parse_config(["--lora-rank", str(rank), "--algo", "care"])
    return cfg


def one_config(args, tokenizer, prompts, layers, attn, device, decode_prompts=None, save=lambda result: None):
    """Build the policy and reference, run a warm-up step, then the measured step. save(result)
    is called with what is measured so far: after the step, and after each decode setting."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    config = model_config(tokenizer, layers, args.tiny, attn)
    with torch.device(device):
        policy = Qwen2_5_VLForConditionalGeneration(config)  # fp32 master weights
    if args.lora_rank:  # adapters on the frozen base; the reference their EMA over the same base
        import lora
        cfg = lora_settings(args.lora_rank)
        policy = lora.add_adapters(policy, cfg)
        ref = lora.make_reference(cfg, policy)
    else:
        ref = reference.make_reference(copy.deepcopy(policy))
    # train.load_policy: checkpointed layers, no cache in training forwards, train mode.
    policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    policy.train()
    optimizer = optimizer_for(policy)
    params = sum(p.numel() for p in policy.parameters())
    g = args.num_generations
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step(meter, completion, seed):
        gen = rollout.sampling_config(tokenizer, completion)
        gen.min_new_tokens = completion  # exactly `completion` tokens in every sample
        with autocast():
            completions = meter.run("rollout", lambda: rollout.generate(policy, prompts, tokenizer, g, gen, seeds=[seed]))
        with autocast():
            logp_ans, has_span = meter.run(
                "reference", lambda: reference.answer_logprob(ref, completions, tokenizer, args.chunk))
        # Rewards: random accuracy and format (a random model answers nothing), CARE's bonus.
        rng = torch.Generator().manual_seed(seed)
        acc = torch.rand(1, g, generator=rng)
        fmt = (torch.rand(1, g, generator=rng) > 0.5).float()
        parts = care.care_rewards(acc, fmt, logp_ans.float().cpu().view(1, g), has_span.cpu().view(1, g))
        adv = care.group_advantages(parts["reward"]).reshape(-1).to(device)

        def policy_phase():
            with autocast():
                logp = rollout.completion_logprobs(policy, completions, args.chunk)
            loss, _ = care.policy_loss(logp, adv, completions.completion_mask)
            loss.backward()
            return loss.detach()

        def optimizer_phase():
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return norm

        loss = meter.run("policy", policy_phase)
        norm = meter.run("optimizer", optimizer_phase)
        meter.run("ema", lambda: reference.ema_update(ref, policy, 0.995))
        return completions, float(loss), float(norm)

    warm = Meter(device)
    step(warm, args.warmup_completion, seed=1)
    # Prefill alone: the same generate for one new token.
    prefill = Meter(device)
    one = rollout.sampling_config(tokenizer, 1)
    one.min_new_tokens = 1
    with autocast():
        prefill.run("rollout", lambda: rollout.generate(policy, prompts, tokenizer, g, one, seeds=[2]))
    # The measured step, --repeat times with the same seed (the same tokens, so the same shapes):
    # the first full-length step meets every sequence length of the rollout for the first time,
    # the last one shows the steady state.
    first = None
    for _ in range(args.repeat):
        meter = Meter(device)
        completions, loss, norm = step(meter, args.completion, seed=0)
        first = first or meter
    t = int(completions.completion_ids.shape[1])
    gen_s, prefill_s = meter.rows["rollout"]["seconds"], prefill.rows["rollout"]["seconds"]
    meter.rows["rollout"].update(
        prefill_seconds=prefill_s, tokens_per_second=g * t / gen_s,
        decode_tokens_per_second=g * (t - 1) / max(gen_s - prefill_s, 1e-9))
    patches = sum(int(prompts[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in prompts)
    prompt_tokens = int(prompts["input_ids"].shape[1])
    scored = prompt_tokens + g * t  # the packed row: the prompt once, then the G completions
    for name in ("reference", "policy"):
        meter.rows[name]["tokens_per_second"] = scored / meter.rows[name]["seconds"]
    result = {"layers": layers, "attn": attn, "num_generations": g, "params": params, "prompt_tokens": prompt_tokens,
              "vision_patches": patches, "completion_tokens": t, "completions_full_length": bool(
                  (completions.completion_mask.sum(1) == t).all()), "loss": loss, "grad_norm": norm,
              "phases": meter.rows, "warmup_seconds": {k: v["seconds"] for k, v in warm.rows.items()},
              "first_step_seconds": {k: v["seconds"] for k, v in first.rows.items()},
              "step_seconds": sum(v["seconds"] for v in meter.rows.values())}
    settings = memory.Settings(gpus=1, num_generations=g, frames=OFFICIAL_BUDGET["max_frames"], lora_rank=args.lora_rank,
                               video_max_pixels=OFFICIAL_BUDGET["video_max_pixels"],
                               image_max_pixels=OFFICIAL_BUDGET["image_max_pixels"], completion=t,
                               chunk=args.chunk, compute_bytes=2 if cuda else 4, flash_attention=True,
                               cuda_overhead_gib=0.0)
    est = memory.estimate(memory.shapes_of(config), settings, prompt_tokens=prompt_tokens, patches=patches,
                          completion=t)
    result["estimate"] = {"phases_gib": est["phases_gib"], "parts_gib": est["parts_gib"],
                          "static_gib": est["static_gib"]}
    if cuda:
        result["measured_over_predicted"] = {p: meter.rows[p]["peak_gib"] / est["phases_gib"][p]
                                             for p in ("rollout", "reference", "policy", "optimizer")}
    save(result)
    if args.decode:
        import decode  # bench/decode.py
        # What a decode step reads: the language model's layers and the LM head in bf16, not the
        # input embeddings (a lookup of one row per sequence).
        lm = (sum(p.numel() for p in policy.model.language_model.parameters()) + policy.lm_head.weight.numel()
              - policy.model.language_model.embed_tokens.weight.numel())
        result["decode"] = []
        for n in args.decode_prompts:
            result["decode"].append(decode.measure(policy, decode_prompts[n], tokenizer, g, args.completion,
                                                   args.decode_repeats, device, ("static", "compiled"), 2 * lm / 1e9,
                                                   args.bandwidth_gbs))
            save(result)
    return result


def per_layer(results, full_layers=28):
    """Each phase's seconds (and peak GiB) per decoder layer, from the first two layer counts,
    and the straight-line figure at full_layers."""
    a, b = results[0], results[1]
    span = b["layers"] - a["layers"]
    out = {}
    for phase in PHASES + ("step",):
        sa = a["step_seconds"] if phase == "step" else a["phases"][phase]["seconds"]
        sb = b["step_seconds"] if phase == "step" else b["phases"][phase]["seconds"]
        row = {"seconds_per_layer": (sb - sa) / span}
        row[f"seconds_at_{full_layers}_layers"] = sb + (full_layers - b["layers"]) * row["seconds_per_layer"]
        if phase != "step" and "peak_gib" in a["phases"][phase]:
            row["peak_gib_per_layer"] = (b["phases"][phase]["peak_gib"] - a["phases"][phase]["peak_gib"]) / span
            if phase in a["estimate"]["phases_gib"]:
                row["predicted_gib_per_layer"] = (b["estimate"]["phases_gib"][phase]
                                                  - a["estimate"]["phases_gib"][phase]) / span
        out[phase] = row
    # One decode step (G new tokens): its seconds per layer, and at full_layers.
    step_s = lambda r: r["num_generations"] / r["phases"]["rollout"]["decode_tokens_per_second"]
    per = (step_s(b) - step_s(a)) / span
    out["rollout"].update(decode_step_seconds_per_layer=per,
                          **{f"decode_step_seconds_at_{full_layers}_layers": step_s(b) + (full_layers - b["layers"]) * per})
    return out


def table(out):
    lines = [f"{out['device']}, torch {out['torch']}, transformers {out['transformers']}; G={out['num_generations']}, "
             f"{out['results'][0]['prompt_tokens']}-token prompt ({out['results'][0]['vision_patches']} vision "
             f"patches), {out['results'][0]['completion_tokens']}-token completions", "",
             "| layers | attn | phase | seconds | tokens/s | peak GiB | predicted GiB | measured / predicted |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["results"]:
        for p in PHASES:
            row = r["phases"][p]
            pred = r["estimate"]["phases_gib"].get(p)
            peak = row.get("peak_gib")
            tps = row.get("tokens_per_second")
            lines.append(f"| {r['layers']} | {r['attn']} | {p} | {row['seconds']:.2f} | "
                         f"{'' if tps is None else f'{tps:,.0f}'} | {'' if peak is None else f'{peak:.2f}'} | "
                         f"{'' if pred is None else f'{pred:.2f}'} | "
                         f"{'' if peak is None or pred is None else f'{peak / pred:.2f}'} |")
        ro = r["phases"]["rollout"]
        lines.append(f"| {r['layers']} | {r['attn']} | first step | {sum(r['first_step_seconds'].values()):.2f} | "
                     f"rollout {r['first_step_seconds']['rollout']:.2f} s | | | |")
        lines.append(f"| {r['layers']} | {r['attn']} | step | {r['step_seconds']:.2f} | decode "
                     f"{ro['decode_tokens_per_second']:,.0f} tok/s, prefill {ro['prefill_seconds']:.2f} s | | | |")
    if "per_layer" in out:
        lines += ["", "| phase | s per layer | s at 28 layers | GiB per layer | predicted GiB per layer |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for p, row in out["per_layer"].items():
            gib, pred = row.get("peak_gib_per_layer"), row.get("predicted_gib_per_layer")
            lines.append(f"| {p} | {row['seconds_per_layer']:.3f} | {row['seconds_at_28_layers']:.2f} | "
                         f"{'' if gib is None else f'{gib:.3f}'} | {'' if pred is None else f'{pred:.3f}'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layer counts (default: 4 8 on a GPU of "
                                                              "100 GiB or more, else 2 4; --tiny: 1 2)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=768, help="tokens per completion (forced)")
    parser.add_argument("--warmup-completion", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=1024, help="--logprob-chunk-size")
    parser.add_argument("--attn", nargs="+", default=None,
                        help="attention implementations (default: sdpa, and flash_attention_2 on the first "
                             "layer count if flash_attn imports)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="measured steps per configuration; the last is reported, the first's seconds kept")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on the frozen base (0: "
                                                                  "full fine-tuning)")
    parser.add_argument("--decode", action="store_true",
                        help="also time --decode static against compiled on the same policy (bench/decode.py)")
    parser.add_argument("--decode-prompts", type=int, nargs="+", default=[1], help="P for --decode: P x G rows")
    parser.add_argument("--decode-repeats", type=int, default=2, help="timed calls per decode path, after the first")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="the GPU's memory bandwidth, for --decode's "
                                                                          "bound (H200 4800, H100 SXM 3350)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here, after each configuration and "
                                                    "decode setting (the committed runs are bench/gpu_*.json)")
    args = parser.parse_args(argv)

    def write(obj):  # --json, when given
        if args.json:
            with open(args.json, "w") as f:
                json.dump(obj, f, indent=2)
    device = torch.device(args.device)
    if args.layers is None:
        if args.tiny:
            args.layers = [1, 2]
        elif device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 100 * GiB:
            args.layers = [4, 8]
        else:
            args.layers = [2, 4]
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attns = args.attn or (["sdpa", "flash_attention_2"] if flash else ["sdpa"])
    import transformers
    tokenizer = tiny.build_tokenizer()
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
           "num_generations": args.num_generations, "lora_rank": args.lora_rank, "flash_attn_installed": flash,
           "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(), "repeat": args.repeat, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = prompt_batch(tokenizer, tmp, device)
        decode_prompts = {n: prompt_batch(tokenizer, os.path.join(tmp, f"p{n}"), device, n)
                          for n in (args.decode_prompts if args.decode else [])}
    runs = [(layers, attns[0]) for layers in args.layers] + [(args.layers[0], a) for a in attns[1:]]
    for layers, attn in runs:
        gc.collect()  # the previous configuration's models (or what an out-of-memory error left)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        def save(partial):  # what is measured so far, this configuration's part included
            write({**out, "results": out["results"] + [partial]})
        try:
            out["results"].append(one_config(args, tokenizer, prompts, layers, attn, device, decode_prompts, save))
        except torch.OutOfMemoryError as e:
            out.setdefault("errors", []).append({"layers": layers, "attn": attn, "error": f"out of memory: {e}"})
            print(f"{layers} layers, {attn}: out of memory", flush=True)
            continue
        r = out["results"][-1]
        for d in r.get("decode", []):
            bound = d.get("fraction_of_bound")
            rate = d["decode_tokens_per_second"]
            n = lambda x, f: "-" if x is None else format(x, f)
            print(f"{layers} layers, {attn}: decode {d['rows']} rows x {d['length']} tokens: static "
                  f"{n(rate['static'], ',.0f')} tok/s, compiled {n(rate['compiled'], ',.0f')} tok/s, compile "
                  f"{d['compile_seconds']:.1f} s, rows identical: {d['rows_identical']:.0%}"
                  + (f"; of the weight-bandwidth bound: static {n(bound['static'], '.0%')}, compiled "
                     f"{n(bound['compiled'], '.0%')}" if bound else ""), flush=True)
        print(f"{layers} layers, {attn}: first step's rollout {r['first_step_seconds']['rollout']:.2f} s; "
              f"step {r['step_seconds']:.2f} s, "
              + ", ".join(f"{p} {v['seconds']:.2f} s" + (f" {v['peak_gib']:.1f} GiB" if "peak_gib" in v else "")
                          for p, v in r["phases"].items()), flush=True)
        write(out)  # after each configuration: a later failure keeps the earlier ones
    sdpa = [r for r in out["results"] if r["attn"] == attns[0]]
    if len(sdpa) >= 2:
        out["per_layer"] = per_layer(sdpa)
    print(table(out))
    write(out)
    return out


if __name__ == "__main__":
    main()
