"""Group sampling: G completions per prompt (generate), and the per-token log-probs of those
completions under a model (completion_logprobs).

A rollout is one batch of P prompts (left-padded by encoding.collate_prompts) and the P*G
sampled completions, row n belonging to prompt n // G. The same rows are later scored by the
policy (with gradient) and by the reference model (CARE's answer likelihood, or GRPO's KL).

How a group's shared prompt goes through the model once, in both (a speed-up that changes no
number), is prefix_sharing.py's business; the public code's way is bench/baselines.py.
Explained in docs/algorithm.md#2-sampling-a-group and #7-the-policy-loss.
Reaches into library internals are tagged `internal:` with the reason.
"""

import copy
import math
import random
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, StaticCache
from transformers.generation import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)

import prefix_sharing


@dataclass
class Rollout:
    prompts: dict                  # collated prompt batch for the P prompts (encoding.collate_prompts)
    completion_ids: torch.Tensor   # [P*G, T] sampled tokens, padded after the end of turn
    completion_mask: torch.Tensor  # [P*G, T] 1.0 up to and including the first stop token (stop_ids)
    truncated: torch.Tensor        # [P*G] bool: never reached a stop token within max_new_tokens
    texts: list                    # [P*G] decoded completions, special tokens stripped
    num_generations: int


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def stop_ids(tokenizer, model=None):
    """The tokens that end a completion: <|im_end|>, and every end-of-sequence id of the model's
    generation_config (the checkpoint's generation_config.json: Qwen2-VL and Qwen2.5-VL list
    <|im_end|> and <|endoftext|>), so a completion stops where the checkpoint would stop it."""
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return sorted(ids)


def sampling_config(tokenizer, max_new_tokens, temperature=1.0, top_p=0.95, top_k=0,
                    repetition_penalty=1.0, do_sample=True, stop=None):
    """Every setting that shapes the sampling distribution, spelled out. stop: the ids that end a
    completion (stop_ids; default <|im_end|> alone).

    The visual placeholder tokens are never sampled: an <|image_pad|> inside a completion would
    make the scoring forward look for image features that do not exist. A trained model never
    emits them, so this only matters for random or badly diverged models."""
    return GenerationConfig(
        suppress_tokens=tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, min_new_tokens=0,
        num_beams=1, use_cache=True, eos_token_id=list(stop or stop_ids(tokenizer)),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def decode_attention():
    """The sdpa kernels generation may use: all but cuDNN's. With torch 2.11 on an H200, sdpa
    picks cuDNN attention for the decode shapes, and cuDNN builds a plan for every key length
    it has not seen (38 ms a call, against 0.28 ms for flash): the first 768-token rollout took
    37 s instead of 4.6 s (bench/README.md). Each new prompt length brings new key lengths, so
    this is not a warm-up cost. Flash, memory-efficient and math stay allowed."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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


def completion_mask_from_ids(completion_ids, eos_ids):
    """1.0 on tokens up to and including the first end-of-sequence token (eos_ids: one id or a
    list); truncated where there is none."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device).reshape(-1))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first_eos[:, None]).float()
    return mask, ~has_eos


def row_seeds(seeds, num_generations):
    """The sampling seed of each of the P x G rows: row j of the prompt whose seed is s gets one
    fixed by (s, j) alone, so it does not depend on the other rows, prompts or processes."""
    return [random.Random(f"{s}/{j}").getrandbits(63) for s in seeds for j in range(num_generations)]


# splitmix64 (Steele, Lea and Flood 2014) on int64 tensors: output i of the stream seeded by key is
# mix(key + (i + 1) * GOLDEN). Integer arithmetic wraps mod 2^64 alike on every device, so the same
# (key, i) gives the same bits on a CPU and a GPU, in any batch, computed for every token at once.
GOLDEN, MIX1, MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x, k):
    """Logical right shift of int64 x (>> is arithmetic on a negative int64)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def stream_uniform(keys, index):
    """Uniforms in (0, 1), float64: element i of key k's splitmix64 stream for every pair of
    keys [rows, 1] and index [rows or 1, n] (int64, broadcast)."""
    z = keys + (index + 1) * GOLDEN
    z = (z ^ _shift_right(z, 30)) * MIX1
    z = (z ^ _shift_right(z, 27)) * MIX2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 12).double() + 0.5) * 2.0 ** -52   # 52 bits: exact, never 0 or 1


class SeededSampling(LogitsProcessor):
    """Samples each row's next token from its own random stream, by Gumbel-max: the scores the
    other logits processors left (repetition penalty, suppressed tokens) go through temperature,
    top-k and top-p (transformers' own warpers, in generate()'s order), and the token is

        argmax_i  s_i + g_i,     g_i = -log(-log u_i)

    which is token i with probability softmax(s)_i (Gumbel 1954). u_i is element (step, i) of the
    row's own stream (stream_uniform, keyed by the row's seed): the same on any device and in any
    batch. A last-bit difference in the logits (matrix products round differently with the
    number of rows) changes the token only when the two best s_i + g_i are that close, far rarer
    than where a draw by inverse CDF meets a boundary of the cumulative probabilities. Returns
    scores that are 0 at the drawn token and -inf elsewhere, so generate()'s greedy step picks it."""

    def __init__(self, gen_config, seeds, prompt_width, device):
        self.warpers = ([TemperatureLogitsWarper(gen_config.temperature)] if gen_config.temperature != 1.0 else []) + \
                       ([TopKLogitsWarper(gen_config.top_k)] if gen_config.top_k else []) + \
                       ([TopPLogitsWarper(gen_config.top_p)] if gen_config.top_p < 1.0 else [])
        self.keys = torch.tensor(seeds, dtype=torch.int64, device=device)[:, None]   # [rows, 1]: 63-bit row_seeds
        self.prompt_width = prompt_width

    def gumbel(self, step, vocab):
        """[rows, vocab] float64: the rows' Gumbel noise at this decode step."""
        index = step * vocab + torch.arange(vocab, device=self.keys.device)[None]      # [1, vocab]
        return -torch.log(-torch.log(stream_uniform(self.keys, index)))

    def __call__(self, input_ids, scores):
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_width
        token = (scores.double() + self.gumbel(step, scores.shape[-1])).argmax(dim=-1, keepdim=True)   # [rows, 1]
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


