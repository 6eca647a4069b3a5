"""The reference model: a slowly evolving (EMA) copy of the policy, and how confident it is in
each sample's stated answer given that sample's own reasoning.

CARE asks: after reading the video, the question and the sample's <think> reasoning, does
the reference model find the sample's <answer> likely? Only the answer tokens are scored:

    l[i] = mean_{t in A_i} log pi_ref(o_{i,t} | x, o_{i,<t})

where A_i are the tokens that carry the answer's text (rewards.answer_block: the last complete
<answer>...</answer> block). They are found from the tokens' byte offsets, because byte-level
BPE merges tags with their neighbours (Qwen2's tokenizer turns "<answer>A</answer>" into
"<answer", ">A", "</", "answer", ">"): the public code's "search for 'answer' and drop the
last 3 tokens" scores the tag's ">" and whatever follows the answer too (public_answer_span
keeps it, for --answer-span official).

The reference is kept in fp32 and really updated: a 0.5% step on bf16
weights is mostly rounded away, and ema_decay = 1.0 gives a frozen reference (plain GRPO).
Explained in docs/algorithm.md#4-reference-confidence and #9-the-ema-reference-update.
"""

import bisect
import functools
import itertools

import torch

from fsdp import local_shard, reshard
from rewards import answer_block
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
    """(start, end) character span of the stripped answer (rewards.answer_block), or None."""
    block = answer_block(text)
    if block is None:
        return None
    start, end = block
    inner = text[start:end]
    start += len(inner) - len(inner.lstrip())
    end -= len(inner) - len(inner.rstrip())
    return (start, end) if end > start else None


def token_bytes(tokenizer, ids):
    """The bytes each token of ids adds to the decoded text: a byte-level BPE token's bytes, an
    added (special) token's text. Both Qwen families' tokenizers are byte-level BPE."""
    table = byte_decoder()
    added = tokenizer.added_tokens_decoder
    out = []
    for tid, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if tid in added:
            out.append(added[tid].content.encode())
        elif token is None:   # an id past the vocabulary (a model larger than its tokenizer): no text
            out.append(b"")
        elif all(c in table for c in token):
            out.append(bytes(table[c] for c in token))
        else:
            raise ValueError(f"token {tid} ({token!r}) is not a byte-level BPE token: the answer span needs one")
    return out


@functools.cache
def byte_decoder():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


def decoded_offsets(ids, tokenizer):
    """(text, ends): the tokens of ids decoded, and ends[k] the byte offset at which token k ends.
    The text is the tokens' bytes decoded as UTF-8 with an invalid byte kept as one character
    (surrogateescape), so byte_offset maps its character offsets back to byte offsets exactly,
    also where a character is split across byte tokens (many CJK characters and emoji are)."""
    pieces = token_bytes(tokenizer, ids)
    return b"".join(pieces).decode("utf-8", errors="surrogateescape"), list(itertools.accumulate(map(len, pieces)))


def byte_offset(text, k):
    """The byte offset of character k of a decoded_offsets text."""
    return len(text[:k].encode("utf-8", errors="surrogateescape"))


def answer_token_span(ids, tokenizer):
    """Token range [lo, hi) of ids whose bytes overlap the answer's text, or None. Found from the
    sampled tokens themselves, not from a re-tokenised text, which could split differently."""
    text, ends = decoded_offsets(ids, tokenizer)
    span = answer_char_span(text)
    if span is None:
        return None
    a, b = (byte_offset(text, k) for k in span)
    return (bisect.bisect_right(ends, a),      # the first token ending after byte a
            bisect.bisect_left(ends, b) + 1)   # through the first token that reaches byte b


def public_answer_span(tokens, before, stop):
    """The public code's answer span (its get_thinking_answer_masks), in completion token
    indices [lo, hi), or None when it is empty. tokens: the completion's token strings up to its end; before: the
    prompt's last token string; stop: the index of the end-of-turn token, or the padded width
    of the rollout when there is none. It searches from the end for a token containing "answer"
    whose neighbours and itself spell "<answer>" (never the last two tokens of the sequence), then
    takes every token after it up to 4 before the stop, the closing tag dropped by count."""
    seq = [before] + list(tokens)
    # Not found (or found only in the prompt's instruction): the public code puts the tag just
    # past the completion, an empty span unless a completion without end-of-turn is shorter than
    # the rollout's width (there it scores the padding; here those positions hold no token).
    a = len(tokens)
    for j in range(len(seq) - 3, 0, -1):
        if "answer" in seq[j] and "<answer>" in "".join(seq[j - 1:j + 2]):
            a = j - 1    # the completion index of the tag's token
            break
    lo, hi = a + 1, max(a + 1, stop - 3)
    return (lo, hi) if hi > lo else None


def answer_token_mask(completion_ids, completion_mask, tokenizer, span="tags", truncated=None, before=None):
    """[N, T] bool mask of answer tokens, and [N] bool has_span. span "tags": answer_token_span.
    "official": public_answer_span (truncated: [N] bool, no end-of-turn; before: [N] the id of
    the prompt's last token), under which, as in the public code, every row takes part
    (has_span all True) and an empty span has a mean log-prob of 0 (answer_logprob)."""
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool, device=completion_ids.device)
    width = completion_ids.shape[1]
    for i, (ids, m) in enumerate(zip(completion_ids.tolist(), completion_mask.tolist())):
        n = int(sum(m))
        if span == "official":
            stop = width if bool(truncated[i]) else n - 1
            found = public_answer_span(tokenizer.convert_ids_to_tokens(ids[:n]),
                                       tokenizer.convert_ids_to_tokens(int(before[i])), stop)
        else:
            found = answer_token_span(ids[:n], tokenizer)
        if found is not None:
            mask[i, found[0]:found[1]] = True
    has_span = torch.ones_like(mask[:, 0]) if span == "official" else mask.any(dim=1)
    return mask, has_span


@torch.no_grad()
def answer_logprob(ref, rollout, tokenizer, chunk_size=1024, span="tags"):
    """l[i]: mean reference log-prob of sample i's answer tokens given its reasoning.

    Returns (l [N] float, NaN where there is no answer span; has_span [N] bool). span: "tags"
    (ours) or "official" (the public code's heuristic, whose empty span gives l = 0: the sum
    over no tokens divided by 0 + 1e-6, so the capped confidence of a sample without an answer
    is the cap)."""
    truncated = before = None
    if span == "official":  # the prompt's last token (left-padded: the last column is real), per row
        truncated = rollout.truncated
        before = rollout.prompts["input_ids"][:, -1].repeat_interleave(rollout.num_generations)   # [N]
    mask, has_span = answer_token_mask(rollout.completion_ids, rollout.completion_mask, tokenizer, span,
                                       truncated, before)                    # [N, T], [N]
    logp = completion_logprobs(ref, rollout, chunk_size)   # [N, T]
    total = (logp * mask).sum(dim=1)                       # [N]
    count = mask.sum(dim=1)                                # [N]
    if span == "official":
        return total / (count + 1e-6), has_span
    mean = torch.where(has_span, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return mean, has_span
