"""Train a Qwen2.5-VL policy with GRPO-CARE (or plain GRPO, for comparison).

One step, per process: take P prompts, sample G completions each, reward them (accuracy +
format, plus CARE's consistency bonus scored by the EMA reference), normalise rewards within
each prompt's group, take one policy-gradient step, and every ema_every steps move the
reference towards the policy. ../SPEC.md section 1 is this loop in formulas.

    torchrun --nproc_per_node 4 train.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data SEED-Bench-R1/annotations/training_6k.jsonl --data-root SEED-Bench-R1 --algo care

Every default below is the SPEC's official setting; every field is a --flag. With more than one
process the policy and the reference are sharded with FSDP2 (fsdp.py); nothing else changes.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
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
import data
import fsdp
import reference
import rewards
import rollout


@dataclass
class Config:
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # local path or hub id of the initial policy
    data: str = "SEED-Bench-R1/annotations/training_6k.jsonl"
    data_root: str = "SEED-Bench-R1"
    output_dir: str = "runs/care"
    algo: str = "care"                   # care | grpo
    seed: int = 42
    # batch: P prompts per process, G completions per prompt
    prompts_per_device: int = 1
    num_generations: int = 8
    epochs: int = 1
    max_steps: int = -1                  # > 0 stops early (counts optimizer steps)
    # rollout (SPEC 1.2)
    max_prompt_length: int = 16384
    max_completion_length: int = 768
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    # reward and CARE (SPEC 1.3-1.5)
    bonus_coef: float = 0.5
    conf_cap: float = 0.95
    consistency_margin: float = 0.0      # 0.01 when targeting general video benchmarks
    ema_decay: float = 0.995
    ema_every: int = 10
    # loss (SPEC 1.7); beta < 0 means "the algorithm's default": 0 for care, 0.04 for grpo
    num_iterations: int = 1
    epsilon: float = 0.2
    beta: float = -1.0
    # optimizer (SPEC 1.8)
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 5.0
    freeze_vision: bool = False
    gradient_checkpointing: bool = True
    logprob_chunk_size: int = 1024       # completion tokens per LM-head chunk when scoring (bounds logits memory)
    mixed_precision: str = "auto"        # auto (bf16 on GPU, no on CPU) | bf16 | no
    attn_implementation: str = "auto"    # auto (flash_attention_2 if installed, else sdpa) | sdpa | eager
    # visual budgets (SPEC section 3)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    video_min_pixels: int = 4 * 28 * 28
    video_max_pixels: int = 128 * 28 * 28
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28
    # bookkeeping
    save_every: int = 500
    resume: str = ""                     # a checkpoint dir, or "auto" for the latest in output_dir
    skip_bad_samples: bool = False       # skip (and count) unreadable samples instead of stopping
    log_completions: bool = False        # also write every completion and its rewards to completions.jsonl


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.algo not in ("care", "grpo"):
        parser.error(f"--algo must be care or grpo, got {cfg.algo!r}")
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
            enc = data.encode_prompt(samples[i], tokenizer, budget)
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


def append_jsonl(path, rows):
    with open(path, "a") as f:  # NaN (e.g. no answer span in the batch) -> null
        for row in rows:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}) + "\n")


def trim_jsonl(path, step):
    """Drop the rows of steps after `step`: a resumed run logs them again."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Checkpoints (fsdp.py): sharded state for exact resume, plus a Hugging Face export of the policy.


def save_checkpoint(cfg, accelerator, model, ref_model, optimizer, scheduler, tokenizer, state):
    tmp, commit = fsdp.atomic_dir(os.path.join(cfg.output_dir, f"checkpoint-{state['step']:06d}"), accelerator)
    fsdp.save_sharded(tmp, model, optimizer, ref_model)
    policy_dir = fsdp.export_policy(os.path.join(tmp, "policy"), model, accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(policy_dir)
        preproc = os.path.join(cfg.model, "preprocessor_config.json")
        if os.path.exists(preproc):
            shutil.copy(preproc, policy_dir)
        # The step fixes the data position and every sampling seed, so with the shards and the
        # scheduler it is all a resume needs.
        torch.save({"scheduler": scheduler.state_dict(), **state}, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    return commit()


def latest_checkpoint(output_dir):
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and not n.endswith(".tmp")) \
        if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, names[-1]) if names else None


def load_checkpoint(path, model, ref_model, optimizer, scheduler):
    fsdp.load_sharded(path, model, optimizer, ref_model)
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg):
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = fsdp.make_accelerator(mixed)  # FSDP2 when there is more than one process
    random.seed(cfg.seed + accelerator.process_index)
    np.random.seed(cfg.seed + accelerator.process_index)
    torch.manual_seed(cfg.seed + accelerator.process_index)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    budget = data.budget_from_checkpoint(
        cfg.model, fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames,
        video_min_pixels=cfg.video_min_pixels, video_max_pixels=cfg.video_max_pixels,
        image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels)
    samples, load_skips = data.load_samples(cfg.data, cfg.data_root, seed=cfg.seed, skip_bad=cfg.skip_bad_samples)
    for msg in load_skips:
        accelerator.print(f"skipped: {msg}")

    world, p = accelerator.num_processes, cfg.prompts_per_device
    steps_per_epoch = len(samples) // (world * p)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} samples cannot fill one step of {world} x {p} prompts")
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
    resume = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if resume:
        state = load_checkpoint(resume, model, ref_model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume} at step {state['step']}")

    os.makedirs(cfg.output_dir, exist_ok=True)
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    completions_path = os.path.join(cfg.output_dir, "completions.jsonl")
    if accelerator.is_main_process:  # steps after the checkpoint we resume from will run again
        for path in (log_path, completions_path):
            trim_jsonl(path, state["step"])
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
        step_ids = gather_object([sample_ids]) if world > 1 else [sample_ids]
        if not all(step_ids):  # every prompt of some rank was skipped; all ranks must stop together
            raise data.DataError(f"step {step + 1}: a process has no readable sample left "
                                 f"(prompts per process: {step_ids}); skipped here: {skipped}")
        prompts = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v)
                   for k, v in data.collate_prompts(encoded, tokenizer).items()}

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
            append_jsonl(log_path, [metrics])
            if cfg.log_completions:
                append_jsonl(completions_path, rows)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics['reward']:.2f}",
                            acc=f"{metrics['reward_acc']:.2f}", bonus=f"{metrics['bonus_rate']:.2f}")
            bar.update(1)
        for msg in skipped:
            accelerator.print(f"skipped: {msg}")
        if step % cfg.save_every == 0 or step == total_steps:
            path = save_checkpoint(cfg, accelerator, model, ref_model, optimizer, scheduler, tokenizer, state)
            accelerator.print(f"saved {path}")
    bar.close()
    if state["skipped"]:
        accelerator.print(f"{state['skipped']} samples were skipped (--skip-bad-samples); see log.jsonl")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    train(parse_config())
