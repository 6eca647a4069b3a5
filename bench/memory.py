"""Per-GPU memory of one GRPO-CARE training step, part by part, and whether it fits.

    python bench/memory.py                        # Qwen2.5-VL-7B, 4 x 80 GB, the paper's settings
    python bench/memory.py --gpus 2 --frames 32   # any other setting (see --help)
    python bench/memory.py --config path/to/config.json
    python bench/memory.py --measure              # the same model against measured peaks, tiny models on CPU

The estimate follows the step train.py runs (FSDP2 over --gpus processes, fp32 master weights,
AdamW, an fp32 EMA reference sharded like the policy, bf16 compute, activation checkpointing,
flash-attention 2) and takes the peak over its three phases:

  rollout    weights gathered once (bf16), KV cache of P x G x (prompt + completion) tokens,
             each prompt prefilled once, the vision tower run once per prompt;
  reference  a no-grad forward of each prompt packed with its G completions into one row
             (the prompt and its visuals once), with that row's attention mask;
  policy     the same rows, forward with one saved input per checkpointed layer or vision
             block, backward recomputing one layer at a time, the LM head in chunks of --chunk
             positions.

The per-token working set of one layer (how many H- and I-sized tensors a Qwen2.5-VL decoder
layer or vision block keeps alive while it runs) is counted from the transformers code and
checked by --measure, which runs the real step functions of train.py on tiny random models on
CPU, tracks every tensor allocation, and compares each phase's peak with this estimate.
Figures are GiB (2^30 bytes). Writes everything to --json.
"""

import argparse
import json
import os
import sys
import weakref
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from encoding import VisualBudget  # noqa: E402

GiB = 2 ** 30

# Qwen2.5-VL-7B-Instruct's config.json, the parts that size memory.
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_chans=3),
    tie_word_embeddings=False)

# Tensors of size H (hidden) and I (MLP width) alive per token while one layer runs, from
# transformers' Qwen2.5-VL code and checked with --measure: a no-grad forward holds the residual
# stream, the norm output, and gate/up/act(gate)*up in the MLP; backward through a checkpointed
# layer holds its recomputed activations and their gradients. The score matrix (heads x S per
# token) only exists without a fused attention kernel (flash-attention 2 on GPU, sdpa on CPU).
NO_GRAD_LAYER = dict(h=4, i=3, scores=2)
GRAD_LAYER = dict(h=8, i=6, scores=3)


@dataclass
class Settings:
    gpus: int = 4
    gpu_gib: float = 79.0         # an 80 GB H100/A100 reports ~79 GiB usable
    prompts_per_device: int = 1
    num_generations: int = 8
    frames: int = VisualBudget.max_frames        # the official visual budget, at its maximum
    video_max_pixels: int = VisualBudget.video_max_pixels
    image_max_pixels: int = VisualBudget.image_max_pixels
    text_tokens: int = 720          # question, options, template: ~2,000-token prompts with the visuals
    completion: int = 768
    chunk: int = 1024               # --logprob-chunk-size
    compute_bytes: int = 2          # bf16
    flash_attention: bool = True
    reference: bool = True          # CARE's EMA reference (or GRPO's frozen one for the KL)
    train_vision: bool = True
    cuda_overhead_gib: float = 3.0  # CUDA context, NCCL buffers, allocator slack
    repeat_prompts: bool = False    # True: the prompt and its visuals run G times (the public code)
    lora_rank: int = 0              # > 0: LoRA on the language layers' projections, the base frozen
    care: bool = True               # the reference under LoRA: CARE's EMA of the adapters, else (GRPO) none


@dataclass
class Shapes:
    params: int
    trainable: int
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_dim: int          # key/value heads x head dim
    head_dim: int
    vocab: int
    layer_params: int    # one decoder layer
    head_params: int     # LM head (its own FSDP unit with the final norm)
    embed_params: int
    vision_depth: int
    vision_hidden: int
    vision_inter: int
    vision_heads: int
    vision_params: int
    patch: int
    merge: int
    temporal: int


