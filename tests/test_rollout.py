"""Group sampling and scoring on the tiny model, with real video and image prompts."""

import contextlib
import dataclasses

import pytest
import torch

import data
import encoding
import models
import rollout
from bench import baselines

SMALL = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56, video_min_pixels=28 * 28,
             image_min_pixels=28 * 28)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return models.load_model(tiny_model_dir, "sdpa").eval()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir, tokenizer, seed_bench_root):
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(tiny_model_dir, **SMALL)
    with_video = next(s for s in samples if s.video)
    image_only = next(s for s in samples if not s.video)
    return [encoding.encode_prompt(s, tokenizer, budget) for s in (with_video, image_only)]


def test_completion_mask_covers_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 9, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, truncated = rollout.completion_mask_from_ids(ids, eos_ids=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_a_completion_stops_at_every_end_of_sequence_of_the_checkpoint(model, tokenizer, prompts):
    """The tiny checkpoint, like the real ones, ends a sequence at <|im_end|> or <|endoftext|>: a
    model pushed to write <|endoftext|> stops there, and the mask and the text follow. With
    <|im_end|> alone as the stop it would run on to max_new_tokens."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stop = rollout.stop_ids(tokenizer, model)
    assert stop == sorted({eot, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    batch = encoding.collate_prompts(prompts, tokenizer)
    for stops, length in ((stop, 1), ([tokenizer.convert_tokens_to_ids("<|im_end|>")], 6)):
        config = rollout.sampling_config(tokenizer, max_new_tokens=6, stop=stops)
        config.sequence_bias = {(eot,): 100.0}   # <|endoftext|> first, whatever the model
        torch.manual_seed(0)
        completions = rollout.generate(model, batch, tokenizer, 2, config, seeds=[1, 2])
        assert completions.completion_mask.sum(1).tolist() == [length] * 4
        assert completions.truncated.tolist() == [length == 6] * 4
        assert completions.texts == [""] * 4


def test_sampling_ignores_checkpoint_generation_config(model, tokenizer, prompts):
    # The tiny checkpoint ships top_k=1 (like Qwen2.5-VL's near-greedy defaults).
    assert model.generation_config.top_k == 1
    batch = encoding.collate_prompts(prompts[:1], tokenizer)
    torch.manual_seed(0)
    inherited = model.generate(**encoding.model_inputs(batch), max_new_tokens=8, num_return_sequences=8)
    assert len({tuple(r.tolist()) for r in inherited}) == 1  # premise: top_k=1 collapses the group

    config = rollout.sampling_config(tokenizer, max_new_tokens=8)
    completions = rollout.generate(model, batch, tokenizer, 8, config)
    assert completions.completion_ids.shape[0] == 8
    assert len({tuple(r.tolist()) for r in completions.completion_ids}) > 4
    assert model.generation_config.top_k == 1  # the checkpoint's own defaults are put back


def test_visual_placeholders_are_never_sampled(model, tokenizer, prompts):
    batch = encoding.collate_prompts(prompts, tokenizer)
    torch.manual_seed(0)
    completions = rollout.generate(model, batch, tokenizer, 8, rollout.sampling_config(tokenizer, max_new_tokens=32))
    banned = set(tokenizer.convert_tokens_to_ids(list(rollout.VISION_TOKENS)))
    assert not banned & set(completions.completion_ids.flatten().tolist())


def test_two_prompts_score_like_one(model, tokenizer, prompts):
    """A batch of P prompts (left-padded, mixed video+image / image-only) gives every sequence
    the same log-probs as scoring its prompt alone."""
    torch.manual_seed(0)
    g = 3
    both = encoding.collate_prompts(prompts, tokenizer)
    completions = rollout.generate(model, both, tokenizer, g, rollout.sampling_config(tokenizer, max_new_tokens=10))
    with torch.no_grad():
        logp = rollout.completion_logprobs(model, completions)
        for i, enc in enumerate(prompts):
            rows = slice(i * g, (i + 1) * g)
            single = rollout.Rollout(encoding.collate_prompts([enc], tokenizer), completions.completion_ids[rows],
                                     completions.completion_mask[rows], completions.truncated[rows], completions.texts[rows], g)
            alone = rollout.completion_logprobs(model, single)
            m = completions.completion_mask[rows].bool()
            torch.testing.assert_close(logp[rows][m], alone[m], rtol=1e-4, atol=1e-4)


def test_logprobs_match_a_plain_forward(model, tokenizer, prompts):
    """Values and gradients of the chunked log-probs equal log_softmax over full logits, for any
    chunk size (1 token, a few tokens, more than the whole completion); 0 after the end of turn."""
    torch.manual_seed(1)
    batch = encoding.collate_prompts(prompts, tokenizer)
    completions = rollout.generate(model, batch, tokenizer, 3, rollout.sampling_config(tokenizer, max_new_tokens=12))
    t = completions.completion_ids.shape[1]
    # A random model rarely ends its turn: end some rows early by hand (padding after them).
    ends = torch.tensor([t, 3, 7, 1, t, 5])
    completions = dataclasses.replace(completions, completion_mask=(torch.arange(t)[None] < ends[:, None]).float())
    mask = completions.completion_mask.bool()

    model.zero_grad()
    full = model(**baselines.repeated(model, completions)[0]).logits.log_softmax(-1)
    expected = full[:, -t - 1:-1].gather(-1, completions.completion_ids[..., None]).squeeze(-1)
    (expected * mask).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for chunk in (1, 5, 10_000):
        model.zero_grad()
        logp = rollout.completion_logprobs(model, completions, chunk_size=chunk)
        torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-5, atol=1e-5)
        assert (logp[~mask] == 0).all()
        logp.sum().backward()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, chunk=chunk: f"{name} (chunk {chunk}): {m}")
    model.zero_grad()
    # The head is restored: a plain forward gives logits again.
    assert model(**baselines.repeated(model, completions)[0]).logits.shape[-1] == model.config.text_config.vocab_size


def test_chunks_bound_the_logits_held_at_once(model, tokenizer, prompts, monkeypatch):
    """Only chunk_size positions go through the LM head per call, and only completion tokens."""
    torch.manual_seed(2)
    completions = rollout.generate(model, encoding.collate_prompts(prompts, tokenizer), tokenizer, 2,
                            rollout.sampling_config(tokenizer, max_new_tokens=9))
    seen = []
    real = rollout._chunk_logprobs
    monkeypatch.setattr(rollout, "_chunk_logprobs", lambda h, w, y: seen.append(len(y)) or real(h, w, y))
    with torch.no_grad():
        rollout.completion_logprobs(model, completions, chunk_size=4)
    n = int(completions.completion_mask.sum())
    assert sum(seen) == n and max(seen) == 4 and len(seen) == -(-n // 4)


def test_select_prompt_is_the_prompt_alone(prompts, tokenizer):
    both = encoding.collate_prompts(prompts, tokenizer)
    for i, enc in enumerate(prompts):
        alone = encoding.collate_prompts([enc], tokenizer)
        picked = encoding.select_prompt(both, i)
        assert sorted(picked) == sorted(k for k in alone if k != "sample_ids")
        for key, value in picked.items():
            assert torch.equal(value, alone[key]), key


def test_seeded_groups_do_not_depend_on_the_batch(model, tokenizer, prompts):
    """With a seed per prompt, a prompt's group is the same whether it is sampled alone or next
    to another prompt (what makes a 2-process run equal a 1-process run)."""
    config = rollout.sampling_config(tokenizer, max_new_tokens=8)
    both = rollout.generate(model, encoding.collate_prompts(prompts, tokenizer), tokenizer, 3, config, seeds=[11, 22])
    for i, (enc, seed) in enumerate(zip(prompts, (11, 22))):
        alone = rollout.generate(model, encoding.collate_prompts([enc], tokenizer), tokenizer, 3, config, seeds=[seed])
        assert both.texts[3 * i:3 * i + 3] == alone.texts
    other = rollout.generate(model, encoding.collate_prompts(prompts, tokenizer), tokenizer, 3, config, seeds=[12, 22])
    assert other.texts[:3] != both.texts[:3] and other.texts[3:] == both.texts[3:]


# --- each group's prompt and visuals through the model once per scoring forward --------------

def encode_three_kinds(model_dir, tokenizer, seed_bench_root):
    """A video-only, an image-only and a video-plus-image prompt, encoded for model_dir's family."""
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL)
    both = next(s for s in samples if s.video and s.image)
    image_only = next(s for s in samples if not s.video)
    video_only = dataclasses.replace(both, sample_id="video-only", image=None)
    return [encoding.encode_prompt(s, tokenizer, budget) for s in (video_only, image_only, both)]


