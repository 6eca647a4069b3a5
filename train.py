r"""Train a Qwen2.5-VL policy with GRPO-CARE, or with plain GRPO for comparison.

For each prompt, sample a group of G completions. Reward = accuracy + format, plus (CARE) a
consistency bonus for the high-accuracy completions whose reasoning leaves the slowly moving
EMA reference at least as confident in their stated answer as their high-accuracy peers.
Advantages are the rewards normalised within each group; one policy-gradient step (no KL for
CARE); every ema_every steps the reference moves towards the policy. Plain GRPO: no bonus, a
frozen reference and a KL penalty. care.py holds the formulas; this file is the loop.

    torchrun --nproc_per_node 4 train.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data SEED-Bench-R1/annotations/training_6k.jsonl --data-root SEED-Bench-R1 --algo care

The defaults are the official GRPO-CARE settings. With more than one process the policy and the
reference are sharded with FSDP2 (fsdp.py); nothing else changes. checkpoint.py keeps runs
apart and resumable.
"""

import argparse
import dataclasses
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

import care
import checkpoint
import data
import encoding
import fsdp
import reference
import rewards
import rollout


def setting(default, help):
    """A Config field with its --help line (the default is appended by argparse)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = setting("Qwen/Qwen2.5-VL-7B-Instruct", "initial policy: a local checkpoint directory or a hub id")
    data: str = setting("SEED-Bench-R1/annotations/training_6k.jsonl", "training annotations (JSONL or JSON list)")
    data_root: str = setting("SEED-Bench-R1", "directory the videos and images in --data are relative to")
    output_dir: str = setting("runs/care", "where log.jsonl and the checkpoints go (one run per directory)")
    algo: str = setting("care", "care (accuracy + format + consistency bonus, EMA reference) or grpo (KL to a frozen reference)")
    seed: int = setting(42, "fixes the data order, every group's sampling seed and the initial RNG state")
    # batch: P prompts per process, G completions per prompt
    prompts_per_device: int = setting(1, "P: prompts per process per step (global batch = processes x P)")
    num_generations: int = setting(8, "G: completions sampled per prompt (a group)")
    epochs: int = setting(1, "passes over the training data")
    max_steps: int = setting(-1, "stop after this many steps if > 0 (also sets the cosine schedule's length)")
    # rollout
    max_prompt_length: int = setting(16384, "a longer prompt (text + visual tokens) is a data error")
    max_completion_length: int = setting(768, "new tokens per completion; longer ones are cut and marked truncated")
    temperature: float = setting(1.0, "sampling temperature of the rollouts")
    top_p: float = setting(0.95, "nucleus sampling of the rollouts")
    top_k: int = setting(0, "top-k sampling of the rollouts, 0 = off (the public code inherits 50)")
    repetition_penalty: float = setting(1.0, "1.0 = off")
    # reward and CARE
    bonus_coef: float = setting(0.5, "CARE: consistency bonus = bonus_coef x accuracy")
    conf_cap: float = setting(0.95, "CARE: the reference confidence is capped at this value")
    consistency_margin: float = setting(0.0, "CARE: consistent if confidence >= mean over high-accuracy peers - margin "
                                             "(0.01 when targeting general video benchmarks)")
    ema_decay: float = setting(0.995, "CARE: reference <- decay x reference + (1 - decay) x policy; 1.0 = frozen")
    ema_every: int = setting(10, "CARE: steps between reference updates")
    # loss; beta < 0 means "the algorithm's default": 0 for care, 0.04 for grpo
    num_iterations: int = setting(1, "policy updates per rollout (> 1 uses the PPO clipped ratio)")
    epsilon: float = setting(0.2, "PPO clip range (only with --num-iterations > 1)")
    beta: float = setting(-1.0, "KL coefficient to the reference; < 0 = the algorithm's default (care 0, grpo 0.04)")
    # optimizer
    lr: float = setting(1e-6, "peak learning rate (AdamW, cosine decay)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms and biases)")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(0, "linear warmup steps before the cosine decay")
    max_grad_norm: float = setting(5.0, "gradient-norm clip")
    freeze_vision: bool = setting(False, "do not train the vision tower (the official recipe trains it)")
    gradient_checkpointing: bool = setting(True, "recompute activations in backward to save memory")
    logprob_chunk_size: int = setting(1024, "completion tokens per LM-head chunk when scoring (bounds logits memory)")
    mixed_precision: str = setting("auto", "auto (bf16 on GPU, no on CPU) | bf16 | no")
    attn_implementation: str = setting("auto", "auto (flash_attention_2 if installed on GPU, else sdpa) | sdpa | eager")
    # visual budgets
    fps: float = setting(2.0, "video frames sampled per second")
    min_frames: int = setting(4, "fewest video frames")
    max_frames: int = setting(16, "most video frames")
    video_min_pixels: int = setting(4 * 28 * 28, "fewest pixels per video frame after resizing")
    video_max_pixels: int = setting(128 * 28 * 28, "most pixels per video frame after resizing")
    image_min_pixels: int = setting(4 * 28 * 28, "fewest pixels of the observation image after resizing")
    image_max_pixels: int = setting(256 * 28 * 28, "most pixels of the observation image after resizing")
    second_per_grid: float = setting(0.0, "seconds per temporal patch in the video positions: 0 = measured from the "
                                          "sampled fps; 1.0 = the public code's fixed value")
    frame_rounding: str = setting("nearest", "frame count: nearest (round to the temporal patch, then clamp) | "
                                             "floor (the public code: clamp, then round down to even)")
    reproduce_official: bool = setting(False, "the public code's effective behaviour: frozen reference "
                                              "(--ema-decay 1.0), --second-per-grid 1.0, --top-k 50, "
                                              "--frame-rounding floor; flags given explicitly win")
    # data checks
    skip_bad_samples: bool = setting(False, "skip (and count) unreadable samples instead of stopping")
    check_data: bool = setting(False, "decode every video and image before step 1")
    allow_outside_data_root: bool = setting(False, "allow media paths that lead outside --data-root")
    # bookkeeping
    save_every: int = setting(500, "steps between checkpoints (the last step is always saved)")
    keep_last: int = setting(0, "keep only the newest N checkpoints; 0 = keep all")
    resume: str = setting("", "a checkpoint directory, or auto for the newest complete one in --output-dir")
    overwrite: bool = setting(False, "delete the run already in --output-dir and start a new one")
    allow_config_change: bool = setting(False, "resume even if the run-defining settings differ from the checkpoint's")
    log_completions: bool = setting(False, "also write every completion and its rewards to completions.jsonl")


# What --reproduce-official sets (unless the flag is given explicitly): the public code's
# effective behaviour. Its EMA write is discarded under ZeRO-3, so its reference stays frozen;
# it never passes the sampled fps (1.0 s per temporal patch); it inherits transformers' top-k 50;
# qwen_vl_utils clamps the frame count and then rounds it down to even.
OFFICIAL = {"ema_decay": 1.0, "second_per_grid": 1.0, "top_k": 50, "frame_rounding": "floor"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(defaults=True):
    """One --flag per Config field, with its help line. defaults=False leaves a flag that is not
    given out of the result, which tells what the user set explicitly."""
    parser = Parser(description=__doc__, formatter_class=HelpFormatter, usage="%(prog)s [--flag value ...]")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if defaults else argparse.SUPPRESS
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"])
    return parser


def check_settings(cfg):
    """Every setting with a valid range, as (condition, message); the first false one is reported."""
    return [
        (cfg.algo in ("care", "grpo"), f"--algo must be care or grpo, got {cfg.algo!r}"),
        (cfg.num_generations >= 2, f"--num-generations must be >= 2 (group statistics need two samples), "
                                   f"got {cfg.num_generations}"),
        (cfg.prompts_per_device >= 1, f"--prompts-per-device must be >= 1, got {cfg.prompts_per_device}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.max_steps != 0, "--max-steps must be > 0, or < 0 for whole epochs"),
        (cfg.save_every >= 1, f"--save-every must be >= 1, got {cfg.save_every}"),
        (cfg.ema_every >= 1, f"--ema-every must be >= 1, got {cfg.ema_every}"),
        (cfg.keep_last >= 0, f"--keep-last must be >= 0, got {cfg.keep_last}"),
        (cfg.num_iterations >= 1, f"--num-iterations must be >= 1, got {cfg.num_iterations}"),
        (cfg.logprob_chunk_size >= 1, f"--logprob-chunk-size must be >= 1, got {cfg.logprob_chunk_size}"),
        (cfg.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {cfg.max_prompt_length}"),
        (cfg.max_completion_length >= 1, f"--max-completion-length must be >= 1, got {cfg.max_completion_length}"),
        (0 < cfg.ema_decay <= 1, f"--ema-decay must be in (0, 1], got {cfg.ema_decay}"),
        (cfg.bonus_coef >= 0, f"--bonus-coef must be >= 0, got {cfg.bonus_coef}"),
        (cfg.consistency_margin >= 0, f"--consistency-margin must be >= 0, got {cfg.consistency_margin}"),
        (0 < cfg.conf_cap <= 1, f"--conf-cap must be in (0, 1], got {cfg.conf_cap}"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {cfg.max_grad_norm}"),
        (cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon}"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}"),
        (cfg.top_k >= 0, f"--top-k must be >= 0, got {cfg.top_k}"),
        (cfg.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {cfg.repetition_penalty}"),
        (cfg.fps > 0, f"--fps must be > 0, got {cfg.fps}"),
        (1 <= cfg.min_frames <= cfg.max_frames, f"need 1 <= --min-frames <= --max-frames, got "
                                                f"{cfg.min_frames} and {cfg.max_frames}"),
        (1 <= cfg.video_min_pixels <= cfg.video_max_pixels, f"need 1 <= --video-min-pixels <= --video-max-pixels, "
                                                            f"got {cfg.video_min_pixels} and {cfg.video_max_pixels}"),
        (1 <= cfg.image_min_pixels <= cfg.image_max_pixels, f"need 1 <= --image-min-pixels <= --image-max-pixels, "
                                                            f"got {cfg.image_min_pixels} and {cfg.image_max_pixels}"),
        (cfg.second_per_grid >= 0, f"--second-per-grid must be >= 0 (0 = measured), got {cfg.second_per_grid}"),
        (cfg.frame_rounding in ("nearest", "floor"), f"--frame-rounding must be nearest or floor, "
                                                      f"got {cfg.frame_rounding!r}"),
        (cfg.mixed_precision in ("auto", "bf16", "no"), f"--mixed-precision must be auto, bf16 or no, "
                                                         f"got {cfg.mixed_precision!r}"),
        (cfg.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
         f"--attn-implementation must be auto, flash_attention_2, sdpa or eager, got {cfg.attn_implementation!r}"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other: pick one"),
    ]


def parse_config(argv=None):
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.reproduce_official:
        given = vars(build_parser(defaults=False).parse_args(argv))
        for name, value in OFFICIAL.items():
            if name not in given:
                setattr(cfg, name, value)
    for ok, message in check_settings(cfg):
        if not ok:
            parser.error(message)
    if cfg.beta < 0:
        cfg.beta = 0.0 if cfg.algo == "care" else 0.04
    if cfg.algo == "grpo":
        cfg.ema_decay = 1.0  # plain GRPO: a frozen reference, used only for the KL term
    return cfg


# ---------------------------------------------------------------------------------------------
# Setup


def pick_attn_implementation(choice):
    if choice != "auto":
        return choice
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def load_model(cfg):
    # fp32 master weights (AdamW and the EMA need them); bf16 is the compute dtype, applied by
    # FSDP's mixed-precision policy (or accelerate's autocast with one process).
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        cfg.model, dtype=torch.float32, attn_implementation=pick_attn_implementation(cfg.attn_implementation))


def load_policy(cfg):
    model = load_model(cfg)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode, and transformers only checkpoints
    # activations in train mode: without this, checkpointing is silently off.
    return model.train()


def build_optimizer(cfg, model, total_steps):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    return optimizer, scheduler


def shard_order(num_samples, epoch, seed, rank, world, per_rank):
    """This rank's sample indices for one epoch: a seeded shuffle, dealt out P at a time so
    every rank sees different prompts and one prompt's group never spans ranks. The tail that
    does not fill a whole step on every rank is dropped (as a DistributedSampler would)."""
    order = list(range(num_samples))
    random.Random(seed * 1000 + epoch).shuffle(order)
    per_step = world * per_rank
    usable = num_samples // per_step * per_step
    steps = [order[i:i + per_step] for i in range(0, usable, per_step)]
    return [s[rank * per_rank:(rank + 1) * per_rank] for s in steps]


# ---------------------------------------------------------------------------------------------
# One step


def rollout_seed(seed, step, sample_index):
    """The sampling seed of one prompt's group, fixed by (run seed, step, prompt): the same
    completions whatever the number of processes, and again after a resume."""
    return random.Random(f"{seed}/{step}/{sample_index}").getrandbits(63)


def encode_batch(cfg, samples, indices, tokenizer, budget, skipped):
    """Encode this step's prompts, returning (indices, encoded) for the ones kept. A sample that
    cannot be read stops the run with a message that names it, unless --skip-bad-samples, which
    drops it and records why."""
    kept, encoded = [], []
    for i in indices:
        try:
            enc = encoding.encode_prompt(samples[i], tokenizer, budget)
            if len(enc["input_ids"]) > cfg.max_prompt_length:
                raise data.DataError(f"sample {samples[i].sample_id}: prompt has {len(enc['input_ids'])} tokens, "
                                     f"more than --max-prompt-length {cfg.max_prompt_length} "
                                     f"(lower the frame or pixel budget)")
        except data.DataError as e:
            if not cfg.skip_bad_samples:
                raise
            skipped.append(str(e))
            continue
        kept.append(i)
        encoded.append(enc)
    return kept, encoded


def oom_advice(cfg, phase):
    budget = (f"--max-frames ({cfg.max_frames}), --video-max-pixels ({cfg.video_max_pixels}), "
              f"--image-max-pixels ({cfg.image_max_pixels}), --max-completion-length ({cfg.max_completion_length})")
    if phase == "rollout":
        return (f"generation holds the full bf16 weights and a KV cache for G x (prompt + completion) tokens; "
                f"lower --num-generations ({cfg.num_generations}), {budget}")
    return (f"lower --logprob-chunk-size ({cfg.logprob_chunk_size}), {budget}, "
            f"and keep --gradient-checkpointing on ({cfg.gradient_checkpointing})")


@contextmanager
def phase(name, cfg):
    """Name the phase and the settings to lower when it runs out of GPU memory."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"out of memory during {name}: {oom_advice(cfg, name)}") from e


