"""Group sampling: G completions per prompt, and the per-token log-probs of those completions.

A rollout is one batch of P prompts (left-padded by data.collate_prompts) and the P*G sampled
completions, row n belonging to prompt n // G. The same rows are later scored by the policy
(with gradient) and by the reference model (CARE's answer likelihood, or GRPO's KL), so the
code that turns a rollout into model inputs lives here too.

All G samples of a group share one prompt, with its video and image, and it goes through the
model once per group: generation prefills it once and the samples continue from copies of its
KV cache (prefilled); scoring packs it with its G completions into one row (packed_inputs).
"""

from contextlib import contextmanager, nullcontext
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
    """Every setting that shapes the sampling distribution, spelled out.

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

    def sample(**inputs):
        # Each process samples on its own. Under FSDP, call generate() inside fsdp.gathered (as
        # train.py does), where the forwards need no collective. transformers would otherwise
        # see FSDP and keep every process stepping until all are done (an all-reduce per token),
        # which deadlocks when processes make different numbers of calls: --skip-bad-samples
        # can leave them with different numbers of prompts.
        return model.generate(**inputs, generation_config=gen_config, synced_gpus=False)

    with own_generation_config(model, gen_config):
        if seeds is None:
            gen_config.num_return_sequences = g
            rows.extend(sample(**model_inputs(prompts))[:, prompts["input_ids"].shape[1]:])
        for i, seed in enumerate(seeds or []):
            one = select_prompt(prompts, i)
            torch.manual_seed(seed)
            gen_config.num_return_sequences = 1
            out = sample(**prefilled(model, one, g)) if share else sample(**model_inputs(repeat_prompts(one, g)))
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


def repeated_inputs(rollout):
    """Prompt + completion as P*G separate full sequences: the public code's way, each prompt
    (its video included) repeated G times. Kept as the baseline that the tests and
    bench/step.py compare packed_inputs to.

    Returns (inputs, source): source = (rows, cols) of the position whose output predicts each
    completion token under the mask, in row-major order."""
    prompts = repeat_prompts(rollout.prompts, rollout.num_generations)
    ids, mask = rollout.completion_ids, rollout.completion_mask.long()
    inputs = model_inputs(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(ids)], dim=1).int()
    rows, t = mask.nonzero(as_tuple=True)
    return inputs, (rows, prompts["input_ids"].shape[1] + t - 1)


def prompt_positions(model, prompts):
    """[3, P, width] Qwen2.5-VL 3D-RoPE positions of the prompts: video and image tokens get
    (time, height, width) positions, text tokens one position in all three."""
    grids = {k: prompts[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in prompts}
    if not grids:  # text only
        pos = (prompts["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1)
    pos, _ = model.model.get_rope_index(prompts["input_ids"], prompts["mm_token_type_ids"],
                                        attention_mask=prompts["attention_mask"], **grids)
    return pos


def pack_group(model, prompt, completion_ids, completion_mask):
    """One prompt (a batch of one, without padding: select_prompt) and its G completions as one
    row [prompt | c_1 | ... | c_G]: (ids [L], positions [3, L], segment [L], cols).

    segment is 0 on the prompt and i + 1 on completion i; every c_i is positioned right after
    the prompt, as if it were the only continuation. cols[k] is the position whose output
    predicts the k-th completion token under the mask (row-major); the first token of every
    c_i is predicted by the prompt's last position."""
    device, width = prompt["input_ids"].device, prompt["input_ids"].shape[1]
    positions = [prompt_positions(model, prompt)[:, 0]]
    after_prompt = positions[0].max() + 1  # the text continues here (Qwen2.5-VL's 3D RoPE)
    ids, segment, cols = [prompt["input_ids"][0]], [torch.zeros(width, dtype=torch.long, device=device)], []
    at = width
    for i, n in enumerate(completion_mask.sum(1).long().tolist()):  # n: up to and including the end of turn
        ids.append(completion_ids[i, :n])
        segment.append(torch.full((n,), i + 1, device=device))
        positions.append((after_prompt + torch.arange(n, device=device)).expand(3, n))
        cols += [width - 1] + list(range(at, at + n - 1))
        at += n
    return torch.cat(ids), torch.cat(positions, dim=1), torch.cat(segment), cols