@pytest.fixture(scope="module")
def three_kinds(tiny_model_dir, tokenizer, seed_bench_root):
    return encode_three_kinds(tiny_model_dir, tokenizer, seed_bench_root)


def encoder_calls(model):
    """Grids the vision tower is called with, one list per call."""
    calls = []
    model.model.visual.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["grid_thw"].tolist()), with_kwargs=True)
    return calls


@pytest.mark.parametrize("train_vision", [True, False])
@pytest.mark.parametrize("kinds", [[0], [1], [2], [0, 1, 2]], ids=["video", "image", "video+image", "mixed-batch"])
def test_packed_groups_give_the_repeated_logprobs_loss_and_gradients(family_tiny_dir, tokenizer, seed_bench_root,
                                                                      train_vision, kinds):
    """Packing each prompt and its G completions into one row (the prompt and its visuals
    through the model once) is the same computation as the public code's G full sequences:
    log-probs, loss and every gradient (the vision tower's included, summed over the G
    sequences) agree to float rounding. In every model family: the packed positions come from
    the family's own 3D RoPE."""
    import care
    three_kinds = encode_three_kinds(family_tiny_dir, tokenizer, seed_bench_root)
    model = models.load_model(family_tiny_dir, "sdpa").train()
    model.model.visual.requires_grad_(train_vision)
    g = 3
    torch.manual_seed(3)
    completions = rollout.generate(model, encoding.collate_prompts([three_kinds[k] for k in kinds], tokenizer), tokenizer,
                            g, rollout.sampling_config(tokenizer, max_new_tokens=6), seeds=[5] * len(kinds))
    adv = torch.linspace(-1, 1, g * len(kinds))
    results = {}
    for packed in (True, False):
        model.zero_grad()
        calls = encoder_calls(model)
        logp = rollout.completion_logprobs(model, completions, chunk_size=4, layout=None if packed else baselines.repeated)
        loss, _ = care.policy_loss(logp, adv, completions.completion_mask)
        loss.backward()
        model.model.visual._forward_hooks.clear()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = (logp.detach(), loss.detach(), grads, calls)
    (lp_s, loss_s, grads_s, calls_s), (lp_r, loss_r, grads_r, calls_r) = results[True], results[False]
    torch.testing.assert_close(lp_s, lp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-7)
    assert set(grads_s) == set(grads_r)
    assert any("visual" in n for n in grads_s) == train_vision
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # One encoding per prompt and visual instead of G.
    n_visuals = sum(int(k in (0, 2)) + int(k in (1, 2)) for k in kinds)
    assert sum(len(c) for c in calls_s) == n_visuals and sum(len(c) for c in calls_r) == g * n_visuals


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["video", "image", "video+image"])
def test_one_prefill_per_group_samples_what_g_prefills_sample(family_tiny_dir, tokenizer, seed_bench_root, kind):
    """Generation encodes the prompt's visuals and prefills the prompt once, then the G samples
    continue from copies of its cache: the same tokens as G separate prefills, for 1 vision call
    and 1 prefill instead of G of each; in every model family."""
    three_kinds = encode_three_kinds(family_tiny_dir, tokenizer, seed_bench_root)
    model = models.load_model(family_tiny_dir, "sdpa")
    batch = encoding.collate_prompts([three_kinds[kind]], tokenizer)
    config = rollout.sampling_config(tokenizer, max_new_tokens=10)
    prefills = []
    model.model.language_model.register_forward_hook(
        lambda mod, args, kwargs, out: prefills.append(kwargs["inputs_embeds"].shape[0])  # rows prefilled
        if kwargs["inputs_embeds"].shape[1] > 1 else None,
        with_kwargs=True)
    runs = {}
    for share in (True, False):
        calls = encoder_calls(model)
        prefills.clear()
        completions = rollout.generate(model, batch, tokenizer, 4, config, seeds=[9],
                                batch_inputs=None if share else baselines.repeated_inputs)
        model.model.visual._forward_hooks.clear()
        runs[share] = (completions, sum(len(c) for c in calls), sum(prefills))
    (shared, vision_s, prefill_s), (repeated, vision_r, prefill_r) = runs[True], runs[False]
    assert torch.equal(shared.completion_ids, repeated.completion_ids)
    assert len(set(shared.texts)) > 1  # a real group, not G copies of one answer
    n_visuals = 1 + (kind == 2)
    assert (vision_s, prefill_s) == (n_visuals, 1)
    assert (vision_r, prefill_r) == (4 * n_visuals, 4)