def stop_if_not_finite(accelerator, what, value, step, sample_ids):
    """Stop every process, before the optimizer step, if value has a NaN or inf on any of them,
    naming the step and the samples of the processes where it happened. All processes stop
    together: one that raised alone would leave the others waiting in a collective."""
    bad = not torch.isfinite(value).all().item()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
        if flags.item() == 0:
            return
        culprits = [s for ids in gather_object([sample_ids if bad else []]) for s in ids]
    elif not bad:
        return
    else:
        culprits = list(sample_ids)
    raise FloatingPointError(f"step {step}: non-finite {what} for samples {culprits}; "
                             f"stopped before the optimizer step")


def score_rollout(cfg, roll, samples, ref_model, tokenizer):
    """Rewards, CARE bonus and group-normalised advantages, all shaped [P, G]."""
    p, g = len(samples), cfg.num_generations
    solutions = [s.solution for s in samples for _ in range(g)]
    types = [s.problem_type for s in samples for _ in range(g)]
    acc, fmt = rewards.score(roll.texts, solutions, types)
    acc = torch.tensor(acc).view(p, g)
    fmt = torch.tensor(fmt).view(p, g)
    if cfg.algo == "care":
        answer_logp, has_span = reference.answer_logprob(ref_model, roll, tokenizer, cfg.logprob_chunk_size)
        fsdp.reshard(ref_model)
        parts = care.care_rewards(acc, fmt, answer_logp.cpu().view(p, g), has_span.cpu().view(p, g),
                                  margin=cfg.consistency_margin, bonus_coef=cfg.bonus_coef, conf_cap=cfg.conf_cap)
    else:
        has_span = torch.zeros(p * g, dtype=torch.bool)
        parts = care.grpo_rewards(acc, fmt)
        parts.update(bonus=torch.zeros_like(acc), p=torch.zeros_like(acc))
    parts.update(acc=acc, fmt=fmt, has_span=has_span.cpu().view(p, g))
    parts["advantages"] = care.group_advantages(parts["reward"])
    return parts


