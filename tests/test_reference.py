"""The EMA reference and the answer-token span."""

import copy
import types

import pytest
import torch

import reference


def ids_of(tokenizer, text, eos=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if eos else [])


def span_tokens(tokenizer, text):
    ids = ids_of(tokenizer, text)
    span = reference.answer_token_span(ids, tokenizer)
    return None if span is None else tokenizer.convert_ids_to_tokens(ids[span[0]:span[1]])


# --- answer span ---------------------------------------------------------------------------

def test_tags_merge_with_their_neighbours_in_this_tokenizer(tokenizer):
    # The premise of the offset-based span: ">A" and "</" are single tokens, like in Qwen2's.
    assert tokenizer.tokenize("<answer>A</answer>") == ["<answer", ">A", "</", "answer", ">"]


def test_single_letter_answer_is_the_merged_token_only(tokenizer):
    assert span_tokens(tokenizer, "<think>the cup is red</think>\n<answer>A</answer>") == [">A"]


def test_public_code_heuristic_would_score_the_wrong_tokens(tokenizer):
    # The public code drops the last 3 tokens after "answer": that is "</", "answer", ">" +
    # end-of-turn here, i.e. it would keep a tag token. Our span never includes pure tag tokens.
    ids = ids_of(tokenizer, "<think>x</think><answer>B</answer>")
    lo, hi = reference.answer_token_span(ids, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[lo:hi] == [">B"]
    assert "</" not in tokens[lo:hi] and "<answer" not in tokens[lo:hi]


def test_multi_token_answer_and_whitespace(tokenizer):
    text = "<think>so</think><answer>  the cup is red \n</answer>"
    tokens = span_tokens(tokenizer, text)
    assert "".join(tokens).replace("Ġ", " ").strip() == "the cup is red"
    assert all(t not in ("</", "answer", ">", "<answer") for t in tokens)


def test_last_answer_wins(tokenizer):
    text = "<think>maybe <answer>C</answer> no</think><answer>D</answer>"
    ids = ids_of(tokenizer, text)
    lo, hi = reference.answer_token_span(ids, tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids[lo:hi]) == [">D"]
    assert lo > len(ids) - 8  # the second tag, near the end


@pytest.mark.parametrize("text", ["<think>x</think>", "<answer></answer>", "<answer>   </answer>", "A", ""])
def test_no_answer_span(tokenizer, text):
    ids = ids_of(tokenizer, text, eos=False) if text else []
    assert reference.answer_token_span(ids, tokenizer) is None


def test_answer_token_mask_respects_completion_mask(tokenizer):
    a = ids_of(tokenizer, "<think>t</think><answer>A</answer>")
    b = ids_of(tokenizer, "<think>t</think>")
    t = max(len(a), len(b)) + 3
    pad = tokenizer.pad_token_id
    # Row b carries an answer *after* its end of turn: masked-out tokens must not count.
    tail = tokenizer("<answer>C</answer>", add_special_tokens=False)["input_ids"]
    rows = [a + [pad] * (t - len(a)), (b + tail + [pad] * t)[:t]]
    masks = [[1.0] * len(a) + [0.0] * (t - len(a)), [1.0] * len(b) + [0.0] * (t - len(b))]
    mask, has_span = reference.answer_token_mask(torch.tensor(rows), torch.tensor(masks), tokenizer)
    assert has_span.tolist() == [True, False]
    assert mask[0].sum() == 1 and not mask[1].any()


def test_leading_whitespace_is_not_part_of_the_span(tokenizer):
    # "<answer>  the" tokenizes as ">", "Ġ", "Ġthe": the lone "Ġ" must not be scored.
    for text, expected in [("<think>so</think><answer>  the cup is red \n</answer>", ["Ġthe", "Ġcup", "Ġis", "Ġred"]),
                           ("<answer> A</answer>", ["A"])]:
        ids = ids_of(tokenizer, text)
        lo, hi = reference.answer_token_span(ids, tokenizer)
        assert tokenizer.convert_ids_to_tokens(ids[lo:hi]) == expected, text


def test_answer_logprob_is_the_mean_over_answer_tokens(tokenizer, monkeypatch):
    a = ids_of(tokenizer, "<think>t</think><answer>the cup is red</answer>")  # multi-token answer
    b = ids_of(tokenizer, "<think>t</think>")                                 # no answer
    t = len(a)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([a, b + [pad] * (t - len(b))])
    mask = torch.tensor([[1.0] * t, [1.0] * len(b) + [0.0] * (t - len(b))])
    logp = -torch.arange(1, 2 * t + 1, dtype=torch.float32).view(2, t) / 10
    monkeypatch.setattr(reference, "completion_logprobs", lambda ref, completions, chunk_size: logp)
    completions = types.SimpleNamespace(completion_ids=ids, completion_mask=mask)
    l, has_span = reference.answer_logprob(None, completions, tokenizer)
    lo, hi = reference.answer_token_span(a, tokenizer)
    assert hi - lo > 1
    assert has_span.tolist() == [True, False]
    torch.testing.assert_close(l[0], logp[0, lo:hi].mean())
    assert torch.isnan(l[1])


# --- EMA -----------------------------------------------------------------------------------

def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_ema_matches_closed_form_after_k_updates():
    policy = small_model(0)
    ref = reference.make_reference(small_model(1))
    ref0 = [p.clone() for p in ref.parameters()]
    d, k = 0.9, 7
    for _ in range(k):
        reference.ema_update(ref, policy, d)
    # With a fixed policy theta: ref_k = d^k ref_0 + (1 - d^k) theta
    for r, r0, p in zip(ref.parameters(), ref0, policy.parameters()):
        torch.testing.assert_close(r, d**k * r0 + (1 - d**k) * p, rtol=1e-6, atol=1e-6)


def test_ema_decay_one_is_frozen():
    policy, ref = small_model(0), reference.make_reference(small_model(1))
    before = [p.clone() for p in ref.parameters()]
    for _ in range(3):
        reference.ema_update(ref, policy, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))


