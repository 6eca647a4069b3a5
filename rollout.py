"""Group sampling: G completions per prompt, and the per-token log-probs of those completions.

A rollout is one batch of P prompts (left-padded by data.collate_prompts) and the P*G sampled
completions, row n belonging to prompt n // G. The same rows are later scored by the policy
(with gradient) and by the reference model (CARE's answer likelihood, or GRPO's KL), so the
code that turns a rollout into model inputs lives here too.
"""

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
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
def generate(model, prompts, tokenizer, num_generations, gen_config, seeds=None, share=True):
    """Sample num_generations completions for each prompt of the collated batch.

    seeds=None: one generate call for the whole batch (evaluation). With one seed per prompt
    (training), each prompt's group is sampled on its own right after torch.manual_seed(seed):
    the completions a prompt gets then depend on (run seed, step, prompt) only, not on which
    rank it landed on or which prompts share its batch, so a 2-process run samples exactly what
    a 1-process run with the same global batch samples, and a resumed run what the
    uninterrupted run would have. Each group's prompt is encoded and prefilled once and the G
    samples continue from copies of its KV cache (share=False: the prompt repeated G times, the
    public code's way, kept as the baseline for bench/step.py)."""
    was_training = model.training
    model.eval()  # use the KV cache (gradient checkpointing turns it off in train mode)
    g = num_generations
    rows = []
    with own_generation_config(model, gen_config):
        if seeds is None:
            gen_config.num_return_sequences = g
            out = model.generate(**model_inputs(prompts), generation_config=gen_config)
            rows.extend(out[:, prompts["input_ids"].shape[1]:])
        for i, seed in enumerate(seeds or []):
            one = select_prompt(prompts, i)
            torch.manual_seed(seed)
            gen_config.num_return_sequences = 1
            if share:
                out = model.generate(**prefilled(model, one, g), generation_config=gen_config)
            else:
                out = model.generate(**model_inputs(repeat_prompts(one, g)), generation_config=gen_config)
            rows.extend(out[:, one["input_ids"].shape[1]:])
    model.train(was_training)
    pad = gen_config.pad_token_id
    if max(len(r) for r in rows) == 0:  # max_new_tokens=0: keep shapes valid
        rows = [r.new_full((1,), pad) for r in rows]
    # Groups of different prompts can stop at different lengths: pad after the end of turn.
    completion_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    mask, truncated = completion_mask_from_ids(completion_ids, gen_config.eos_token_id)
    texts = [tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
             for ids, m in zip(completion_ids, mask)]
    return Rollout(prompts, completion_ids, mask, truncated, texts, num_generations)


def prefilled(model, prompt, num_generations):
    """generate() inputs for G samples of one prompt whose video, image and text (all but the
    last token) went through the model once: its KV cache, copied G times, is passed as
    past_key_values, so generate() only runs the last prompt token and the new ones. Without
    this, generate() expands the prompt to G rows first and prefills it G times."""
    g = num_generations
    text = ("input_ids", "attention_mask", "mm_token_type_ids")
    head = {k: (v[:, :-1] if k in text else v) for k, v in model_inputs(prompt).items()}
    model.model.rope_deltas = None  # left over from an earlier call: not this prompt's
    cache = model(**head, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(g)
    # The prefill left the prompt's 3D-RoPE offset in model.model.rope_deltas (one row, which
    # generate() broadcasts over the G rows): the new tokens continue the prompt's positions.
    return {**{k: prompt[k].repeat_interleave(g, dim=0) for k in text}, "past_key_values": cache}


def select_prompt(prompts, i):
    """Prompt i of a collated batch as a batch of its own: left padding removed, and its own
    image and video patches (the visual tensors are concatenated over the prompts that have
    one, in prompt order)."""
    keep = prompts["attention_mask"][i].bool()
    out = {k: prompts[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    mm = prompts["mm_token_type_ids"]
    for kind, pix, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        has = (mm == kind).any(dim=1)  # which prompts carry this kind of visual
        if grid not in prompts or not has[i]:
            continue
        row = int(has[:i].sum())
        sizes = prompts[grid].prod(-1).tolist()
        start = sum(sizes[:row])
        out[pix] = prompts[pix][start:start + sizes[row]]
        out[grid] = prompts[grid][row:row + 1]
        if kind == 2 and "second_per_grid_ts" in prompts:
            out["second_per_grid_ts"] = prompts["second_per_grid_ts"][row:row + 1]
    return out


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


def sequence_inputs(rollout, share_visuals=True):
    """Prompt + completion as one batch of P*G full sequences, for scoring.

    share_visuals: each prompt's pixels appear once (the grids still once per sequence, for the
    3D positions); run the forward inside visuals_shared() so the vision tower encodes each
    prompt once and its features are reused by the G sequences. False repeats the pixels G times
    (the public code's way; kept as the baseline that bench/step.py and the tests compare to)."""
    prompts = repeat_prompts(rollout.prompts, rollout.num_generations)
    if share_visuals:
        for key in ("pixel_values", "pixel_values_videos"):
            if key in rollout.prompts:
                prompts[key] = rollout.prompts[key]
    ids = rollout.completion_ids
    inputs = model_inputs(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], rollout.completion_mask.long()], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(ids)], dim=1).int()
    return inputs


