r"""Supervised fine-tuning on chains of thought: SEED-Bench-R1's SFT baseline, and a warm start
for train.py.

Each sample is the prompt train.py samples from (encoding.chat_prompt: video, image, question,
lettered options, thinking instruction) followed by the reply train.py rewards:

    <think>{the row's reasoning}</think><answer>{the option letter}</answer><|im_end|>

A row without reasoning trains on the answer alone, <think></think><answer>X</answer>, still
the rewarded template; the run says how many rows did. The loss is the cross-entropy of the
reply's tokens only, averaged over every reply token of the optimizer step (all micro-batches,
all processes), so 16 micro-batches of 1 give the gradient of one batch of 16.

    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2-VL-7B-Instruct \
        --data SEED-Bench-R1/annotations/training_with_cot_6k.jsonl --data-root SEED-Bench-R1
    torchrun --nproc_per_node 4 train.py --model runs/sft/checkpoint-NNNNNN/policy ...  # RL after SFT

The defaults are SEED-Bench-R1's published SFT recipe (scripts/qwen2vl_sft_config.yaml): lr
2e-5, cosine schedule, warmup ratio 0.1, 1 epoch, 1 sample per process x 16 accumulation
steps, bf16, gradient checkpointing, 8192 tokens, seed 42; weight decay 0 and gradient clip 1.0
are the Hugging Face Trainer defaults it keeps. Unlike it, the weights stay in fp32 with bf16
compute (as in train.py), a sample longer than --max-length is an error (or a counted skip),
not cut, and the end of an epoch that cannot fill a whole step is dropped. Everything else is
train.py's, through the same functions: data (data.py), prompt and visual budget
(encoding.py), FSDP2 with more than one process (fsdp.py), the run directory, atomic
checkpoints with exact resume and the Hugging Face export in checkpoint-NNNNNN/policy
(checkpoint.py), which train.py and evaluate.py take as --model.
"""

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import AutoTokenizer

import checkpoint
import config
import data
import encoding
import fsdp
import guards
import metrics
import models
import rollout
import train
from config import setting

# ---------------------------------------------------------------------------------------------
# Settings

TRAIN_SETTINGS = {f.name: f for f in dataclasses.fields(config.Config)}


def as_in_train(name):
    """train.py's setting of that name, with its default and help line."""
    f = TRAIN_SETTINGS[name]
    return setting(f.default, f.metadata["help"])


