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

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig

import prefix_sharing
from encoding import model_inputs, select_prompt


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


@torch.no_grad()
def generate(model, prompts, tokenizer, num_generations, gen_config, seeds=None, group_inputs=None):
    """Sample num_generations completions for each prompt of the collated batch.

    seeds=None: one generate call for the whole batch (evaluation). With one seed per prompt
    (training), each prompt's group is sampled on its own right after torch.manual_seed(seed):
    the completions a prompt gets then depend on (run seed, step, prompt) only, not on which
    rank it landed on or which prompts share its batch, so a 2-process run samples exactly what
    a 1-process run with the same global batch samples, and a resumed run what the
    uninterrupted run would have.

    group_inputs(model, prompt, G) gives generate()'s inputs for one group: by default
    prefix_sharing.prefilled (the prompt prefilled once, its KV cache copied G times);
    bench/baselines.repeated_prompt repeats the prompt G times instead."""
    group_inputs = group_inputs or prefix_sharing.prefilled
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
        with decode_attention():
            return model.generate(**inputs, generation_config=gen_config, synced_gpus=False)

    with own_generation_config(model, gen_config):
        if seeds is None:
            gen_config.num_return_sequences = g
            rows.extend(sample(**model_inputs(prompts))[:, prompts["input_ids"].shape[1]:])
        for i, seed in enumerate(seeds or []):
            one = select_prompt(prompts, i)
            torch.manual_seed(seed)
            gen_config.num_return_sequences = 1
            out = sample(**group_inputs(model, one, g))
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