@pytest.mark.parametrize("kernel", ["default", "math"])
def test_padded_packed_rows_score_like_each_row_alone(model, tokenizer, three_kinds, kernel):
    """P packed rows of different lengths go through one forward, right-padded: each prompt
    gets the log-probs it gets alone, on the default sdpa kernel and on the math one (which
    GPUs fall back to when the fused kernels decline a mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(4)
    completions = rollout.generate(model, encoding.collate_prompts(three_kinds, tokenizer), tokenizer, 2,
                            rollout.sampling_config(tokenizer, max_new_tokens=5), seeds=[1, 2, 3])
    lengths = [three_kinds[i]["input_ids"].shape[0] + int(completions.completion_mask[2 * i:2 * i + 2].sum()) for i in range(3)]
    assert len(set(lengths)) > 1  # premise: the rows are padded
    with torch.no_grad(), (sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext()):
        together = rollout.completion_logprobs(model, completions)
        for i, enc in enumerate(three_kinds):
            rows = slice(2 * i, 2 * i + 2)
            alone = rollout.Rollout(encoding.collate_prompts([enc], tokenizer), completions.completion_ids[rows],
                                    completions.completion_mask[rows], completions.truncated[rows], completions.texts[rows], 2)
            torch.testing.assert_close(together[rows], rollout.completion_logprobs(model, alone), rtol=1e-5, atol=1e-5)


def test_packed_scoring_runs_sdpa_whatever_the_model_uses(tiny_model_dir, tokenizer, three_kinds):
    """A model loaded with another attention (eager here; flash-attention 2 on GPU) scores the
    packed rows with sdpa, which takes their mask, and gets its own attention back after."""
    model = models.load_model(tiny_model_dir, "eager").eval()
    torch.manual_seed(5)
    completions = rollout.generate(model, encoding.collate_prompts([three_kinds[2]], tokenizer), tokenizer, 3,
                            rollout.sampling_config(tokenizer, max_new_tokens=6), seeds=[3])
    seen = []
    layer = model.model.language_model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.config._attn_implementation))
    with torch.no_grad():
        packed = rollout.completion_logprobs(model, completions)
        repeated = rollout.completion_logprobs(model, completions, layout=baselines.repeated)
    assert seen == ["sdpa", "eager"]
    assert model.model.language_model.config._attn_implementation == "eager"
    mask = completions.completion_mask.bool()
    torch.testing.assert_close(packed[mask], repeated[mask], rtol=1e-5, atol=1e-5)


def test_generation_never_uses_cudnn_attention(model, tokenizer, prompts):
    """cuDNN's sdpa builds a plan per new key length (8x slower first rollouts on an H200):
    every decode forward runs with it off, and the flags are restored afterwards."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda mod, args: seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    try:
        rollout.generate(model, encoding.collate_prompts(prompts[:1], tokenizer), tokenizer, 2,
                         rollout.sampling_config(tokenizer, max_new_tokens=4), seeds=[1])
    finally:
        handle.remove()
    decode = seen[1:]  # the first forward is the shared prefill
    assert decode and all(not cudnn and flash for cudnn, flash in decode)
    assert torch.backends.cuda.cudnn_sdp_enabled()