def test_half_percent_step_is_not_rounded_away():
    # A bf16 policy near 1.0 (bf16 spacing there is 2^-7 = 0.0078): the reference must move by
    # 0.005 * (theta - ref) = 5e-5, which bf16 storage would round to no change at all.
    policy = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.fill_(1.0 + 2**-6)
    ref = reference.make_reference(copy.deepcopy(policy))
    assert ref.weight.dtype == torch.float32
    with torch.no_grad():
        ref.weight.fill_(1.0)
    reference.ema_update(ref, policy, 0.995)
    torch.testing.assert_close(ref.weight, torch.full((8, 8), 1.0 + 0.005 * 2**-6), rtol=0, atol=1e-7)
    # Same update done in bf16 would have been lost: the point of keeping the reference fp32.
    bf16 = torch.ones(8, 8, dtype=torch.bfloat16).lerp_(policy.weight, 0.005)
    assert torch.equal(bf16, torch.ones(8, 8, dtype=torch.bfloat16))


def test_reference_is_frozen_fp32_eval():
    ref = reference.make_reference(small_model(0).to(torch.bfloat16).train())
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p.dtype == torch.float32 for p in ref.parameters()) and not ref.training


def test_each_groups_answer_is_scored_under_its_own_prompt(sensitive_model_dir, tokenizer, seed_bench_root):
    """CARE's confidence for a group comes from that group's prompt: the same completions after
    two prompts that differ only in their video get each prompt's own answer log-prob (what it
    gets alone), and the two differ, so a group scored under another's video would show."""
    import dataclasses

    import data
    import encoding
    import models
    import rollout
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    a, b = [s for s in samples if s.video][:2]
    budget = encoding.budget_from_checkpoint(sensitive_model_dir, max_frames=4, video_max_pixels=56 * 56,
                                             image_max_pixels=56 * 56, video_min_pixels=784, image_min_pixels=784)
    prompts = [encoding.encode_prompt(s, tokenizer, budget) for s in (a, dataclasses.replace(a, video=b.video))]
    texts = ["<think>the square is red</think><answer>B</answer><|im_end|>",
             "<think>it moves left</think><answer>C</answer><|im_end|>"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])

    def roll(encoded):
        p = len(encoded)
        return rollout.Rollout(encoding.collate_prompts(encoded, tokenizer), ids.repeat(p, 1), mask.repeat(p, 1),
                               torch.zeros(2 * p, dtype=torch.bool), texts * p, 2)
    ref = reference.make_reference(models.load_model(sensitive_model_dir, "sdpa"))
    both, has_span = reference.answer_logprob(ref, roll(prompts), tokenizer)
    assert has_span.all()
    for i, enc in enumerate(prompts):
        alone, _ = reference.answer_logprob(ref, roll([enc]), tokenizer)
        torch.testing.assert_close(both[2 * i:2 * i + 2], alone, rtol=1e-4, atol=1e-5)
    assert (both[:2] - both[2:]).abs().min() > 1e-3


# --- --reference-input text: the reference reads the prompt's text, not its video or image ---

def two_prompts_one_video_apart(tokenizer, seed_bench_root, model_dir):
    """(samples, encoded, bare): a sample with a video and an image, and the same with another
    clip's video and a longer question; and, for each, the same sample with neither (what its
    text-only prompt must be)."""
    import dataclasses

    import data
    import encoding
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    a, b = [s for s in samples if s.video and s.image][:2]
    pair = [a, dataclasses.replace(a, video=b.video, question=a.question + " Look closely.")]
    budget = encoding.budget_from_checkpoint(model_dir, max_frames=4, video_max_pixels=56 * 56,
                                             image_max_pixels=56 * 56, video_min_pixels=784, image_min_pixels=784)
    encoded = [encoding.encode_prompt(s, tokenizer, budget) for s in pair]
    bare = [encoding.encode_prompt(dataclasses.replace(s, video=None, image=None), tokenizer, budget) for s in pair]
    return pair, encoded, bare


