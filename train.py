r"""Train a Qwen2.5-VL (or Qwen2-VL) policy with GRPO-CARE, or with plain GRPO for comparison.

For each prompt, sample a group of G completions. Reward = accuracy + format, plus (CARE) a
consistency bonus for the high-accuracy completions whose reasoning leaves the slowly moving
EMA reference at least as confident in their stated answer as their high-accuracy peers.
Advantages are the rewards normalised within each group; one policy-gradient step (no KL for
CARE); every ema_every steps the reference moves towards the policy. Plain GRPO: no bonus, a
frozen reference and a KL penalty. care.py holds the formulas (docs/algorithm.md explains
them); this file is the loop.

    torchrun --nproc_per_node 4 train.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data SEED-Bench-R1/annotations/training_6k.jsonl --data-root SEED-Bench-R1 --algo care

Every setting is in config.py. The defaults are the official GRPO-CARE settings but for some
deliberate differences (docs/algorithm.md, section 12), which --reproduce-official undoes;
--preset seed-bench-r1 is SEED-Bench-R1's GRPO recipe. With
more than one process the policy and the reference are sharded with FSDP2 (fsdp.py); nothing
else changes. checkpoint.py keeps runs apart and resumable, metrics.py writes the log,
guards.py stops a step that went wrong.
"""

import dataclasses
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import care
import checkpoint
import config
import data
import encoding
import fsdp
import guards
import lora
import metrics
import models
import reference
import rewards
import rollout


# ---------------------------------------------------------------------------------------------
# Setup