def step_metrics(parts, roll, loss_stats):
    has_span = parts["has_span"]
    n_span = has_span.sum().item()
    return {
        "reward": parts["reward"].mean().item(),
        "reward_acc": parts["acc"].mean().item(),
        "reward_fmt": parts["fmt"].mean().item(),
        "reward_bonus": parts["bonus"].mean().item(),
        "bonus_rate": (parts["bonus"] > 0).float().mean().item(),
        "ref_confidence": (parts["p"][has_span].mean().item() if n_span else float("nan")),
        "adv_std": parts["advantages"].std().item() if parts["advantages"].numel() > 1 else 0.0,
        # groups whose G rewards are all equal: zero advantages, no gradient from them
        "zero_adv_groups": (parts["reward"].amax(1) == parts["reward"].amin(1)).float().mean().item(),
        "completion_len": roll.completion_mask.sum(1).mean().item(),
        "truncation_rate": roll.truncated.float().mean().item(),
        **loss_stats,
    }


def policy_update(cfg, accelerator, model, optimizer, scheduler, roll, advantages, ref_model, step, sample_ids):
    """num_iterations optimizer steps on one rollout (1 = the official setting)."""
    adv = advantages.reshape(-1).to(accelerator.device)
    mask = roll.completion_mask
    chunk = cfg.logprob_chunk_size
    ref_logp = None
    if cfg.beta > 0:
        with torch.no_grad(), accelerator.autocast():
            ref_logp = rollout.completion_logprobs(ref_model, roll, chunk)
        fsdp.reshard(ref_model)
    old_logp = None
    if cfg.num_iterations > 1:
        with torch.no_grad(), accelerator.autocast():
            old_logp = rollout.completion_logprobs(model, roll, chunk)
    for _ in range(cfg.num_iterations):
        with accelerator.autocast():
            logp = rollout.completion_logprobs(model, roll, chunk)
        loss, stats = care.policy_loss(logp, adv, mask, old_logp=old_logp, epsilon=cfg.epsilon,
                                       ref_logp=ref_logp, beta=cfg.beta)
        stop_if_not_finite(accelerator, "loss", loss.detach(), step, sample_ids)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if not torch.isfinite(grad_norm):  # already the global norm: every process sees the same value
            raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm.item()}) for samples "
                                     f"{sample_ids} on process {accelerator.process_index}; stopped before "
                                     f"the optimizer step")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0], **stats}


