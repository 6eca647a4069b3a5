"""Prefix sharing: each group's prompt (its video and image included) through the model once.

All G completions of a group continue one prompt, and attention is causal, so the prompt's
hidden states and keys/values are the same in every one of the G sequences prompt + c_i.
Computing them once gives every completion token exactly what G separate sequences give it,
while the prompt (thousands of video tokens) and the vision tower run once per group instead
of G times:

- in generation, `prefilled`: the prompt is prefilled once and its KV cache copied G times,
  and the P prompts' caches are merged so that all P x G rows decode together;
- in scoring (reference and policy, forward and backward), `packed`: the prompt and its G
  completions are packed into one row [prompt | c_1 | ... | c_G] with a mask under which c_i
  sees the prompt and its own earlier tokens only, and the G completions' gradients meet in the
  one prompt.

rollout.py uses both by default; bench/baselines.py holds the public code's way (the prompt
repeated G times), which the tests and bench/step.py compare these with.

Reaches into library internals are tagged `internal:` with the reason.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from encoding import VISUAL_KEYS, model_inputs, select_prompt

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def prefilled(model, prompts, num_generations):
    """generate() inputs for G samples of each of the P prompts of a collated batch, all P x G
    rows decoded together. Each prompt's video, image and text (all but its last token) go
    through the model once, alone, and its KV cache is copied G times; the P caches are
    left-padded to the batch's width, as the prompts are (the attention mask hides the padding),
    and each row keeps its own prompt's 3D-RoPE offset. So a prompt's rows see exactly what they
    would see decoded on their own. Without this, generate() expands every prompt to G rows and
    prefills each G times."""
    g, width = num_generations, prompts["input_ids"].shape[1]
    keys, values, deltas = [], [], []
    for i in range(prompts["input_ids"].shape[0]):
        one = select_prompt(prompts, i)
        head = {k: (v[:, :-1] if k in TEXT_KEYS else v) for k, v in model_inputs(one).items()}
        # internal: transformers keeps the last call's 3D-RoPE offset here; it is not this prompt's.
        model.model.rope_deltas = None
        cache = model(**head, use_cache=True, logits_to_keep=1).past_key_values
        pad = width - one["input_ids"].shape[1]   # this prompt's left padding in the batch
        keys.append([F.pad(layer.keys, (0, 0, pad, 0)) for layer in cache.layers])        # [1, kv_heads, width - 1, d]
        values.append([F.pad(layer.values, (0, 0, pad, 0)) for layer in cache.layers])
        deltas.append(model.model.rope_deltas)   # [1, 1] (None for a text-only model)
    merged = DynamicCache()
    for layer in range(len(keys[0])):  # rows p0 x G, p1 x G, ...: [P*G, kv_heads, width - 1, d]
        merged.update(torch.cat([k[layer] for k in keys]).repeat_interleave(g, dim=0),
                      torch.cat([v[layer] for v in values]).repeat_interleave(g, dim=0), layer)
        for k, v in zip(keys, values):  # free each prompt's own copy as soon as it is merged
            k[layer] = v[layer] = None
    if deltas[0] is not None:  # the new tokens continue each row's own prompt positions
        model.model.rope_deltas = torch.cat(deltas).repeat_interleave(g, dim=0)   # [P*G, 1]
    return {**{k: prompts[k].repeat_interleave(g, dim=0) for k in TEXT_KEYS if k in prompts}, "past_key_values": merged}


def prompt_positions(model, prompts):
    """[3, P, width] 3D-RoPE positions of the prompts, by the model's own get_rope_index: video
    and image tokens get (time, height, width) positions, text tokens one position in all three.
    second_per_grid_ts is there for Qwen2.5-VL only (encoding.VisualBudget.temporal_seconds)."""
    grids = {k: prompts[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in prompts}
    if not grids:  # text only
        pos = (prompts["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # [P, width]
        return pos[None].expand(3, -1, -1)                                       # [3, P, width]
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
    positions = [prompt_positions(model, prompt)[:, 0]]  # [3, width]
    after_prompt = positions[0].max() + 1  # the text continues here (3D RoPE, both families)
    ids, segment, cols = [prompt["input_ids"][0]], [torch.zeros(width, dtype=torch.long, device=device)], []
    at = width
    for i, n in enumerate(completion_mask.sum(1).long().tolist()):  # n: up to and including the end of turn
        ids.append(completion_ids[i, :n])
        segment.append(torch.full((n,), i + 1, device=device))
        positions.append((after_prompt + torch.arange(n, device=device)).expand(3, n))
        cols += [width - 1] + list(range(at, at + n - 1))
        at += n
    return torch.cat(ids), torch.cat(positions, dim=1), torch.cat(segment), cols


def packed(model, rollout):
    """Each prompt and its G completions packed into one row (pack_group); the P rows are
    right-padded to one length and scored in one forward; nothing reads the padding's outputs.

    Returns (inputs, source, attention): the forward's keyword arguments; source = (rows, cols),
    the position whose output predicts each completion token under the mask, in row-major
    order; and the attention context the forward must run in (sdpa_attention)."""
    prompts, g = rollout.prompts, rollout.num_generations
    groups = [pack_group(model, select_prompt(prompts, i), rollout.completion_ids[i * g:(i + 1) * g],
                         rollout.completion_mask[i * g:(i + 1) * g]) for i in range(prompts["input_ids"].shape[0])]
    pad = lambda xs, value: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=value)
    ids = pad([x[0] for x in groups], 0)                                # [P, L]
    positions = pad([x[1].T for x in groups], 0).permute(2, 0, 1)       # [3, P, L]
    segment = pad([x[2] for x in groups], -1)                           # [P, L]
    q, k = segment[:, :, None], segment[:, None, :]                     # [P, L, 1], [P, 1, L]
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()  # [L, L]
    allowed = causal & ((k == 0) | (k == q))  # [P, L, L] the prompt, and earlier tokens of the same completion
    rows = torch.cat([torch.full((len(x[3]),), r) for r, x in enumerate(groups)]).to(ids.device)
    cols = torch.tensor([c for x in groups for c in x[3]], device=ids.device)
    inputs = {key: prompts[key] for key in VISUAL_KEYS if key in prompts}
    # A ready-made mask per attention type goes to the layers as it is (transformers does not
    # build its causal mask then).
    inputs.update(input_ids=ids, position_ids=positions, attention_mask={"full_attention": allowed[:, None]})
    return inputs, (rows, cols), sdpa_attention(model)


@contextmanager
def sdpa_attention(model):
    """Run the language model's attention through torch's scaled_dot_product_attention inside
    the block: the packed rows need an arbitrary boolean mask, which flash-attention 2 (used for
    generation when installed) cannot take. The vision tower keeps its own implementation."""
    config = model.model.language_model.config
    if any(t != "full_attention" for t in config.layer_types):
        raise ValueError(f"packed scoring supports full attention only, the model has {set(config.layer_types)}")
    # internal: transformers reads the attention kernel from this private config field per call.
    saved = config._attn_implementation
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = saved