def packed_inputs(model, rollout):
    """Each prompt and its G completions packed into one row (pack_group), with an attention
    mask under which c_i sees the prompt and its own earlier tokens only.

    Attention is causal, so the prompt's hidden states and keys/values are the same in all G
    sequences prompt + c_i: computing them once gives every completion token exactly what G
    separate sequences give it, but the prompt (thousands of video tokens) and its video go
    through the model once per group instead of G times, in forward and in backward, and the
    G completions' gradients meet in that one prompt. The P rows are right-padded to one
    length and scored in one forward; nothing reads the padding's outputs.

    Returns (inputs, source) as repeated_inputs does."""
    prompts, g = rollout.prompts, rollout.num_generations
    groups = [pack_group(model, select_prompt(prompts, i), rollout.completion_ids[i * g:(i + 1) * g],
                         rollout.completion_mask[i * g:(i + 1) * g]) for i in range(prompts["input_ids"].shape[0])]
    pad = lambda xs, value: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=value)
    ids = pad([x[0] for x in groups], 0)
    positions = pad([x[1].T for x in groups], 0).permute(2, 0, 1)  # [3, P, L]
    segment = pad([x[2] for x in groups], -1)
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
    allowed = causal & ((k == 0) | (k == q))  # the prompt, and earlier tokens of the same completion
    rows = torch.cat([torch.full((len(x[3]),), r) for r, x in enumerate(groups)]).to(ids.device)
    cols = torch.tensor([c for x in groups for c in x[3]], device=ids.device)
    inputs = {key: prompts[key] for key in VISUAL_KEYS if key in prompts}
    # A ready-made mask per attention type goes to the layers as it is (transformers does not
    # build its causal mask then).
    inputs.update(input_ids=ids, position_ids=positions, attention_mask={"full_attention": allowed[:, None]})
    return inputs, (rows, cols)


@contextmanager
def sdpa_attention(model):
    """Run the language model's attention through torch's scaled_dot_product_attention inside
    the block: the packed rows need an arbitrary boolean mask, which flash-attention 2 (used for
    generation when installed) cannot take. The vision tower keeps its own implementation."""
    config = model.model.language_model.config
    if any(t != "full_attention" for t in config.layer_types):
        raise ValueError(f"packed scoring supports full attention only, the model has {set(config.layer_types)}")
    saved = config._attn_implementation
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = saved


def _chunk_logprobs(hidden, weight, targets):
    """log softmax(hidden @ weight.T)[target] for one chunk of positions, softmax in fp32."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def chunked_logprobs(hidden, weight, targets, chunk_size):
    """[N] log-probs of targets [N] given hidden [N, H] and the LM head weight, chunk_size
    positions at a time.

    With gradients on, each chunk is recomputed in backward instead of stored, so at any moment
    the full-vocabulary fp32 logits exist for one chunk (chunk_size x V), never for every
    completion token of the group (G x T x V: 3.7 GB in bf16 at G=8, T=768, V=152k)."""
    parts = []
    for s in range(0, len(targets), chunk_size):
        args = (hidden[s:s + chunk_size], weight, targets[s:s + chunk_size])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@contextmanager
def lm_head_as_logprobs(model, source, targets, chunk_size):
    """Make the model's LM head return the chunked log-probs of targets [N], read at the hidden
    positions source = (rows, cols), instead of logits.

    The head runs inside the model's own forward, so under FSDP its weight is gathered and its
    gradient reduced by the usual hooks; calling the head from outside the forward would see a
    sharded weight. Only completion tokens reach it: the prompt (thousands of video tokens)
    never gets full-vocabulary logits."""
    head = model.lm_head
    head.forward = lambda hidden: chunked_logprobs(hidden[source], head.weight, targets, chunk_size)
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def completion_logprobs(model, rollout, chunk_size=1024, packed=True):
    """[P*G, T] log-prob of each sampled completion token under model, 0 after the end of turn
    (grad flows if enabled). packed: each group in one row (packed_inputs), so its prompt and
    video go through the model once; False: the P*G sequences repeated in full (the public
    code's way; the baseline). One forward either way, so under FSDP every process issues the
    same collectives whatever its prompts hold, and however many were skipped."""
    mask = rollout.completion_mask.bool()
    inputs, source = packed_inputs(model, rollout) if packed else repeated_inputs(rollout)
    attention = sdpa_attention(model) if packed else nullcontext()
    with attention, lm_head_as_logprobs(model, source, rollout.completion_ids[mask], chunk_size):
        flat = model(**inputs, use_cache=False).logits
    out = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)
    return out.index_put((mask,), flat)
