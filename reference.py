"""The reference model: a slowly evolving (EMA) copy of the policy, and how confident it is in
each sample's stated answer given that sample's own reasoning.

CARE asks: after reading the video, the question and the sample's <think> reasoning, does
the reference model find the sample's <answer> likely? Only the answer tokens are scored:

    l[i] = mean_{t in A_i} log pi_ref(o_{i,t} | x, o_{i,<t})

where A_i are the tokens that carry the text inside the last <answer>...</answer>. They are
found from character offsets, because byte-level BPE merges tags with their neighbours
(Qwen2's tokenizer turns "<answer>A</answer>" into "<answer", ">A", "</", "answer", ">"): the
public code's "search for 'answer' and drop the last 3 tokens" scores the wrong tokens.

The reference is kept in fp32 and really updated: a 0.5% step on bf16
weights is mostly rounded away, and ema_decay = 1.0 gives a frozen reference (plain GRPO).
Explained in docs/algorithm.md#4-reference-confidence and #9-the-ema-reference-update.
"""

import bisect

import torch

from fsdp import local_shard, reshard
from rewards import ANSWER_RE
from rollout import completion_logprobs


def make_reference(model):
    """The reference: a frozen-gradient, fp32 copy of the initial policy. Pass a freshly loaded
    model (train.py loads the checkpoint a second time, after the policy is sharded, so two
    full copies never sit in CPU memory at once) or a deepcopy of the policy."""
    ref = model.float().eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def ema_update(ref, policy, decay):
    """theta_ref <- decay * theta_ref + (1 - decay) * theta, in fp32, for every parameter of ref
    and the policy's parameter of the same name. ref is the reference model, or under LoRA
    lora.Reference, whose parameters are the EMA of the adapters alone.

    Under FSDP both are sharded the same way (fsdp.py), so each process updates its own
    slice of every parameter from the policy's matching slice: no gather, no communication."""
    if decay >= 1.0:
        return
    reshard(ref)  # a forward with no backward after it leaves some FSDP units gathered
    reshard(policy)
    params = dict(policy.named_parameters())
    for name, p_r in ref.named_parameters():
        assert name in params, f"reference parameter {name} has no policy parameter of that name"
        mine, theirs = local_shard(p_r), local_shard(params[name])
        assert mine.shape == theirs.shape, f"{name}: reference slice {mine.shape} vs policy slice {theirs.shape}"
        mine.lerp_(theirs.to(mine.dtype), 1.0 - decay)


def answer_char_span(text):
    """(start, end) character span of the stripped text inside the last <answer>...</answer>."""
    matches = list(ANSWER_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    inner = m.group(1)
    start = m.start(1) + (len(inner) - len(inner.lstrip()))
    end = m.end(1) - (len(inner) - len(inner.rstrip()))
    return (start, end) if end > start else None


def answer_token_span(ids, tokenizer):
    """Token range [lo, hi) of ids whose characters overlap the last answer's text, or None.

    A token's characters are [len(decode(ids[:k])), len(decode(ids[:k+1]))). Decoding prefixes
    is tokenizer-agnostic and exact for the sampled tokens (re-tokenizing the text could give
    different tokens); a binary search keeps it to ~2 log2(T) decodes."""
    def prefix_len(k):
        return len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    span = answer_char_span(text)
    if span is None:
        return None
    a, b = span
    n = len(ids)
    lo = bisect.bisect_right(range(n + 1), a, key=prefix_len) - 1  # token holding char a
    hi = bisect.bisect_left(range(n + 1), b, key=prefix_len)       # first prefix reaching b
    return (lo, hi) if hi > lo else None


def answer_token_mask(completion_ids, completion_mask, tokenizer):
    """[N, T] bool mask of answer tokens, and [N] bool has_span."""
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool, device=completion_ids.device)
    for i, (ids, m) in enumerate(zip(completion_ids.tolist(), completion_mask.tolist())):
        span = answer_token_span(ids[: int(sum(m))], tokenizer)
        if span is not None:
            mask[i, span[0]:span[1]] = True
    return mask, mask.any(dim=1)


@torch.no_grad()
def answer_logprob(ref, rollout, tokenizer, chunk_size=1024):
    """l[i]: mean reference log-prob of sample i's answer tokens given its reasoning.

    Returns (l [N] float, NaN where there is no answer span; has_span [N] bool)."""
    mask, has_span = answer_token_mask(rollout.completion_ids, rollout.completion_mask, tokenizer)  # [N, T], [N]
    logp = completion_logprobs(ref, rollout, chunk_size)   # [N, T]
    total = (logp * mask).sum(dim=1)                       # [N]
    count = mask.sum(dim=1)                                # [N]
    mean = torch.where(has_span, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return mean, has_span
