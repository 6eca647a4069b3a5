"""Group sampling: G completions per prompt, and the per-token log-probs of those completions.

A rollout is one batch of P prompts (left-padded by data.collate_prompts) and the P*G sampled
completions, row n belonging to prompt n // G. The same rows are later scored by the policy
(with gradient) and by the reference model (CARE's answer likelihood, or GRPO's KL), so the
code that turns a rollout into model inputs lives here too.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class Rollout:
    prompts: dict                  # collated prompt batch for the P prompts (data.collate_prompts)
    completion_ids: torch.Tensor   # [P*G, T] sampled tokens, padded after the end of turn
    completion_mask: torch.Tensor  # [P*G, T] 1.0 up to and including the first <|im_end|>
    truncated: torch.Tensor        # [P*G] bool: never reached <|im_end|> within max_new_tokens
    texts: list                    # [P*G] decoded completions, special tokens stripped
    num_generations: int


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def sampling_config(tokenizer, max_new_tokens, temperature=1.0, top_p=0.95, top_k=0,
                    repetition_penalty=1.0, do_sample=True):
    """Every setting that shapes the sampling distribution, spelled out (SPEC 1.2).

    The visual placeholder tokens are never sampled: an <|image_pad|> inside a completion would
    make the scoring forward look for image features that do not exist. A trained model never
    emits them, so this only matters for random or badly diverged models."""
    return GenerationConfig(
        suppress_tokens=tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, min_new_tokens=0,
        num_beams=1, use_cache=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


@contextmanager
def own_generation_config(model, config):
    """generate() fills every field we leave unset from model.generation_config, i.e. from the
    checkpoint's generation_config.json (Qwen2.5-VL ships top_k=1, top_p=0.001,
    repetition_penalty=1.05 there: near-greedy, which would collapse a GRPO group into G copies
    of one answer). Swap in ours for the call so nothing is inherited, then put theirs back so a
    saved checkpoint keeps its own defaults."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def completion_mask_from_ids(completion_ids, eos_id):
    """1.0 on tokens up to and including the first eos; truncated where there is no eos."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first_eos[:, None]).float()
    return mask, ~has_eos


def model_inputs(prompts):
    """The prompt batch as keyword arguments for a Qwen2.5-VL forward or generate call."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids") + VISUAL_KEYS
    return {k: prompts[k] for k in keys if k in prompts}


@torch.no_grad()
def generate(model, prompts, tokenizer, num_generations, gen_config):
    """Sample num_generations completions for each prompt of the collated batch.

    model is the bare (unwrapped) HF model. transformers encodes each video/image once and
    repeats the features for the G copies of a prompt (num_return_sequences)."""
    was_training = model.training
    model.eval()  # use the KV cache (gradient checkpointing turns it off in train mode)
    with own_generation_config(model, gen_config):
        gen_config.num_return_sequences = num_generations
        out = model.generate(**model_inputs(prompts), generation_config=gen_config)
    model.train(was_training)
    completion_ids = out[:, prompts["input_ids"].shape[1]:]
    if completion_ids.shape[1] == 0:  # max_new_tokens=0: keep shapes valid
        completion_ids = out.new_full((out.shape[0], 1), gen_config.pad_token_id)
    mask, truncated = completion_mask_from_ids(completion_ids, gen_config.eos_token_id)
    texts = [tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
             for ids, m in zip(completion_ids, mask)]
    return Rollout(prompts, completion_ids, mask, truncated, texts, num_generations)


def repeat_prompts(prompts, num_generations):
    """The prompt batch with each prompt repeated G times in place (p0 x G, p1 x G, ...), the row
    order of the completions. Visual tensors are concatenated per prompt, so they are split by
    each prompt's patch count and repeated as whole blocks."""
    g = num_generations
    out = {k: prompts[k].repeat_interleave(g, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid not in prompts:
            continue
        sizes = prompts[grid].prod(-1).tolist()
        blocks = torch.split(prompts[pix], sizes)
        # Each prompt has at most one image and one video, so per-prompt blocks are the visuals.
        out[pix] = torch.cat([b for b in blocks for _ in range(g)])
        out[grid] = prompts[grid].repeat_interleave(g, dim=0)
    if "second_per_grid_ts" in prompts:
        out["second_per_grid_ts"] = prompts["second_per_grid_ts"].repeat_interleave(g, dim=0)
    return out


def sequence_inputs(rollout):
    """Prompt + completion as one batch of P*G full sequences, for scoring."""
    prompts = repeat_prompts(rollout.prompts, rollout.num_generations)
    ids = rollout.completion_ids
    inputs = model_inputs(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], rollout.completion_mask.long()], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(ids)], dim=1).int()
    return inputs


def token_logprobs(logits, targets):
    """log softmax(logits)[target], one row at a time so only one [T, V] fp32 copy exists."""
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets[:, None]).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def completion_logprobs(model, rollout):
    """[P*G, T] log-prob of each sampled completion token under model (grad flows if enabled)."""
    t = rollout.completion_ids.shape[1]
    # logits_to_keep: only the last T+1 positions reach the LM head; the prompt (thousands of
    # video tokens) never gets full-vocabulary logits.
    logits = model(**sequence_inputs(rollout), logits_to_keep=t + 1, use_cache=False).logits
    return token_logprobs(logits[:, :-1], rollout.completion_ids)