def shapes_of(config, train_vision=True):
    """Parameter counts from a model built on the meta device (no memory, no weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    t, v = config.text_config, config.vision_config
    count = lambda m: sum(p.numel() for p in m.parameters())
    n = count(model)
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return Shapes(params=n, trainable=n if train_vision else n - count(model.model.visual), layers=t.num_hidden_layers,
                  hidden=t.hidden_size, inter=t.intermediate_size, heads=heads,
                  kv_dim=t.num_key_value_heads * head_dim, head_dim=head_dim, vocab=t.vocab_size,
                  layer_params=count(model.model.language_model.layers[0]), head_params=count(model.lm_head),
                  embed_params=count(model.model.language_model.embed_tokens), vision_depth=v.depth,
                  vision_hidden=v.hidden_size, vision_inter=v.intermediate_size, vision_heads=v.num_heads,
                  vision_params=count(model.model.visual),
                  patch=v.patch_size, merge=v.spatial_merge_size,
                  temporal=v.temporal_patch_size)


def lora_params(shapes, rank):
    """Adapter parameters of rank-r LoRA on every language layer's q, k, v, o, gate, up and down
    projections: r x (fan in + fan out) each."""
    h, kv, i = shapes.hidden, shapes.kv_dim, shapes.inter
    per_layer = rank * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    return shapes.layers * per_layer


def visual_tokens(shapes, s):
    """(patches through the vision tower, tokens in the prompt) for one prompt at the budgets."""
    per_patch = shapes.patch ** 2
    video = (s.frames // shapes.temporal) * (s.video_max_pixels // per_patch) if s.frames else 0
    image = s.image_max_pixels // per_patch
    return video + image, (video + image) // shapes.merge ** 2


def layer_bytes(tokens, h, i, heads, seq, counts, c, flash):
    scores = 0 if flash else counts["scores"] * heads * seq
    return tokens * (counts["h"] * h + counts["i"] * i + scores) * c


def estimate(shapes, s, prompt_tokens=None, patches=None, completion=None):
    """Bytes per GPU by part, the peak of each phase, and the verdict. prompt_tokens, patches and
    completion override the values derived from the settings (--measure passes the real ones)."""
    w, c = s.gpus, s.compute_bytes
    vis_patches, vis_tokens = visual_tokens(shapes, s)
    patches = vis_patches if patches is None else patches
    sp = vis_tokens + s.text_tokens if prompt_tokens is None else prompt_tokens
    t = s.completion if completion is None else completion
    seq, b = sp + t, s.prompts_per_device * s.num_generations
    m = b * t  # completion tokens scored
    # Scoring forwards: each prompt and its G completions in one row (prefix_sharing.packed),
    # under a boolean mask that sdpa turns into an additive one in the compute dtype; the public
    # code runs b full sequences.
    row = seq if s.repeat_prompts else sp + s.num_generations * t
    scored = b * seq if s.repeat_prompts else s.prompts_per_device * row
    mask = 0 if s.repeat_prompts else s.prompts_per_device * row ** 2 * (1 + c)
    h, i, heads = shapes.hidden, shapes.inter, shapes.heads
    vh, vi, vheads = shapes.vision_hidden, shapes.vision_inter, shapes.vision_heads
    window = patches / max(1, s.frames // shapes.temporal + 1)  # vision attention is per frame (or window)
    copies = b if s.repeat_prompts else s.prompts_per_device

    trainable = lora_params(shapes, s.lora_rank) if s.lora_rank else shapes.trainable
    if s.lora_rank:  # the frozen base once; the reference is an fp32 EMA of the adapters (CARE) or none
        reference_bytes = 4 * trainable / w if (s.reference and s.care) else 0
    else:
        reference_bytes = 4 * shapes.params / w if s.reference else 0
    parts = {
        "parameters (fp32 shards)": 4 * (shapes.params + (trainable if s.lora_rank else 0)) / w,
        "gradients (fp32 shards)": 4 * trainable / w,
        "optimizer (AdamW, fp32 shards)": 8 * trainable / w,
        "EMA reference (fp32 shards)": reference_bytes,
        "framework (CUDA, NCCL, allocator)": s.cuda_overhead_gib * GiB,
    }
    static = sum(parts.values()) - parts["gradients (fp32 shards)"]  # grads are freed between steps
    # FSDP units gathered while a forward runs: the decoder layer running, the next one being
    # prefetched and the all-gather buffer of a third, plus the units accelerate keeps gathered
    # through the forward (the root, which holds the whole vision tower (see fsdp.decoder_layer);
    # final norm + LM head) and the embeddings.
    root = shapes.params - shapes.layers * shapes.layer_params - shapes.head_params - shapes.embed_params
    in_flight = (3 * shapes.layer_params + shapes.head_params + shapes.embed_params + root) * c if w > 1 else 0

    # Rollout: every weight gathered once, the KV cache, then the largest transient of prefill.
    # With one process the weights are not gathered, but autocast keeps a compute-dtype copy of
    # every weight it casts (all but the embeddings) for the whole generate call (measured on an
    # H200: 2 bytes per non-embedding parameter, bench/README.md).
    # (autocast caches only the casts of weights that require grad: a frozen LoRA base is cast
    # layer by layer and freed.)
    if w > 1:
        gathered = shapes.params * c
    elif c < 4 and not s.lora_rank:
        gathered = (shapes.params - shapes.embed_params) * c
    else:
        gathered = 0
    # All P x G rows decode together (rollout.generate), so the cache holds every row's prompt
    # and completion at once.
    kv_cache = 2 * shapes.layers * b * seq * shapes.kv_dim * c
    # One prompt at a time, prefilled once and its cache copied for the G samples (the public
    # code prefills the G copies together).
    prefill = layer_bytes((b if s.repeat_prompts else 1) * sp, h, i, heads, sp, NO_GRAD_LAYER, c, s.flash_attention)
    vision_once = s.prompts_per_device * layer_bytes(patches, vh, vi, vheads, window, NO_GRAD_LAYER, c,
                                                    s.flash_attention)
    rollout = static + gathered + kv_cache + max(prefill, vision_once)

    # Reference: a no-grad forward of the packed rows, LM head chunked. The scoring forwards get
    # the fp32 pixel values once per prompt (G times with --repeat-prompts).
    pixels = copies * patches * 3 * shapes.temporal * shapes.patch ** 2 * 4
    chunk_no_grad = min(s.chunk, m) * shapes.vocab * (c + 4 + 4)
    ref_vision = copies * layer_bytes(patches, vh, vi, vheads, window, NO_GRAD_LAYER, c, s.flash_attention)
    ref_layer = layer_bytes(scored, h, i, heads, row, NO_GRAD_LAYER, c, s.flash_attention)
    reference = (static + in_flight + pixels + mask + max(ref_vision, ref_layer, chunk_no_grad)) if s.reference else 0

    # Policy: one saved input per checkpointed layer / vision block, then backward recomputes
    # one at a time; the gradients of the unit being reduced exist unsharded (fp32) meanwhile.
    # Saved: each layer's input, the embeddings and visual scatter, the 3D-RoPE cos/sin.
    saved = scored * ((shapes.layers + 2) * h + 2 * shapes.head_dim) * c
    if s.train_vision and not s.lora_rank:
        saved += copies * patches * vh * c * (shapes.vision_depth + 5)  # block inputs + patch embed + merger
    recompute = max(layer_bytes(scored, h, i, heads, row, GRAD_LAYER, c, s.flash_attention),
                    copies * layer_bytes(patches, vh, vi, vheads, window, GRAD_LAYER, c, s.flash_attention)
                    if s.train_vision and not s.lora_rank else 0,
                    min(s.chunk, m) * shapes.vocab * (c + 4 + 4 + 4))
    # A unit's unsharded gradients (compute dtype) and the fp32 reduce-scatter buffer FSDP
    # copies them into; the largest unit is the root, with the vision tower.
    unsharded_grads = (c + 4) * max(shapes.layer_params, shapes.head_params, root) if w > 1 else 0
    if s.lora_rank:  # only the adapters have gradients
        unsharded_grads = (c + 4) * lora_params(shapes, s.lora_rank) / shapes.layers if w > 1 else 0
    policy = (static + parts["gradients (fp32 shards)"] + in_flight + pixels + mask + saved + recompute
              + unsharded_grads)

    parts.update({
        "rollout: bf16 weights (gathered; one process: autocast's copies)": gathered,
        "rollout: KV cache": kv_cache,
        "rollout: prefill / vision transient": max(prefill, vision_once),
        "scoring: gathered FSDP units in flight": in_flight,
        "scoring: pixel values": pixels,
        "scoring: packed rows' attention mask": mask,
        "policy: checkpointed activations": saved,
        "policy: one layer recomputed / LM-head chunk": recompute,
        "policy: unsharded gradients of one unit": unsharded_grads,
    })
    # Optimizer: the gradients, and torch's foreach AdamW holds one more fp32 copy of the
    # trainable shards for a moment (measured on an H200: the step's peak on one GPU).
    adamw_scratch = 4 * trainable / w
    optimizer = static + parts["gradients (fp32 shards)"] + adamw_scratch
    parts["optimizer: AdamW's foreach scratch"] = adamw_scratch
    phases = {"rollout": rollout, "reference": reference, "policy": policy, "optimizer": optimizer}
    peak = max(phases.values())
    budget = s.gpu_gib * GiB
    return {"settings": asdict(s), "prompt_tokens": sp, "static_gib": static / GiB, "vision_patches": patches,
            "completion_tokens": t,
            "params": shapes.params, "parts_gib": {k: v / GiB for k, v in parts.items()},
            "phases_gib": {k: v / GiB for k, v in phases.items()}, "peak_gib": peak / GiB,
            "peak_phase": max(phases, key=phases.get), "headroom": 1 - peak / budget, "fits": peak <= budget}


# --plan: which clusters each method fits, and if not, the smallest change that makes it fit.
CLUSTERS = {"1x80GB": (1, 79.0), "2x80GB": (2, 79.0), "4x80GB": (4, 79.0), "8x40GB": (8, 39.0), "1x48GB": (1, 47.0)}
METHODS = {"full fine-tuning": {}, "LoRA r=64": {"lora_rank": 64}}
# From the least to the most change to the recipe; tried alone, then in pairs.
KNOBS = (("--max-frames 8", {"frames": 8}),
         ("--video-max-pixels 64x28x28", {"video_max_pixels": 64 * 28 * 28}),
         ("--num-generations 4", {"num_generations": 4}),
         ("--lora-rank 64", {"lora_rank": 64}),
         ("--max-completion-length 384", {"completion": 384}))


def plan(shapes_for, base=None):
    """[{cluster, method, peak_gib, headroom, fits, change}] for every cluster and method: the
    estimate at the official settings, and for a setting that does not fit the first single knob
    (or pair of knobs) in KNOBS order that makes it fit. shapes_for(train_vision) -> Shapes.
    CPU offload of the optimizer is not offered: train.py does not support it."""
    base = base or {}
    rows = []
    for cluster, (gpus, gib) in CLUSTERS.items():
        for method, extra in METHODS.items():
            settings = Settings(**{**base, **extra, "gpus": gpus, "gpu_gib": gib})
            est = estimate(shapes_for(not settings.lora_rank), settings)
            row = {"cluster": cluster, "method": method, "peak_gib": est["peak_gib"], "peak_phase": est["peak_phase"],
                   "headroom": est["headroom"], "fits": est["fits"], "change": None}
            if not est["fits"]:
                candidates = [[k] for k in KNOBS] + [[a, b] for i, a in enumerate(KNOBS) for b in KNOBS[i + 1:]]
                for knobs in candidates:
                    if any("lora_rank" in k[1] for k in knobs) and settings.lora_rank:
                        continue
                    changed = Settings(**{**asdict(settings), **{n: v for _, kv in knobs for n, v in kv.items()}})
                    e = estimate(shapes_for(not changed.lora_rank), changed)
                    if e["fits"]:
                        row["change"] = {"flags": " ".join(k[0] for k in knobs), "peak_gib": e["peak_gib"],
                                         "headroom": e["headroom"]}
                        break
            row["largest_p"] = largest_p(shapes_for, settings)
            rows.append(row)
    return rows


def largest_p(shapes_for, settings, most=16):
    """The most prompts per device (P, all P x G rows decoded together) that fit, 0 if none."""
    fits = 0
    for p in range(1, most + 1):
        changed = Settings(**{**asdict(settings), "prompts_per_device": p})
        if not estimate(shapes_for(not changed.lora_rank), changed)["fits"]:
            break
        fits = p
    return fits


def plan_table(rows):
    lines = ["| cluster | method | fits | peak GiB (phase) | headroom | smallest change that fits | largest P that fits |",
             "| --- | --- | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        change = "-" if r["fits"] else (f"{r['change']['flags']}: {r['change']['peak_gib']:.1f} GiB, "
                                        f"{100 * r['change']['headroom']:.0f}% headroom" if r["change"] else "none found")
        lines.append(f"| {r['cluster']} | {r['method']} | {'yes' if r['fits'] else 'no'} | "
                     f"{r['peak_gib']:.1f} ({r['peak_phase']}) | {100 * r['headroom']:.0f}% | {change} | "
                     f"{r.get('largest_p', '-')} |")
    return "\n".join(lines)


def report(est):
    s = est["settings"]
    lines = [f"Qwen2.5-VL, {est['params'] / 1e9:.2f}B parameters, {s['gpus']} x {s['gpu_gib']:g} GiB; "
             f"{s['prompts_per_device']} prompt x {s['num_generations']} completions per GPU, "
             f"{est['prompt_tokens']}-token prompts ({s['frames']} frames), {est['completion_tokens']}-token completions",
             "", "| part | GiB per GPU |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in est["parts_gib"].items()]
    lines += ["", "| phase | peak GiB |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in est["phases_gib"].items()]
    verdict = "fits" if est["fits"] else "does NOT fit"
    lines += ["", f"peak {est['peak_gib']:.1f} GiB ({est['peak_phase']}) of {s['gpu_gib']:g}: {verdict}, "
                  f"headroom {100 * est['headroom']:.0f}%"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement on CPU: the real step functions of train.py, every tensor allocation tracked.


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage alive, and the peak, counted at every op (CPU has no allocator
    statistics). Storages made before tracking starts are added with add()."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def add(self, t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            return  # tensor subclasses (DTensor) hold plain tensors, which are counted themselves
        s = t.untyped_storage()
        key = s.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = s.nbytes()
        self.now += s.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(s, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def reset_peak(self):
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            self.add(t)
        return out


MEASURED_CASES = [
    # name, model dims, settings
    ("h128-L4-G4", dict(hidden=128, layers=4, heads=4, vision_hidden=64, vision_depth=2, inter=512),
     dict(num_generations=4, frames=8, video_max_pixels=112 * 168, image_max_pixels=112 * 112, completion=48)),
    ("h256-L2-G8", dict(hidden=256, layers=2, heads=4, vision_hidden=64, vision_depth=2),
     dict(num_generations=8, frames=4, video_max_pixels=84 * 112, image_max_pixels=84 * 84, completion=64)),
    ("h192-L3-G6-long", dict(hidden=192, layers=3, heads=6, vision_hidden=96, vision_depth=3, inter=576),
     dict(num_generations=6, frames=8, video_max_pixels=140 * 196, image_max_pixels=112 * 140, completion=96)),
    # LoRA: the base frozen, adapters and their EMA (the reference) only
    ("h128-L4-G4-lora8", dict(hidden=128, layers=4, heads=4, vision_hidden=64, vision_depth=2, inter=512),
     dict(num_generations=4, frames=8, video_max_pixels=112 * 168, image_max_pixels=112 * 112, completion=48,
          lora_rank=8)),
    ("h256-L2-G8-lora16", dict(hidden=256, layers=2, heads=4, vision_hidden=64, vision_depth=2),
     dict(num_generations=8, frames=4, video_max_pixels=84 * 112, image_max_pixels=84 * 84, completion=64,
          lora_rank=16)),
]


def tiny_case_config(tokenizer, dims, vocab):
    import tiny
    dims = dict(dims)
    inter = dims.pop("inter", None)
    config = tiny.tiny_config(tokenizer, **dims)
    if inter:
        config.text_config.intermediate_size = inter
    config.text_config.vocab_size = vocab  # a real-sized LM head matters for the chunked log-probs
    return config


def build_cases(workdir, vocab=4096):
    """Write each case's random model and a small dataset with 16-frame videos. Done before any
    process group exists: transformers' save_pretrained writes only on rank 0 once one does."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import tiny
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_model(os.path.join(workdir, "_processor"))  # tokenizer + preprocessor files
    for name, dims, _ in MEASURED_CASES:
        model_dir = os.path.join(workdir, name)
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(tiny_case_config(tokenizer, dims, vocab)).save_pretrained(model_dir)
        for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            with open(os.path.join(processor, f)) as src, open(os.path.join(model_dir, f), "w") as dst:
                dst.write(src.read())
    tiny.build_seed_bench(os.path.join(workdir, "data"), n_train=4, n_val=1, n_frames=16)