# --- a model that sees its prompt: a mix-up of prompts, videos or groups changes the values ---

@pytest.fixture(scope="module")
def sensitive(sensitive_model_dir):
    return models.load_model(sensitive_model_dir, "sdpa").eval()


def one_part_changed(tokenizer, seed_bench_root, model_dir):
    """Prompts of one token length that differ in one part each: a sample with a video and an
    image, then the same with another clip's video, with another's image, with its options
    reversed."""
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    a, b = [s for s in samples if s.video][:2]
    variants = [a, dataclasses.replace(a, video=b.video), dataclasses.replace(a, image=b.image),
                dataclasses.replace(a, options=a.options[::-1])]
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL)
    encoded = [encoding.encode_prompt(s, tokenizer, budget) for s in variants]
    assert len({len(e["input_ids"]) for e in encoded}) == 1   # a mix-up cannot show as a shape error
    return encoded


def scored_under_each(model, tokenizer, prompts, text="<think>the square is red</think><answer>B</answer><|im_end|>"):
    """[P, T] log-probs of one completion under each prompt, P groups of one in one forward."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    p = len(prompts)
    roll = rollout.Rollout(encoding.collate_prompts(prompts, tokenizer), ids.repeat(p, 1), torch.ones(p, len(ids)),
                           torch.zeros(p, dtype=torch.bool), [text] * p, 1)
    with torch.no_grad():
        return rollout.completion_logprobs(model, roll)


def test_the_sensitive_model_sees_every_part_of_its_prompt(sensitive, model, tokenizer, seed_bench_root,
                                                           sensitive_model_dir, tiny_model_dir):
    """A completion's log-probs move with the video, the image and the options under the
    prompt-sensitive fixture (by a mean of ~0.4, 0.03 and 0.5 nats a token), and barely under the
    plain tiny model, which is why the mix-up tests below use it."""
    moved = {}
    for name, net, model_dir in (("sensitive", sensitive, sensitive_model_dir), ("plain", model, tiny_model_dir)):
        logp = scored_under_each(net, tokenizer, one_part_changed(tokenizer, seed_bench_root, model_dir))
        moved[name] = [(logp[k] - logp[0]).abs().mean().item() for k in (1, 2, 3)]   # video, image, options
    video, image, options = moved["sensitive"]
    assert video > 0.1 and image > 0.01 and options > 0.1
    assert max(moved["plain"]) < 0.02


def test_each_group_is_sampled_from_its_own_prompt(sensitive, tokenizer, seed_bench_root, sensitive_model_dir):
    """Four groups under one seed, their prompts differing in one part each: every group gets
    its own prompt's completions (what it gets alone), and they differ from one another, so a
    group sampled from another group's prompt, video or cache would show."""
    prompts = one_part_changed(tokenizer, seed_bench_root, sensitive_model_dir)
    config = rollout.sampling_config(tokenizer, max_new_tokens=8)
    # 4 rows a group: the image moves the sensitive model's logits least (0.03 nats a token), and
    # Gumbel-max turns a small change of the logits into another token rarely: with 2 rows the
    # image's group wrote what group 0 wrote, with 4 one row of it differs.
    together = rollout.generate(sensitive, encoding.collate_prompts(prompts, tokenizer), tokenizer, 4, config,
                                seeds=[5] * 4)
    groups = [tuple(together.texts[4 * i:4 * i + 4]) for i in range(4)]
    for enc, group in zip(prompts, groups):
        alone = rollout.generate(sensitive, encoding.collate_prompts([enc], tokenizer), tokenizer, 4, config, seeds=[5])
        assert tuple(alone.texts) == group
    assert len(set(groups)) == 4