def greedy_copy(gen_config):
    """gen_config with sampling off: SeededSampling does it, as the last logits processor."""
    config = copy.deepcopy(gen_config)
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


# ---------------------------------------------------------------------------------------------
# How the rows decode (--decode): over a static KV cache (the default), transformers' growing
# DynamicCache, or the static cache with the language model's decode step through torch.compile

DECODES = ("static", "dynamic", "compiled")
BUCKET = 256   # the static cache's length is rounded up to this: nearby prompt lengths share a graph


def cache_length(prompt_tokens, max_new_tokens, bucket=BUCKET):
    """Positions the static cache holds: prompt + new tokens, rounded up to a multiple of bucket."""
    return -(-(prompt_tokens + max_new_tokens) // bucket) * bucket


def static_cache(model, inputs, max_new_tokens):
    """generate() inputs with their filled DynamicCache (prefix_sharing.prefilled) copied into a
    StaticCache: one preallocated [rows, kv_heads, length, head_dim] buffer per layer, written in
    place, so that every decode step has the same shapes.

    Each buffer keeps the dtype of the prefilled keys or values. Under accelerate's mixed
    precision the model's outputs, its KV cache included, come back in fp32, while a decode step
    writes its values in bf16: they are written up to the buffer's dtype (exact), as
    DynamicCache's concatenation promotes them, so every decode gives the same numbers."""
    width = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=cache_length(width, max_new_tokens))
    for filled, layer in zip(inputs["past_key_values"].layers, cache.layers):
        layer.lazy_initialization(filled.keys, filled.values)
        # internal: transformers gives both buffers the keys' dtype; the values keep their own.
        layer.values = torch.zeros_like(layer.values, dtype=filled.values.dtype)
        torch._dynamo.mark_static_address(layer.values)
        layer.update = _upcasting(layer)
        layer.update(filled.keys, filled.values)
    return {**inputs, "past_key_values": cache}


def _upcasting(layer):
    """layer.update, writing keys and values in the dtype of the layer's buffers."""
    update = layer.update

    def cast_update(keys, values, *args, **kwargs):
        return update(keys.to(layer.keys.dtype), values.to(layer.values.dtype), *args, **kwargs)
    return cast_update


_COMPILED = weakref.WeakKeyDictionary()   # language model -> its compiled forward, made once


@contextmanager
def compiled_language_model(model):
    """Run the language model's forward through torch.compile inside the block (CUDA graphs on a
    GPU). Only it: the vision tower never runs in a decode step, and the 3D-RoPE bookkeeping
    (rope_deltas, which differ from one prompt batch to the next) and the sampling stay eager
    around it, so a compiled graph never holds one batch's positions."""
    lm = model.model.language_model
    if lm not in _COMPILED:
        mode = "reduce-overhead" if next(lm.parameters()).is_cuda else "default"
        _COMPILED[lm] = torch.compile(lm.forward, mode=mode, dynamic=False)
    # internal: an instance attribute shadows the class's forward for the block; del restores it.
    lm.forward = _COMPILED[lm]
    try:
        yield
    finally:
        del lm.forward