def build_optimizer(cfg, model, total_steps, warmup_steps=None):
    """AdamW (no weight decay on norms and biases) and the learning-rate schedule over
    total_steps (cfg.lr_schedule: cosine or linear decay to 0), after warmup_steps of linear
    warmup (default: cfg.warmup_steps; sft.py derives its own)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    warmup_steps = cfg.warmup_steps if warmup_steps is None else warmup_steps
    schedule = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[cfg.lr_schedule]
    scheduler = schedule(optimizer, warmup_steps, total_steps)
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


def rollout_seed(seed, step, sample_index):
    """The sampling seed of one prompt's group, fixed by (run seed, step, prompt): the same
    completions whatever the number of processes, and again after a resume."""
    return random.Random(f"{seed}/{step}/{sample_index}").getrandbits(63)


def update_seed(seed, step, rank):
    """The seed of torch's RNG for one process's update at step (adapter dropout draws from it):
    fixed by (run seed, step, process), so a resumed run draws what the uninterrupted one drew."""
    return random.Random(f"{seed}/{step}/update/{rank}").getrandbits(63)


def check_all_media(cfg, accelerator, samples, budget):
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


def load_data(cfg, accelerator, budget, resume, reasoning_field=None):
    """The training samples in the order that fixes every step's data (shard_order deals them
    out by position): every row checked (data.load_samples), with --check-data every video and
    image decoded, each skip printed. On resume, data other than the checkpoint's (another
    file content, or samples left out or in) is refused (checkpoint.check_resume_data).
    Returns (samples, skip messages, the data record a checkpoint keeps)."""
    samples, skips = data.load_samples(cfg.data, cfg.data_root, seed=cfg.seed, skip_bad=cfg.skip_bad_samples,
                                       allow_outside_root=cfg.allow_outside_data_root, reasoning_field=reasoning_field)
    checked_out = []
    if cfg.check_data:
        kept, check_skips = check_all_media(cfg, accelerator, samples, budget)
        kept_ids = {s.sample_id for s in kept}
        checked_out = [s.sample_id for s in samples if s.sample_id not in kept_ids]
        samples, skips = kept, skips + check_skips
    for message in skips:
        accelerator.print(f"skipped: {message}")
    record = checkpoint.data_record(cfg.data, samples)
    if resume:
        checkpoint.check_resume_data(resume, record, checked_out, cfg.allow_config_change, accelerator.print)
    return samples, skips, record


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class Batch:
    step: int               # 1-based, the step this batch is for
    samples: list           # this process's P' <= P readable samples
    prompts: dict           # their collated prompts, on the device (encoding.collate_prompts)
    seeds: list             # [P'] one sampling seed per group (rollout_seed)
    ids_per_process: list   # the sample ids of every process, for the log
    skipped: list           # messages for the samples skipped at this step, on every process

    @property
    def sample_ids(self):
        return [s.sample_id for s in self.samples]


def next_batch(cfg, accelerator, samples, tokenizer, budget, template, step, steps_per_epoch):
    """This process's prompts for step (0-based): its share of the epoch's shuffled order, read
    and encoded (a sample that cannot be read stops the run, or is skipped and counted with
    --skip-bad-samples), collated on the device, with one sampling seed per prompt."""
    world = accelerator.num_processes
    epoch, index = divmod(step, steps_per_epoch)
    indices = shard_order(len(samples), epoch, cfg.seed, accelerator.process_index, world,
                          cfg.prompts_per_device)[index]
    kept, encoded, skipped = encoding.encode_batch([samples[i] for i in indices], tokenizer, budget,
                                                   cfg.max_prompt_length, cfg.skip_bad_samples, template)
    mine = [samples[indices[k]] for k in kept]
    # What every process kept and skipped: the log and the skip count cover the global batch.
    per_process = [([s.sample_id for s in mine], skipped)]
    per_process = gather_object(per_process) if world > 1 else per_process
    ids_per_process = [ids for ids, _ in per_process]
    skipped = [message for _, messages in per_process for message in messages]
    if not all(ids_per_process):  # every prompt of some process was skipped; all must stop together
        raise data.DataError(f"step {step + 1}: a process has no readable sample left "
                             f"(prompts per process: {ids_per_process}); skipped: {skipped}")
    prompts = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v)
               for k, v in encoding.collate_prompts(encoded, tokenizer).items()}
    seeds = [rollout_seed(cfg.seed, step, indices[k]) for k in kept]
    return Batch(step + 1, mine, prompts, seeds, ids_per_process, skipped)


def score_rollout(cfg, completions, samples, ref_model, tokenizer):
    """Rewards, CARE bonus and group-normalised advantages, all [P, G]. GRPO and CARE give the
    same fields: acc, fmt, bonus, consistent, ref_conf, high_acc, has_span, reward, advantages."""
    p, g = len(samples), cfg.num_generations
    solutions = [s.solution for s in samples for _ in range(g)]                 # [P*G]
    types = [s.problem_type for s in samples for _ in range(g)]                 # [P*G]
    acc, fmt = rewards.score(completions.texts, solutions, types, cfg.reward_rules)
    acc, fmt = torch.tensor(acc).view(p, g), torch.tensor(fmt).view(p, g)       # [P, G] each
    weighted_fmt = cfg.format_weight * fmt                                      # [P, G] w x format
    if cfg.algo == "care":  # the reference's confidence in each stated answer, given the reasoning
        scored = completions    # --reference-input text: the same completions after the prompt's text alone
        if cfg.reference_input == "text":
            scored = dataclasses.replace(completions, prompts=encoding.without_visuals(completions.prompts, tokenizer))
        answer_logp, has_span = reference.answer_logprob(ref_model, scored, tokenizer, cfg.logprob_chunk_size,
                                                         cfg.answer_span)
        fsdp.reshard(ref_model)
        has_span = has_span.cpu().view(p, g)                                     # [P, G]
        scores = care.care_rewards(acc, weighted_fmt, answer_logp.cpu().view(p, g), has_span,
                                   margin=cfg.consistency_margin, bonus_coef=cfg.bonus_coef, conf_cap=cfg.conf_cap)
    else:
        has_span = torch.zeros(p, g, dtype=torch.bool)                          # [P, G]
        scores = care.grpo_rewards(acc, weighted_fmt)
    scores.update(acc=acc, fmt=fmt, has_span=has_span)  # fmt unweighted: the format rate is logged
    scores["advantages"] = care.group_advantages(scores["reward"])              # [P, G]
    return scores


def policy_update(cfg, accelerator, model, optimizer, scheduler, ref_model, completions, advantages, batch):
    """num_iterations optimizer steps on one rollout (1 = the official setting)."""
    adv = advantages.reshape(-1).to(accelerator.device)                         # [P*G]
    mask = completions.completion_mask                                          # [P*G, T]
    chunk = cfg.logprob_chunk_size
    ref_logp = old_logp = None
    if cfg.beta > 0:  # GRPO's KL term
        with torch.no_grad(), accelerator.autocast():
            ref_logp = rollout.completion_logprobs(ref_model, completions, chunk)  # [P*G, T]
        fsdp.reshard(ref_model)
    if cfg.num_iterations > 1:  # the PPO ratio's denominator
        with torch.no_grad(), accelerator.autocast():
            old_logp = rollout.completion_logprobs(model, completions, chunk)      # [P*G, T]
    for _ in range(cfg.num_iterations):
        with accelerator.autocast():
            logp = rollout.completion_logprobs(model, completions, chunk)          # [P*G, T]
        loss, stats = care.policy_loss(logp, adv, mask, old_logp=old_logp, epsilon=cfg.epsilon,
                                       ref_logp=ref_logp, beta=cfg.beta, kl_clamp=cfg.kl_clamp)
        guards.stop_if_not_finite(accelerator, "loss", loss.detach(), batch.step, batch.sample_ids)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = guards.finite_grad_norm(accelerator, grad_norm, batch.step, batch.sample_ids)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], **stats}


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg):
    """Check the inputs and the output directory, then run (see run)."""
    with checkpoint.opened_run(cfg) as (cfg, accelerator, resume):
        return run(cfg, accelerator, resume)


def run(cfg, accelerator, resume):
    for seed_rng in (random.seed, np.random.seed, torch.manual_seed):
        seed_rng(cfg.seed + accelerator.process_index)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    budget = encoding.budget_from_checkpoint(cfg.model, **{f.name: getattr(cfg, f.name)
                                                           for f in dataclasses.fields(encoding.VisualBudget) if hasattr(cfg, f.name)})
    template = encoding.prompt_template(cfg.prompt_template)
    samples, load_skips, data_record = load_data(cfg, accelerator, budget, resume)
    if problem := rewards.check_rules_cover(cfg.reward_rules, {s.problem_type for s in samples}):
        raise data.DataError(f"{cfg.data}: --reward-rules {cfg.reward_rules}: {problem}")
    steps_per_epoch = len(samples) // (accelerator.num_processes * cfg.prompts_per_device)
    if steps_per_epoch == 0:
        raise data.DataError(f"{cfg.data}: {len(samples)} samples cannot fill one step of "
                             f"{accelerator.num_processes} x {cfg.prompts_per_device} prompts")
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(steps_per_epoch * cfg.epochs,
                                                                              cfg.max_steps)

    model = models.load_policy(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps * cfg.num_iterations)
    # The scheduler stays ours: accelerate's wrapper steps it once per process per call, which
    # would run the cosine num_processes times too fast. Ours counts optimizer steps.
    model, optimizer = fsdp.prepare_policy(accelerator, model, optimizer)
    policy = accelerator.unwrap_model(model)
    # CARE: an EMA reference, updated below. GRPO: a frozen reference, only needed for the KL.
    # Loaded after the policy is sharded, so two full fp32 copies never sit in CPU memory at once.
    # Under LoRA both are views of the policy's frozen base (lora.Reference): no second model.
    ref_model = None
    if cfg.lora_rank > 0:
        ref_model = lora.make_reference(cfg, policy)
    elif cfg.algo == "care" or cfg.beta > 0:
        ref_model = fsdp.prepare_reference(accelerator, reference.make_reference(
            models.load_model(cfg.model, cfg.attn_implementation)))
    gen_config = rollout.sampling_config(tokenizer, cfg.max_completion_length, cfg.temperature, cfg.top_p,
                                         cfg.top_k, cfg.repetition_penalty, stop=rollout.stop_ids(tokenizer, policy))
    state = {"step": 0, "skipped": len(load_skips), "skipped_messages": list(load_skips), "data": data_record}
    if resume:
        state = checkpoint.load(resume, model, ref_model, optimizer, scheduler, state)
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    elif cfg.resume == "auto":
        accelerator.print(f"no complete checkpoint in {cfg.output_dir}: starting at step 0")
    log = metrics.RunLog(cfg, accelerator, state["step"], total_steps, state.get("log_rows"))

    while state["step"] < total_steps:
        t0 = time.time()
        batch = next_batch(cfg, accelerator, samples, tokenizer, budget, template, state["step"], steps_per_epoch)
        # 1. Generate: G completions per prompt, sampled by the policy.
        with guards.oom_hint("rollout", cfg), fsdp.gathered(policy), accelerator.autocast():
            completions = rollout.generate(policy, batch.prompts, tokenizer, cfg.num_generations, gen_config,
                                           batch.seeds, decode=cfg.decode)
        # 2. Rewards, the CARE bonus (the reference scores each stated answer) and advantages, [P, G].
        with guards.oom_hint("reference scoring", cfg), accelerator.autocast():
            scores = score_rollout(cfg, completions, batch.samples, ref_model, tokenizer)
        guards.stop_if_not_finite(accelerator, "reward", scores["reward"], batch.step, batch.sample_ids)
        # 3. Update the policy on its own samples.
        torch.manual_seed(update_seed(cfg.seed, batch.step, accelerator.process_index))
        with guards.oom_hint("policy forward and backward", cfg):
            update = policy_update(cfg, accelerator, model, optimizer, scheduler, ref_model, completions,
                                   scores["advantages"], batch)
        # 4. Move the EMA reference towards the policy (CARE; GRPO's reference stays frozen).
        if cfg.algo == "care" and batch.step % cfg.ema_every == 0:
            reference.ema_update(ref_model, policy, cfg.ema_decay)
        # 5. Log and save.
        state.update(step=batch.step, skipped=state["skipped"] + len(batch.skipped),
                     skipped_messages=state["skipped_messages"] + batch.skipped)
        state["log_rows"] = log.write(batch.step, batch, completions, scores, update, state["skipped"],
                                      time.time() - t0)  # kept by the step's checkpoint
        if batch.step % cfg.save_every == 0 or batch.step == total_steps:
            path = checkpoint.save(cfg, accelerator, model, ref_model, optimizer, scheduler, tokenizer, state)
            accelerator.print(f"saved {path}")
    log.close()
    if state["skipped"]:
        accelerator.print(f"{state['skipped']} samples were skipped (--skip-bad-samples); see log.jsonl")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    try:
        train(config.parse_config(doc=__doc__))
    except (checkpoint.RunError, data.DataError) as e:  # the user's input: one line, no traceback
        raise SystemExit(f"train.py: error: {e}") from None