def test_each_group_is_scored_under_its_own_prompt(sensitive, tokenizer, seed_bench_root, sensitive_model_dir):
    """One completion scored under four prompts in one packed forward: each row equals that
    prompt scored alone, and the rows differ (by > 0.01 nats a token), so scoring a group under
    another prompt would show."""
    prompts = one_part_changed(tokenizer, seed_bench_root, sensitive_model_dir)
    together = scored_under_each(sensitive, tokenizer, prompts)
    for k, enc in enumerate(prompts):
        torch.testing.assert_close(together[k:k + 1], scored_under_each(sensitive, tokenizer, [enc]), rtol=1e-4, atol=1e-5)
        if k:
            assert (together[k] - together[0]).abs().mean() > 0.01


# --- one decode for the whole batch, each row on its own random stream -------------------------

def test_each_row_samples_the_processed_distribution():
    """SeededSampling draws token i with the probability temperature, top-k and top-p leave it
    (transformers' warpers): 20,000 rows of one set of logits, each on its own seed, against
    those probabilities by a chi-square test (top-p keeps 5 tokens, 4 degrees of freedom: a
    statistic below 18.5 is a p-value above 0.001; a sampler that ignored top-p, or drew from
    the raw logits, would be far off), and tokens top-p removed are never drawn."""
    from transformers.generation import TopPLogitsWarper
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -4.0, -5.0]])
    gen = rollout.GenerationConfig(temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=1)
    rows = 20_000
    sampler = rollout.SeededSampling(gen, list(range(rows)), prompt_width=0, device="cpu")
    out = sampler(torch.zeros(rows, 0, dtype=torch.long), logits.repeat(rows, 1))
    drawn = out.argmax(dim=1)
    assert torch.all(out.max(dim=1).values == 0) and torch.all(torch.isinf(out).sum(1) == logits.shape[1] - 1)
    kept = TopPLogitsWarper(0.95)(None, logits / 0.7)
    p = torch.softmax(kept, dim=-1)[0].double()
    counts = torch.bincount(drawn, minlength=logits.shape[1]).double()
    assert counts[p == 0].sum() == 0 and (p > 0).sum() == 5   # top-p keeps 5 of the 10
    expected = rows * p[p > 0]
    chi2 = ((counts[p > 0] - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5, (counts.tolist(), expected.tolist())
    raw = torch.softmax(logits, dim=-1)[0].double() * rows   # the unprocessed distribution does not fit
    assert (((counts - raw) ** 2) / raw).sum().item() > 300


def test_a_rows_draws_are_its_own(tokenizer):
    """Row j of a prompt with seed s draws from a stream fixed by (s, j): the same in any batch,
    different from the other rows and seeds."""
    seeds = rollout.row_seeds([7, 8], 3)
    assert seeds[:3] == rollout.row_seeds([7], 3) and seeds[3:] == rollout.row_seeds([8], 3)
    assert len(set(seeds)) == 6
    gen = rollout.GenerationConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5)
    both, alone = rollout.SeededSampling(gen, seeds, 0, "cpu"), rollout.SeededSampling(gen, seeds[3:], 0, "cpu")
    for step in (0, 4):
        assert torch.equal(both.gumbel(step, 50)[3:], alone.gumbel(step, 50))
        assert not torch.equal(both.gumbel(step, 50)[0], both.gumbel(step, 50)[1])
    assert not torch.equal(both.gumbel(0, 50), both.gumbel(1, 50))   # a new draw every step


def test_each_step_draws_anew():
    """Through SeededSampling itself, step after step on flat scores over 50 tokens: every row's
    token changes from step to step (ten equal draws have a chance of 50^-9), as it would not if
    a step reused another step's noise."""
    gen = rollout.GenerationConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10)
    sampler = rollout.SeededSampling(gen, [11, 12, 13, 14], prompt_width=3, device="cpu")
    tokens = torch.stack([sampler(torch.zeros(4, 3 + step, dtype=torch.long), torch.zeros(4, 50)).argmax(dim=1)
                          for step in range(10)], dim=1)                         # [rows, steps]
    assert all(len(set(row)) > 1 for row in tokens.tolist())
    again = rollout.SeededSampling(gen, [13], prompt_width=3, device="cpu")       # row 3 alone, same draws
    assert again(torch.zeros(1, 3 + 4, dtype=torch.long), torch.zeros(1, 50)).argmax().item() == tokens[2, 4].item()