@dataclass
class SFTConfig:
    model: str = setting("Qwen/Qwen2-VL-7B-Instruct", "initial model: a local checkpoint directory or a hub id "
                                                      "(the published recipe fine-tunes Qwen2-VL-7B-Instruct)")
    data: str = setting("SEED-Bench-R1/annotations/training_with_cot_6k.jsonl",
                        "training annotations, train.py's layouts, with a chain of thought per row")
    data_root: str = as_in_train("data_root")
    reasoning_field: str = setting("response", "the row field holding the chain of thought (the public SFT code "
                                               "reads each row's reply from 'response'); a reply in the "
                                               "<think>...</think><answer>...</answer> form gives its <think> "
                                               "part; a row without the field, or with null or blank text, "
                                               "trains on the answer alone")
    output_dir: str = setting("runs/sft", "where log.jsonl and the checkpoints go (one run per directory)")
    seed: int = setting(42, "fixes the data order, the options drawn for each sample (as in train.py) and the "
                            "initial RNG state")
    # batch: B samples per forward and backward, A of those per optimizer step, on each process
    per_device_batch_size: int = setting(1, "B: samples per process in one forward and backward (a micro-batch)")
    gradient_accumulation_steps: int = setting(16, "A: micro-batches per optimizer step "
                                                   "(global batch = processes x B x A)")
    epochs: int = as_in_train("epochs")
    max_steps: int = setting(-1, "stop after this many optimizer steps if > 0 (also sets the schedule's length)")
    max_length: int = setting(8192, "most tokens in a sample, prompt (text and visual) and reply together; "
                                    "a longer sample is a data error")
    # optimizer
    lr: float = setting(2e-5, "peak learning rate (AdamW; linear warmup, then cosine decay to 0)")
    warmup_ratio: float = setting(0.1, "share of the optimizer steps spent in linear warmup (rounded up)")
    weight_decay: float = setting(0.0, "AdamW weight decay, not on norms and biases (the recipe keeps the "
                                       "Hugging Face Trainer's 0)")
    adam_beta1: float = as_in_train("adam_beta1")
    adam_beta2: float = as_in_train("adam_beta2")
    adam_eps: float = as_in_train("adam_eps")
    max_grad_norm: float = setting(1.0, "gradient-norm clip (the recipe keeps the Hugging Face Trainer's 1.0)")
    lr_schedule: str = as_in_train("lr_schedule")
    freeze_vision: bool = setting(False, "do not train the vision tower (the recipe trains it)")
    lora_rank: int = as_in_train("lora_rank")
    lora_alpha: float = as_in_train("lora_alpha")
    lora_dropout: float = as_in_train("lora_dropout")
    lora_target_modules: str = as_in_train("lora_target_modules")
    lora_vision: bool = as_in_train("lora_vision")
    gradient_checkpointing: bool = as_in_train("gradient_checkpointing")
    logprob_chunk_size: int = setting(1024, "reply tokens per LM-head chunk (bounds the logits' memory)")
    mixed_precision: str = as_in_train("mixed_precision")
    attn_implementation: str = as_in_train("attn_implementation")
    # visual budget: train.py's
    fps: float = as_in_train("fps")
    min_frames: int = as_in_train("min_frames")
    max_frames: int = as_in_train("max_frames")
    video_min_pixels: int = as_in_train("video_min_pixels")
    video_max_pixels: int = as_in_train("video_max_pixels")
    image_min_pixels: int = as_in_train("image_min_pixels")
    image_max_pixels: int = as_in_train("image_max_pixels")
    second_per_grid: float = as_in_train("second_per_grid")
    frame_rounding: str = as_in_train("frame_rounding")
    resize_rule: str = as_in_train("resize_rule")
    resize_to: int = as_in_train("resize_to")
    prompt_template: str = as_in_train("prompt_template")
    # data checks
    skip_bad_samples: bool = setting(False, "skip (and count) unreadable or too long samples instead of stopping")
    check_data: bool = as_in_train("check_data")
    allow_outside_data_root: bool = as_in_train("allow_outside_data_root")
    # bookkeeping
    save_every: int = setting(50, "optimizer steps between checkpoints (the last step is always saved)")
    keep_last: int = as_in_train("keep_last")
    resume: str = as_in_train("resume")
    overwrite: bool = as_in_train("overwrite")
    allow_config_change: bool = as_in_train("allow_config_change")
    report_to: str = as_in_train("report_to")


# Samples per process per optimizer step = their product; each may change on resume as long as
# the global batch does not (checkpoint.config_changes).
BATCH_FIELDS = ("per_device_batch_size", "gradient_accumulation_steps")