def measure(name, dims, overrides, workdir, vocab=4096):
    """Run train.py's rollout, reference scoring and policy update once (after a warm-up step so
    AdamW's state exists) on a tiny model, one process, fp32 on CPU; return measured and
    estimated peaks per phase."""

    import tiny
    import config
    import fsdp
    import models
    import train

    tokenizer = tiny.build_tokenizer()
    model_config = tiny_case_config(tokenizer, dims, vocab)
    model_dir = os.path.join(workdir, name)
    data_root = os.path.join(workdir, "data")
    # CPU sdpa runs its fused (flash) kernel: no score matrix, like flash-attention 2 on GPU.
    s = Settings(**{**dict(gpus=int(os.environ.get("WORLD_SIZE", "1")), prompts_per_device=1, compute_bytes=4, flash_attention=True, chunk=64,
                           cuda_overhead_gib=0.0, text_tokens=0), **overrides})
    px = dict(video_min_pixels=s.video_max_pixels, video_max_pixels=s.video_max_pixels,
              image_min_pixels=s.image_max_pixels, image_max_pixels=s.image_max_pixels)
    cfg = config.parse_config(["--model", model_dir, "--data", f"{data_root}/annotations/training_6k.jsonl",
                              "--data-root", data_root, "--num-generations", str(s.num_generations),
                              "--prompts-per-device", "1", "--max-completion-length", str(s.completion),
                              "--logprob-chunk-size", str(s.chunk), "--max-frames", str(s.frames),
                              "--min-frames", str(s.frames), "--mixed-precision", "no", "--lora-rank", str(s.lora_rank),
                              *[f"--{k.replace('_', '-')}={v}" for k, v in px.items()]])
    import data
    import encoding
    import reference
    import rollout
    accelerator = fsdp.make_accelerator("no")
    budget = encoding.budget_from_checkpoint(model_dir, fps=cfg.fps, min_frames=s.frames, max_frames=s.frames, **px)
    samples, _ = data.load_samples(cfg.data, cfg.data_root)
    sample = next(x for x in samples if x.video)
    model = models.load_policy(cfg)
    optimizer, scheduler = train.build_optimizer(cfg, model, 10)
    model, optimizer = fsdp.prepare_policy(accelerator, model, optimizer)  # FSDP2 under torchrun, as in train.py
    if s.lora_rank:  # the EMA of the adapters over the policy's own frozen base (lora.py)
        import lora
        ref = lora.make_reference(cfg, model)
    else:
        ref = fsdp.prepare_reference(accelerator, reference.make_reference(models.load_model(cfg.model,
                                                                                             cfg.attn_implementation)))
    gen = rollout.sampling_config(tokenizer, s.completion)
    gen.min_new_tokens = s.completion  # every completion exactly s.completion tokens
    enc = encoding.encode_prompt(sample, tokenizer, budget)
    prompts = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v)
               for k, v in encoding.collate_prompts([enc], tokenizer).items()}
    patches = sum(int(prompts[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in prompts)

    def step(tracker=None):
        peaks = {}
        for phase in ("rollout", "reference", "policy"):
            if tracker:
                tracker.reset_peak()
            if phase == "rollout":
                with fsdp.gathered(model):
                    completions = rollout.generate(model, prompts, tokenizer, s.num_generations, gen, seeds=[0])
            elif phase == "reference":
                scores = train.score_rollout(cfg, completions, [sample], ref, tokenizer)
                fsdp.reshard(ref)
            else:
                batch = train.Batch(1, [sample], prompts, [0], [[sample.sample_id]], [])
                train.policy_update(cfg, accelerator, model, optimizer, scheduler, ref, completions, scores["advantages"],
                                    batch)
            if tracker:
                peaks[phase] = tracker.peak
        return peaks, completions

    step()  # AdamW creates its state at the first step
    tracker = LiveBytes()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.add(fsdp.local_shard(t))
    for t in ([t for _, t in ref.named_parameters()] if s.lora_rank else list(ref.parameters()) + list(ref.buffers())):
        tracker.add(fsdp.local_shard(t))
    for state in optimizer.state.values():
        for t in state.values():
            tracker.add(fsdp.local_shard(t))
    static = tracker.now
    with tracker:
        measured, completions = step(tracker)
    shapes = shapes_of(model_config)
    est = estimate(shapes, s, prompt_tokens=int(prompts["input_ids"].shape[1]), patches=patches,
                   completion=int(completions.completion_ids.shape[1]))
    est_static = est["static_gib"] * GiB
    rows = {p: {"measured_gib": measured[p] / GiB, "estimated_gib": est["phases_gib"][p],
                "ratio": est["phases_gib"][p] * GiB / measured[p],
                # the part above parameters, optimizer state and reference (which match exactly)
                "ratio_above_static": (est["phases_gib"][p] * GiB - est_static) / (measured[p] - static)}
            for p in measured}
    return {"case": name, "dims": dims, "settings": asdict(s), "prompt_tokens": est["prompt_tokens"],
            "vision_patches": patches, "phases": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, default in asdict(Settings()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--config", help="a Qwen2.5-VL config.json (default: Qwen2.5-VL-7B-Instruct's)")
    parser.add_argument("--measure", action="store_true", help="check the estimate against tiny models on CPU")
    parser.add_argument("--plan", action="store_true", help="every cluster x method: fits, peak, and the smallest "
                                                           "change that makes a setting fit")
    parser.add_argument("--json", help="default: bench/memory.json, or bench/memory_measured_<N>proc.json")
    args = parser.parse_args(argv)
    from transformers import Qwen2_5_VLConfig

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.json is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        args.json = (os.path.join(ROOT, "bench", f"memory_measured_{world}proc.json") if args.measure
                     else os.path.join(ROOT, "bench", "memory_plan.json") if args.plan
                     else os.path.join(ROOT, "bench", "memory.json"))
    if args.measure:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            build_cases(tmp)
            results = [measure(name, dims, overrides, tmp) for name, dims, overrides in MEASURED_CASES]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        show = print if rank0 else (lambda *a, **k: None)
        show(f"{world} process(es); per-process peaks, GiB; 'above static' leaves out parameters, AdamW state "
              f"and reference, which the estimate matches exactly\n")
        show("| case | phase | measured | estimated | estimate / measured | same, above static |")
        show("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in results:
            for phase, row in r["phases"].items():
                show(f"| {r['case']} | {phase} | {row['measured_gib']:.4f} | {row['estimated_gib']:.4f} | "
                      f"{row['ratio']:.2f} | {row['ratio_above_static']:.2f} |")
        worst = max(abs(row["ratio"] - 1) for r in results for row in r["phases"].values())
        worst_dynamic = max(abs(row["ratio_above_static"] - 1) for r in results for row in r["phases"].values())
        show(f"\nworst disagreement: {100 * worst:.0f}% of the peak, {100 * worst_dynamic:.0f}% of the part above static")
        out = {"processes": world, "measured": results, "worst_disagreement": worst,
               "worst_disagreement_above_static": worst_dynamic}
    elif args.plan:
        config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
        shapes = {v: shapes_of(config, v) for v in (True, False)}
        rows = plan(lambda train_vision: shapes[train_vision])
        print(plan_table(rows))
        out = {"clusters": CLUSTERS, "methods": METHODS, "plan": rows}
    else:
        settings = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
        if args.config:
            with open(args.config) as f:
                config = Qwen2_5_VLConfig(**json.load(f))
        else:
            config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
        out = estimate(shapes_of(config, settings.train_vision), settings)
        print(report(out))
    if rank0:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