def test_without_visuals_leaves_the_prompts_text(tokenizer, seed_bench_root, tiny_model_dir):
    """Each prompt of a left-padded batch (two questions of different lengths) becomes the chat
    prompt of the same sample with no video and no image, token for token, left-padded again,
    and no pixels or grids are left."""
    import encoding
    _, encoded, bare = two_prompts_one_video_apart(tokenizer, seed_bench_root, tiny_model_dir)
    assert len(bare[0]["input_ids"]) != len(bare[1]["input_ids"])   # the padding is exercised
    text = encoding.without_visuals(encoding.collate_prompts(encoded, tokenizer), tokenizer)
    assert set(text) == {"input_ids", "attention_mask", "sample_ids"}
    for row, keep, want in zip(text["input_ids"], text["attention_mask"], bare):
        assert row[keep.bool()].tolist() == want["input_ids"].tolist()
        assert keep.tolist() == sorted(keep.tolist())   # left padding


def completions_after(tokenizer, encoded, texts):
    import encoding
    import rollout
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    p = len(encoded)
    return rollout.Rollout(encoding.collate_prompts(encoded, tokenizer), ids.repeat(p, 1), mask.repeat(p, 1),
                           torch.zeros(len(texts) * p, dtype=torch.bool), texts * p, len(texts))


def test_the_text_reference_scores_after_the_text_alone(sensitive_model_dir, tokenizer, seed_bench_root):
    """score_rollout under --reference-input text gives each answer the confidence the reference
    has after the same sample's prompt without its video and image (encoded so from the start);
    under full, the confidence after the whole prompt. The sensitive model's confidence moves
    with the video, so cutting the switch (full scored either way) or scoring the text after
    the wrong prompt shows."""
    import config
    import models
    import train
    pair, encoded, bare = two_prompts_one_video_apart(tokenizer, seed_bench_root, sensitive_model_dir)
    texts = ["<think>the square is red</think><answer>B</answer><|im_end|>",
             "<think>it moves left</think><answer>C</answer><|im_end|>"]
    ref = reference.make_reference(models.load_model(sensitive_model_dir, "sdpa"))
    conf = {}
    for mode in ("full", "text"):
        cfg = config.parse_config(["--reference-input", mode, "--num-generations", "2", "--conf-cap", "1.0"])
        conf[mode] = train.score_rollout(cfg, completions_after(tokenizer, encoded, texts), pair, ref,
                                         tokenizer)["ref_conf"]                                    # [P, G]
    for i in range(2):
        alone_full, _ = reference.answer_logprob(ref, completions_after(tokenizer, encoded[i:i + 1], texts), tokenizer)
        alone_text, _ = reference.answer_logprob(ref, completions_after(tokenizer, bare[i:i + 1], texts), tokenizer)
        torch.testing.assert_close(conf["full"][i], alone_full.exp(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(conf["text"][i], alone_text.exp(), rtol=1e-4, atol=1e-6)
    assert (conf["full"] - conf["text"]).abs().max() > 1e-3


def test_text_reference_is_cares_alone():
    import config
    with pytest.raises(SystemExit):
        config.parse_config(["--algo", "grpo", "--reference-input", "text"])
    with pytest.raises(SystemExit):
        config.parse_config(["--reference-input", "video"])


@pytest.mark.parametrize("kind", ["model", "lora"])
def test_the_text_reference_on_both_families_and_under_lora(kind, family, family_tiny_dir, tokenizer,
                                                            seed_bench_root):
    """The same as above for each model family, with the reference a model (EMA and frozen alike:
    they differ in their updates, not in how they score) or LoRA's EMA adapters swapped into the
    policy: the text-only confidence is what the sample without visuals gets."""
    import config
    import lora
    import models
    import train
    pair, encoded, bare = two_prompts_one_video_apart(tokenizer, seed_bench_root, family_tiny_dir)
    texts = ["<think>red</think><answer>B</answer><|im_end|>", "<think>left</think><answer>C</answer><|im_end|>"]
    flags = ["--reference-input", "text", "--num-generations", "2", "--conf-cap", "1.0"]
    model = models.load_model(family_tiny_dir, "sdpa")
    if kind == "lora":
        cfg = config.parse_config([*flags, "--model", family_tiny_dir, "--lora-rank", "4"])
        lora.add_adapters(model, cfg)
        with torch.no_grad():  # adapters that change the scores: the EMA copies them
            for name, p in lora.adapter_parameters(model).items():
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        ref = lora.make_reference(cfg, model)
    else:
        ref = reference.make_reference(model)
    conf = train.score_rollout(config.parse_config(flags), completions_after(tokenizer, encoded, texts), pair, ref,
                               tokenizer)["ref_conf"]                                             # [P, G]
    for i in range(2):
        alone, _ = reference.answer_logprob(ref, completions_after(tokenizer, bare[i:i + 1], texts), tokenizer)
        torch.testing.assert_close(conf[i], alone.exp(), rtol=1e-4, atol=1e-6)