def check_settings(cfg):
    """SFT's own ranges, then train.py's checks (config.check_settings) of every setting the two
    share, run on a train.py Config that takes our values where the names match."""
    shared = config.Config(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in TRAIN_SETTINGS})
    return [
        (cfg.per_device_batch_size >= 1, f"--per-device-batch-size must be >= 1, got {cfg.per_device_batch_size}"),
        (cfg.gradient_accumulation_steps >= 1,
         f"--gradient-accumulation-steps must be >= 1, got {cfg.gradient_accumulation_steps}"),
        (cfg.max_length >= 1, f"--max-length must be >= 1, got {cfg.max_length}"),
        (0 <= cfg.warmup_ratio <= 1, f"--warmup-ratio must be in [0, 1], got {cfg.warmup_ratio}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (bool(cfg.reasoning_field.strip()), "--reasoning-field must name a field"),
    ] + config.check_settings(shared)


def parse_config(argv=None, doc=None):
    """SFTConfig from the command line (doc: the --help text, this file's docstring)."""
    return config.parse(SFTConfig, argv, doc=doc, checks=check_settings)


# ---------------------------------------------------------------------------------------------
# Samples as prompt + reply


def target_text(sample):
    """The reply SFT teaches: the template train.py rewards, with the sample's reasoning (empty
    without one) and its answer, then the end of turn."""
    return f"<think>{sample.reasoning or ''}</think><answer>{sample.solution}</answer><|im_end|>"


@dataclass
class Example:
    sample: data.Sample
    prompt: dict            # encoding.encode_prompt's output: ids [L] with the visuals expanded, patches
    target: torch.Tensor    # [T] the reply's token ids, <|im_end|> last


def encode_examples(cfg, samples, tokenizer, budget, template=encoding.OURS):
    """Each sample's prompt (encoding.encode_batch) and reply. A sample that cannot be read, or
    whose prompt and reply are longer than --max-length together, raises its DataError, or with
    --skip-bad-samples is left out and named in skipped. Returns (examples, skipped)."""
    kept, prompts, skipped = encoding.encode_batch(samples, tokenizer, budget, skip_bad=cfg.skip_bad_samples,
                                                   template=template)
    examples = []
    for i, prompt in zip(kept, prompts):
        target = torch.tensor(tokenizer(target_text(samples[i]), add_special_tokens=False)["input_ids"])
        length = len(prompt["input_ids"]) + len(target)
        if length > cfg.max_length:
            error = data.DataError(f"sample {samples[i].sample_id}: {length} tokens (prompt {len(prompt['input_ids'])}"
                                   f" + reply {len(target)}), more than --max-length {cfg.max_length} "
                                   f"(lower the frame or pixel budget)")
            if not cfg.skip_bad_samples:
                raise error
            skipped.append(str(error))
            continue
        examples.append(Example(samples[i], prompt, target))
    return examples, skipped


def as_rollout(examples, tokenizer, device):
    """A micro-batch as a rollout.Rollout whose one "completion" per prompt is its reply, so
    that rollout.completion_logprobs scores the replies with train.py's forward: prompt and
    reply in one row, the LM head run on the reply's positions only, in chunks. A prompt's
    thousands of video tokens never get full-vocabulary logits."""
    prompts = encoding.collate_prompts([e.prompt for e in examples], tokenizer)
    prompts = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in prompts.items()}
    pad = lambda xs, value: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=value).to(device)
    ids = pad([e.target for e in examples], tokenizer.pad_token_id)                  # [B, T]
    mask = pad([torch.ones(len(e.target)) for e in examples], 0.0)                   # [B, T]
    return rollout.Rollout(prompts, ids, mask, torch.zeros(len(examples), dtype=torch.bool),
                           [target_text(e.sample) for e in examples], num_generations=1)


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class Step:
    step: int               # 1-based, the optimizer step this is for
    micro_batches: list     # [A] (examples, weight): weight 0 marks a stand-in (see next_step)
    tokens: int             # reply tokens of the whole step, on all processes: the loss's denominator
    ids_per_process: list   # the sample ids of every process, for the log
    skipped: list           # messages for the samples skipped at this step, on every process

    @property
    def sample_ids(self):
        return [e.sample.sample_id for examples, weight in self.micro_batches if weight for e in examples]


