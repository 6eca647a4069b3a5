"""The real Qwen2 / Qwen2.5 (-VL) tokenizer, built locally from its BPE ranks, for the tests that
must see real tokens: the answer span, stopping, prompt ids and placeholder counts.

tests/fixtures/qwen.tiktoken.xz is the 151,643-token rank file that ships in the Apache-2.0
dashscope wheel (dashscope 2.0.2, dashscope/resources/qwen.tiktoken, sha256 b2b1b8df...a33186
uncompressed; see tests/fixtures/README.md). Each line is "base64(token bytes) rank". The
special tokens take the ids the checkpoints give them (151643 on), and transformers' own
Qwen2Tokenizer supplies the pre-tokenizer (Qwen2's split, then byte-level) and the decoder.

    tok = qwen_tokenizer.build()      # ~3 s; cached per process
"""

import base64
import functools
import lzma
import os

VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qwen.tiktoken.xz")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]   # ids 151643 ... 151656


def ranks():
    """{token bytes: rank} from the vendored rank file."""
    with lzma.open(VOCAB, "rt") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


@functools.cache
def byte_table():
    """GPT-2's byte-to-unicode table, which byte-level BPE writes token bytes in."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def byte_level(b):
    """Token bytes as the byte-level BPE writes them."""
    table = byte_table()
    return "".join(table[x] for x in b)


def vocab_and_merges(bpe_ranks):
    """The BPE vocabulary and merge list that reproduce the ranks: a token of rank r is the merge
    of two tokens of lower rank, ordered by r (the standard tiktoken conversion)."""
    vocab = {byte_level(t): r for t, r in bpe_ranks.items()}
    merges = []
    for token, rank in bpe_ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in bpe_ranks and token[i:] in bpe_ranks]
        merges += [(rank, bpe_ranks[a], bpe_ranks[b], a, b) for a, b in splits]
    merges.sort()
    return vocab, [(byte_level(a), byte_level(b)) for *_, a, b in merges]


@functools.cache
def build():
    """transformers' Qwen2Tokenizer over the real vocabulary, with Qwen2.5-VL's special tokens,
    eos <|im_end|> and pad <|endoftext|> as in the Instruct checkpoints."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bpe_ranks = ranks()
    vocab, merges = vocab_and_merges(bpe_ranks)
    first = len(bpe_ranks)
    assert first == 151643, f"expected 151,643 ranked tokens, got {first}"
    vocab.update({t: first + i for i, t in enumerate(SPECIAL)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL]})
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL] == list(range(first, first + len(SPECIAL)))
    return tok