@contextmanager
def visuals_shared(model, num_generations):
    """Inside the block, the model's image and video encoders take each prompt's pixels once
    (with the grids of all P*G sequences) and hand every sequence its prompt's features: one
    vision-tower pass per prompt instead of G, and in backward the G sequences' gradients meet
    in that one encoding. It runs inside the model's own forward, so under FSDP the vision
    weights are gathered by the usual hooks."""
    inner = model.model
    g = num_generations

    def shared(encode):
        def wrapper(pixels, grid_thw=None, **kwargs):
            out = encode(pixels, grid_thw[::g], **kwargs)  # grids come G at a time, per prompt
            out.pooler_output = tuple(f for f in out.pooler_output for _ in range(g))
            return out
        return wrapper

    inner.get_image_features = shared(inner.get_image_features)
    inner.get_video_features = shared(inner.get_video_features)
    try:
        yield
    finally:
        del inner.get_image_features, inner.get_video_features  # back to the class's methods


def _chunk_logprobs(hidden, weight, targets):
    """log softmax(hidden @ weight.T)[target] for one chunk of positions, softmax in fp32."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def chunked_logprobs(hidden, weight, targets, mask, chunk_size):
    """[N, T] log-probs of targets given hidden [N, T, H] and the LM head weight, computed only
    where mask is set (0 elsewhere), chunk_size positions at a time.

    With gradients on, each chunk is recomputed in backward instead of stored, so at any moment
    the full-vocabulary fp32 logits exist for one chunk (chunk_size x V), never for every
    completion token of the group (G x T x V: 3.7 GB in bf16 at G=8, T=768, V=152k)."""
    keep = mask.bool()
    h, y = hidden[keep], targets[keep]  # only real completion tokens, not the padding after them
    parts = []
    for s in range(0, len(y), chunk_size):
        args = (h[s:s + chunk_size], weight, y[s:s + chunk_size])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        out = out.index_put((keep,), torch.cat(parts))
    return out


@contextmanager
def lm_head_as_logprobs(model, targets, mask, chunk_size):
    """Make the model's LM head return chunked log-probs of targets instead of logits.

    The head runs inside the model's own forward, so under FSDP its weight is gathered and its
    gradient reduced by the usual hooks; calling the head from outside the forward would see a
    sharded weight. The forward passes the head the last T+1 positions (logits_to_keep)."""
    head = model.lm_head
    head.forward = lambda hidden: chunked_logprobs(hidden[:, :-1], head.weight, targets, mask, chunk_size)
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def completion_logprobs(model, rollout, chunk_size=1024, share_visuals=True):
    """[P*G, T] log-prob of each sampled completion token under model, 0 after the end of turn
    (grad flows if enabled). Each prompt's video and image go through the vision tower once
    (visuals_shared). Only completion positions reach the LM head: the prompt (thousands of
    video tokens) never gets full-vocabulary logits, and the completion gets them one chunk at a
    time."""
    ids = rollout.completion_ids
    inputs = sequence_inputs(rollout, share_visuals)
    with ExitStack() as stack:
        if share_visuals:
            stack.enter_context(visuals_shared(model, rollout.num_generations))
        stack.enter_context(lm_head_as_logprobs(model, ids, rollout.completion_mask, chunk_size))
        return model(**inputs, logits_to_keep=ids.shape[1] + 1, use_cache=False).logits