def next_step(cfg, accelerator, samples, tokenizer, budget, step, steps_per_epoch, template=encoding.OURS):
    """This process's A micro-batches for step (0-based): its B x A samples of the epoch's
    shuffled order (train.shard_order, train.py's deal), encoded and cut into micro-batches."""
    world, b, a = accelerator.num_processes, cfg.per_device_batch_size, cfg.gradient_accumulation_steps
    epoch, index = divmod(step, steps_per_epoch)
    indices = train.shard_order(len(samples), epoch, cfg.seed, accelerator.process_index, world, b * a)[index]
    examples, skipped = encode_examples(cfg, [samples[i] for i in indices], tokenizer, budget, template)
    # What every process kept and skipped: the log and the skip count cover the global batch.
    per_process = [([e.sample.sample_id for e in examples], skipped)]
    per_process = gather_object(per_process) if world > 1 else per_process
    ids_per_process = [ids for ids, _ in per_process]
    skipped = [message for _, messages in per_process for message in messages]
    if not all(ids_per_process):  # every sample of some process was skipped; all must stop together
        raise data.DataError(f"step {step + 1}: a process has no readable sample left "
                             f"(samples per process: {ids_per_process}); skipped: {skipped}")
    micro_batches = [(examples[k:k + b], 1.0) for k in range(0, len(examples), b)]
    # Every process runs A forwards and backwards, as under FSDP each takes part in the others'
    # collectives: where skipped samples left fewer, a kept one runs again with weight 0.
    micro_batches += [(examples[:1], 0.0)] * (a - len(micro_batches))
    tokens = torch.tensor([sum(len(e.target) for e in examples)], device=accelerator.device)
    tokens = accelerator.reduce(tokens, reduction="sum") if world > 1 else tokens
    return Step(step + 1, micro_batches, int(tokens.item()), ids_per_process, skipped)


def accumulate(cfg, accelerator, model, tokenizer, micro_batches, tokens, step=0):
    """Forward and backward over the micro-batches, their gradients summed in .grad. Each one's
    loss is its replies' summed negative log-likelihood divided by `tokens`, the reply tokens
    of the whole step on all processes, and multiplied by the process count, because FSDP
    averages the processes' gradients: the sum is the gradient of the token-mean cross-entropy
    over the global batch, however it is cut into micro-batches and processes. Under FSDP every
    backward reduce-scatters its gradients into the shards (accumulating unsharded gradients
    instead, with no_sync, would hold a full fp32 copy of them). Returns this process's summed
    negative log-likelihood."""
    nll_sum = 0.0
    for examples, weight in micro_batches:
        batch = as_rollout(examples, tokenizer, accelerator.device)
        with accelerator.autocast():
            logp = rollout.completion_logprobs(model, batch, cfg.logprob_chunk_size)   # [B, T], 0 on padding
        nll = -logp.sum() * weight
        guards.stop_if_not_finite(accelerator, "loss", nll.detach(), step, [e.sample.sample_id for e in examples])
        accelerator.backward(nll * accelerator.num_processes / tokens)
        nll_sum += nll.item()
    return nll_sum


OOM_ADVICE = ("lower --max-frames, --video-max-pixels, --image-max-pixels or --max-length, or "
              "--logprob-chunk-size; keep --gradient-checkpointing on")


# ---------------------------------------------------------------------------------------------
# The run


def sft(cfg):
    """Check the inputs and the output directory, then run (see run)."""
    with checkpoint.opened_run(cfg, BATCH_FIELDS) as (cfg, accelerator, resume):
        return run(cfg, accelerator, resume)