def completion_rows(step, samples, roll, parts):
    """One completions.jsonl row per sampled completion: what was said and how it was scored.
    ref_p is the reference's confidence in the stated answer (CARE; null without an answer span)."""
    g = len(roll.texts) // len(samples)
    return [{"step": step, "sample_id": s.sample_id, "completion": roll.texts[i * g + j],
             **{name: parts[key][i, j].item() for name, key in (("accuracy", "acc"), ("format", "fmt"),
                                                                  ("bonus", "bonus"), ("advantage", "advantages"))},
             "ref_p": parts["p"][i, j].item() if parts["has_span"][i, j] else None}
            for i, s in enumerate(samples) for j in range(g)]


# ---------------------------------------------------------------------------------------------
# The loop


def check_inputs(cfg):
    """Name a missing --model, --data or --data-root before anything is loaded. A --model that
    looks like a hub id (org/name, no such local directory) is left to from_pretrained."""
    first = cfg.model.split("/")[0]
    local = os.path.isabs(cfg.model) or cfg.model.startswith((".", "~")) or cfg.model.count("/") != 1 \
        or os.path.isdir(first)
    if local and not os.path.isdir(cfg.model):
        raise checkpoint.RunError(f"--model {cfg.model}: no such directory")
    if not os.path.isfile(cfg.data):
        raise checkpoint.RunError(f"--data {cfg.data}: no such file")
    if not os.path.isdir(cfg.data_root):
        raise checkpoint.RunError(f"--data-root {cfg.data_root}: no such directory")