def test_the_streams_are_splitmix64():
    """stream_uniform is splitmix64 in wrapping int64 arithmetic: seed 0's first output is
    0xE220A8397B1DCDAF (the generator's published first value), and any (key, index) pair gives
    what the same arithmetic on Python's unbounded integers gives, to the last bit."""
    import random
    mask = (1 << 64) - 1

    def splitmix(key, i):
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)
    assert splitmix(0, 0) == 0xE220A8397B1DCDAF
    rng = random.Random(0)
    keys, index = [rng.getrandbits(63) for _ in range(4)], [0, 1, 7, 151_935, 2 ** 40 + 3]
    got = rollout.stream_uniform(torch.tensor(keys)[:, None], torch.tensor([index]))
    want = torch.tensor([[((splitmix(k, i) >> 12) + 0.5) * 2.0 ** -52 for i in index] for k in keys], dtype=torch.float64)
    assert torch.equal(got, want) and 0 < got.min() and got.max() < 1


def test_four_prompts_of_different_lengths_decode_together_as_alone(sensitive, tokenizer, seed_bench_root,
                                                                     sensitive_model_dir):
    """Prompts with a video, with an image only, with both (different widths, 3D-RoPE offsets and
    left padding in the merged cache) decoded as one batch of 4 x 3 rows: each group is what it
    is alone, sampled and greedy; greedy also what transformers' own generate gives the prompt
    alone. Under the prompt-sensitive model, whose tokens move with positions and context (the
    plain tiny model's logits barely do, and Gumbel-max keeps a token through a small change)."""
    model = sensitive
    kinds = encode_three_kinds(sensitive_model_dir, tokenizer, seed_bench_root)
    prompts = [kinds[0], kinds[1], kinds[2], kinds[1]]
    assert len({len(e["input_ids"]) for e in prompts}) == 3
    batch = encoding.collate_prompts(prompts, tokenizer)
    sampled = rollout.sampling_config(tokenizer, max_new_tokens=10)
    greedy = rollout.sampling_config(tokenizer, max_new_tokens=10, do_sample=False, temperature=None, top_p=None,
                                     top_k=None)
    for config in (sampled, greedy):
        together = rollout.generate(model, batch, tokenizer, 3, config, seeds=[1, 2, 3, 4])
        for i, enc in enumerate(prompts):
            alone = rollout.generate(model, encoding.collate_prompts([enc], tokenizer), tokenizer, 3, config,
                                     seeds=[i + 1])
            assert together.texts[3 * i:3 * i + 3] == alone.texts
            if config is greedy:
                one = encoding.collate_prompts([enc], tokenizer)
                with rollout.own_generation_config(model, config):
                    hf = model.generate(**encoding.model_inputs(one), generation_config=config)
                ids = alone.completion_ids[0]
                n = int(alone.completion_mask[0].sum())
                assert hf[0, one["input_ids"].shape[1]:].tolist()[:n] == ids[:n].tolist()
    assert together.texts[3:6] == together.texts[9:12]   # one prompt twice, greedy: the same