def run(cfg, accelerator, resume):
    for seed_rng in (random.seed, np.random.seed, torch.manual_seed):
        seed_rng(cfg.seed + accelerator.process_index)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    budget = encoding.budget_from_checkpoint(cfg.model, **{f.name: getattr(cfg, f.name) for f in
                                                           dataclasses.fields(encoding.VisualBudget) if hasattr(cfg, f.name)})
    template = encoding.prompt_template(cfg.prompt_template)
    samples, load_skips, data_record = train.load_data(cfg, accelerator, budget, resume, cfg.reasoning_field)
    answer_only = sum(s.reasoning is None for s in samples)
    accelerator.print(f"{answer_only} of {len(samples)} samples have no reasoning in '{cfg.reasoning_field}': "
                      f"they train on the answer alone")
    if samples and answer_only == len(samples):
        accelerator.print(f"warning: no sample has reasoning in '{cfg.reasoning_field}'; is --reasoning-field right?")
    per_step = accelerator.num_processes * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = len(samples) // per_step
    if steps_per_epoch == 0:
        raise data.DataError(f"{cfg.data}: {len(samples)} samples cannot fill one step of {accelerator.num_processes}"
                             f" x {cfg.per_device_batch_size} x {cfg.gradient_accumulation_steps} samples")
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(steps_per_epoch * cfg.epochs,
                                                                              cfg.max_steps)

    model = models.load_policy(cfg)
    optimizer, scheduler = train.build_optimizer(cfg, model, total_steps, math.ceil(cfg.warmup_ratio * total_steps))
    model, optimizer = fsdp.prepare_policy(accelerator, model, optimizer)  # the scheduler stays ours, as in train.py
    state = {"step": 0, "skipped": len(load_skips), "skipped_messages": list(load_skips), "data": data_record}
    if resume:
        state = checkpoint.load(resume, model, None, optimizer, scheduler, state)
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    elif cfg.resume == "auto":
        accelerator.print(f"no complete checkpoint in {cfg.output_dir}: starting at step 0")
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    if accelerator.is_main_process:
        # A resumed run logs the later steps again; the checkpoint's step has its row from the checkpoint.
        checkpoint.trim_jsonl(log_path, state["step"], state.get("log_rows", {}).get("log.jsonl"))
    bar = tqdm(total=total_steps, initial=state["step"], disable=not accelerator.is_main_process, desc="sft")
    reporters = metrics.Reporters(cfg, accelerator.is_main_process, state["step"])  # --report-to

    while state["step"] < total_steps:
        t0 = time.time()
        step = next_step(cfg, accelerator, samples, tokenizer, budget, state["step"], steps_per_epoch, template)
        # 1. Forward and backward, micro-batch by micro-batch; gradients add up in .grad.
        torch.manual_seed(train.update_seed(cfg.seed, step.step, accelerator.process_index))  # exact on resume
        with guards.oom_hint("forward and backward", cfg, OOM_ADVICE):
            nll = accumulate(cfg, accelerator, model, tokenizer, step.micro_batches, step.tokens, step.step)
        # 2. One optimizer step.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = guards.finite_grad_norm(accelerator, grad_norm, step.step, step.sample_ids)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 3. Log (the loss: token-mean cross-entropy of the global batch) and save.
        nll = torch.tensor([nll], dtype=torch.float64, device=accelerator.device)
        nll = accelerator.reduce(nll, reduction="sum") if accelerator.num_processes > 1 else nll
        state.update(step=step.step, skipped=state["skipped"] + len(step.skipped),
                     skipped_messages=state["skipped_messages"] + step.skipped)
        row = {"step": step.step, "loss": nll.item() / step.tokens, "lr": scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens": step.tokens, "skipped": state["skipped"],
               "step_time": time.time() - t0, "samples": step.ids_per_process}
        state["log_rows"] = {"log.jsonl": [row]}  # kept by the step's checkpoint
        if accelerator.is_main_process:
            checkpoint.append_jsonl(log_path, [row])
            reporters.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            bar.update(1)
        for message in step.skipped:
            accelerator.print(f"skipped: {message}")
        if step.step % cfg.save_every == 0 or step.step == total_steps:
            path = checkpoint.save(cfg, accelerator, model, None, optimizer, scheduler, tokenizer, state)
            accelerator.print(f"saved {path}")
    bar.close()
    reporters.close()
    if state["skipped"]:
        accelerator.print(f"{state['skipped']} samples were skipped (--skip-bad-samples); see log.jsonl")
    accelerator.end_training()
    return state


if __name__ == "__main__":
    try:
        sft(parse_config(doc=__doc__))
    except (checkpoint.RunError, data.DataError) as e:  # the user's input: one line, no traceback
        raise SystemExit(f"sft.py: error: {e}") from None