def resolved(cfg):
    """The settings as this machine will really use them, as checkpoints record them: 'auto'
    choices made, paths absolute (a hub id stays as it is)."""
    local = lambda path: os.path.abspath(path) if os.path.exists(path) else path
    return dataclasses.replace(
        cfg, model=local(cfg.model), data=os.path.abspath(cfg.data), data_root=os.path.abspath(cfg.data_root),
        mixed_precision=(("bf16" if torch.cuda.is_available() else "no") if cfg.mixed_precision == "auto"
                         else cfg.mixed_precision),
        attn_implementation=pick_attn_implementation(cfg.attn_implementation))


def check_media(cfg, accelerator, samples, budget):
    """--check-data: decode every video and image now, each process a share, so that a corrupt
    file deep in the epoch does not stop the run hours in. Returns (samples kept, skip messages)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    bad = []
    for i in tqdm(range(rank, len(samples), world), desc="check data", disable=not accelerator.is_main_process):
        try:
            encoding.check_media(samples[i], budget)
        except data.DataError as e:
            bad.append((i, str(e)))
    bad = sorted(gather_object(bad) if world > 1 else bad)
    if bad and not cfg.skip_bad_samples:
        raise data.DataError(f"--check-data: {len(bad)} of {len(samples)} samples cannot be read "
                             f"(--skip-bad-samples skips them); the first: {bad[0][1]}")
    dropped = {i for i, _ in bad}
    return [s for i, s in enumerate(samples) if i not in dropped], [msg for _, msg in bad]


def train(cfg):
    """Check the inputs and the output directory, then run (see run)."""
    check_inputs(cfg)
    resume = checkpoint.resolve_resume(cfg.resume, cfg.output_dir)
    cfg = resolved(cfg)
    accelerator = fsdp.make_accelerator(cfg.mixed_precision)  # FSDP2 when there is more than one process
    if resume:
        changes = checkpoint.check_resume_config(resume, cfg, accelerator.num_processes, cfg.allow_config_change)
        for change in changes:
            accelerator.print(f"changed on resume (--allow-config-change): {change}")
    with checkpoint.locked(cfg.output_dir, accelerator.is_main_process):
        checkpoint.claim(cfg.output_dir, bool(cfg.resume), cfg.overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        return run(cfg, accelerator, resume)


def run(cfg, accelerator, resume):
    random.seed(cfg.seed + accelerator.process_index)
    np.random.seed(cfg.seed + accelerator.process_index)
    torch.manual_seed(cfg.seed + accelerator.process_index)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    budget = encoding.budget_from_checkpoint(
        cfg.model, fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames,
        video_min_pixels=cfg.video_min_pixels, video_max_pixels=cfg.video_max_pixels,
        image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels,
        second_per_grid=cfg.second_per_grid, frame_rounding=cfg.frame_rounding)
    samples, load_skips = data.load_samples(cfg.data, cfg.data_root, seed=cfg.seed, skip_bad=cfg.skip_bad_samples,
                                            allow_outside_root=cfg.allow_outside_data_root)
    if cfg.check_data:
        samples, check_skips = check_media(cfg, accelerator, samples, budget)
        load_skips += check_skips
    for msg in load_skips:
        accelerator.print(f"skipped: {msg}")

    world, p = accelerator.num_processes, cfg.prompts_per_device
    steps_per_epoch = len(samples) // (world * p)
    if steps_per_epoch == 0:
        raise data.DataError(f"{cfg.data}: {len(samples)} samples cannot fill one step of {world} x {p} prompts")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    total_updates = total_steps * cfg.num_iterations

    model = load_policy(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, total_updates)
    # The scheduler stays ours: accelerate's wrapper steps it once per process per call, which
    # would run the cosine num_processes times too fast. Ours counts optimizer steps.
    model, optimizer = accelerator.prepare(model, optimizer)
    # CARE: an EMA reference, updated below. GRPO: a frozen reference, only needed for the KL.
    # Loaded after the policy is sharded, so two full fp32 copies never sit in CPU memory at once.
    ref_model = None
    if cfg.algo == "care" or cfg.beta > 0:
        ref_model = fsdp.prepare_reference(accelerator, reference.make_reference(load_model(cfg)))
    gen_config = rollout.sampling_config(tokenizer, cfg.max_completion_length, cfg.temperature, cfg.top_p,
                                         cfg.top_k, cfg.repetition_penalty)

    state = {"step": 0, "skipped": len(load_skips), "skipped_messages": list(load_skips)}
    if resume:
        state = checkpoint.load(resume, model, ref_model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    elif cfg.resume == "auto":
        accelerator.print(f"no complete checkpoint in {cfg.output_dir}: starting at step 0")

    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    completions_path = os.path.join(cfg.output_dir, "completions.jsonl")
    if accelerator.is_main_process:  # steps after the checkpoint we resume from will run again
        for path in (log_path, completions_path):
            checkpoint.trim_jsonl(path, state["step"])
    bar = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process, desc=cfg.algo)
    policy = accelerator.unwrap_model(model)
    while state["step"] < total_steps:
        t0 = time.time()
        step = state["step"]
        epoch, index = divmod(step, steps_per_epoch)
        indices = shard_order(len(samples), epoch, cfg.seed, accelerator.process_index, world, p)[index]
        skipped = []
        kept, encoded = encode_batch(cfg, samples, indices, tokenizer, budget, skipped)
        batch_samples = [samples[i] for i in kept]
        sample_ids = [s.sample_id for s in batch_samples]
        # What every process kept and skipped: the log and the skip count cover the global batch.
        per_process = gather_object([(sample_ids, skipped)]) if world > 1 else [(sample_ids, skipped)]
        step_ids = [ids for ids, _ in per_process]
        skipped = [msg for _, msgs in per_process for msg in msgs]
        if not all(step_ids):  # every prompt of some rank was skipped; all ranks must stop together
            raise data.DataError(f"step {step + 1}: a process has no readable sample left "
                                 f"(prompts per process: {step_ids}); skipped: {skipped}")
        prompts = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v)
                   for k, v in encoding.collate_prompts(encoded, tokenizer).items()}

        seeds = [rollout_seed(cfg.seed, step, i) for i in kept]
        with phase("rollout", cfg), fsdp.gathered(policy), accelerator.autocast():
            roll = rollout.generate(policy, prompts, tokenizer, cfg.num_generations, gen_config, seeds)
        with phase("reference scoring", cfg), accelerator.autocast():
            parts = score_rollout(cfg, roll, batch_samples, ref_model, tokenizer)
        stop_if_not_finite(accelerator, "reward", parts["reward"], step + 1, sample_ids)
        with phase("policy forward and backward", cfg):
            loss_stats = policy_update(cfg, accelerator, model, optimizer, scheduler, roll, parts["advantages"],
                                       ref_model, step + 1, sample_ids)
        state["step"] = step = step + 1
        if cfg.algo == "care" and step % cfg.ema_every == 0:
            reference.ema_update(ref_model, policy, cfg.ema_decay)

        state["skipped"] += len(skipped)
        state["skipped_messages"] += skipped
        metrics = step_metrics(parts, roll, loss_stats)
        # Average over processes so the log describes the whole global batch.
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, reduction="mean")
        metrics = {"step": step, **dict(zip(keys, values.tolist())), "skipped": state["skipped"],
                   "step_time": time.time() - t0, "samples": step_ids}
        if cfg.log_completions:
            rows = completion_rows(step, batch_samples, roll, parts)
            rows = gather_object(rows) if world > 1 else rows
        if accelerator.is_main_process:
            checkpoint.append_jsonl(log_path, [metrics])
            if cfg.log_completions:
                checkpoint.append_jsonl(completions_path, rows)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics['reward']:.2f}",
                            acc=f"{metrics['reward_acc']:.2f}", bonus=f"{metrics['bonus_rate']:.2f}")
            bar.update(1)
        for msg in skipped:
            accelerator.print(f"skipped: {msg}")
        if step % cfg.save_every == 0 or step == total_steps:
            path = checkpoint.save(cfg, accelerator, model, ref_model, optimizer, scheduler, tokenizer, state)
            accelerator.print(f"saved {path}")
    bar.close()
    if state["skipped"]:
        accelerator.print(f"{state['skipped']} samples were skipped (--skip-bad-samples); see log.jsonl")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    try:
        train(parse_config())
    except (checkpoint.RunError, data.DataError) as e:  # the user's input: one line, no traceback
        raise SystemExit(f"train.py: error: {e}") from None