@torch.no_grad()
def generate(model, prompts, tokenizer, num_generations, gen_config, seeds=None, batch_inputs=None,
             decode="static"):
    """Sample num_generations completions for each prompt of the collated batch, all P x G rows
    in one decode.

    With gen_config.do_sample, row j of prompt i draws its tokens from its own random stream,
    seeded by (seeds[i], j) (row_seeds, SeededSampling): a prompt's completions depend on its
    seed only, not on which prompts share its batch or process, nor on a resume. Training passes
    one seed per prompt fixed by (run seed, step, prompt); seeds=None draws them from torch's
    global generator. Without sampling (greedy) the seeds play no part.

    batch_inputs(model, prompts, G) gives generate()'s inputs for the P x G rows: by default
    prefix_sharing.prefilled (each prompt prefilled once, its KV cache copied G times);
    bench/baselines.repeated_inputs repeats each prompt G times instead. decode: "static" writes
    each new token's keys and values into a preallocated cache (static_cache); "dynamic" is
    transformers' DynamicCache, which concatenates every layer's whole cache at every step;
    "compiled" is the static cache with the language model compiled (compiled_language_model).
    The same sampling every way, the same tokens up to the last bits of the logits."""
    batch_inputs = batch_inputs or prefix_sharing.prefilled
    was_training = model.training
    model.eval()  # use the KV cache (gradient checkpointing turns it off in train mode)
    p, g = prompts["input_ids"].shape[0], num_generations
    width = prompts["input_ids"].shape[1]
    call, processors = gen_config, []
    if gen_config.do_sample:
        seeds = torch.randint(2 ** 62, (p,)).tolist() if seeds is None else list(seeds)
        call = greedy_copy(gen_config)
        processors = [SeededSampling(gen_config, row_seeds(seeds, g), width, prompts["input_ids"].device)]
    inputs = batch_inputs(model, prompts, g)
    compiled = nullcontext()
    if decode in ("static", "compiled") and "past_key_values" in inputs:
        inputs = static_cache(model, inputs, gen_config.max_new_tokens)
        call = copy.deepcopy(call)
        call.disable_compile = True   # generate() would compile the whole model over a static cache
    if decode == "compiled":
        compiled = compiled_language_model(model)
    with own_generation_config(model, call), decode_attention(), compiled:
        # Each process samples on its own. Under FSDP, call generate() inside fsdp.gathered (as
        # train.py does), where the forwards need no collective. transformers would otherwise
        # see FSDP and keep every process stepping until all are done (an all-reduce per token),
        # which deadlocks when processes make different numbers of calls: --skip-bad-samples
        # can leave them with different numbers of prompts.
        out = model.generate(**inputs, generation_config=call, logits_processor=LogitsProcessorList(processors),
                             synced_gpus=False)
    model.train(was_training)
    completion_ids = out[:, width:]                                          # [P*G, T]
    if completion_ids.shape[1] == 0:  # max_new_tokens=0: keep shapes valid
        completion_ids = out.new_full((p * g, 1), gen_config.pad_token_id)
    mask, truncated = completion_mask_from_ids(completion_ids, gen_config.eos_token_id)
    texts = [tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
             for ids, m in zip(completion_ids, mask)]
    return Rollout(prompts, completion_ids, mask, truncated, texts, num_generations)


def _chunk_logprobs(hidden, weight, targets):
    """log softmax(hidden @ weight.T)[target] for one chunk of positions, softmax in fp32."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def chunked_logprobs(hidden, weight, targets, chunk_size):
    """[N] log-probs of targets [N] given hidden [N, H] and the LM head weight, chunk_size
    positions at a time.

    With gradients on, each chunk is recomputed in backward instead of stored, so at any moment
    the full-vocabulary fp32 logits exist for one chunk (chunk_size x V), never for every
    completion token of the group (G x T x V: 3.7 GB in fp32 at G=8, T=768, V=152k)."""
    chunks = []
    for s in range(0, len(targets), chunk_size):
        args = (hidden[s:s + chunk_size], weight, targets[s:s + chunk_size])
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*args))
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


@contextmanager
def lm_head_as_logprobs(model, source, targets, chunk_size):
    """Make the model's LM head return the chunked log-probs of targets [N], read at the hidden
    positions source = (rows, cols), instead of logits.

    The head runs inside the model's own forward, so under FSDP its weight is gathered and its
    gradient reduced by the usual hooks; calling the head from outside the forward would see a
    sharded weight. Only completion tokens reach it: the prompt (thousands of video tokens)
    never gets full-vocabulary logits."""
    head = model.lm_head
    # internal: an instance attribute shadows the class's forward for the block; del restores it.
    head.forward = lambda hidden: chunked_logprobs(hidden[source], head.weight, targets, chunk_size)
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def completion_logprobs(model, rollout, chunk_size=1024, layout=None):
    """[P*G, T] log-prob of each sampled completion token under model, 0 after the end of turn
    (grad flows if enabled).

    layout(model, rollout) -> (inputs, source, attention) lays the rollout out for one forward:
    by default prefix_sharing.packed (each group in one row, its prompt and video through the
    model once); bench/baselines.repeated gives the P*G sequences in full. One forward either
    way, so under FSDP every process issues the same collectives whatever its prompts hold."""
    layout = layout or prefix_sharing.packed
    mask = rollout.completion_mask.bool()                          # [P*G, T]
    inputs, source, attention = layout(model, rollout)
    with attention, lm_head_as_logprobs(model, source, rollout.completion_ids[mask], chunk_size):
        flat = model(**inputs, use_cache=False).logits             # [N] one per completion token
    out = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)  # [P*G, T]
    return out.index_put((mask,), flat)
