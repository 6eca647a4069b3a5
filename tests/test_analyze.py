"""analyze.py attention: the per-layer shares against attention weights computed directly
(eager attention's output_attentions), the reasoning/answer split, one layer's chunk of
probabilities alive at a time, a sample without a video, and the command's JSON and figures
for two checkpoints."""

import gc
import json
import weakref

import pytest
import torch
from conftest import SMALL_BUDGET

import analyze
import data
import encoding
import models
import tiny

COMPLETION = "<think>the square is red</think><answer>A</answer>"
BUDGET_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_BUDGET.items()]


def sharp_model(path, attn_implementation):
    """The tiny model with its language model's queries and keys scaled up 10x (logits 100x):
    the random model's attention is close to uniform, where a shifted query row or a wrong head
    mapping would barely change the shares; peaked, they change well beyond the tolerance."""
    model = models.load_model(path, attn_implementation).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(10.0)
                proj.bias.mul_(10.0)
    return model


def prompt_and_completion(root, model_dir, tokenizer, index, text=COMPLETION):
    """Validation sample `index` of the tiny data (3 has no video) as a batch of one, and the
    completion text's ids with the end of turn."""
    sample = data.load_samples(f"{root}/annotations/validation_L1.jsonl", root)[0][index]
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL_BUDGET)
    batch = encoding.collate_prompts([encoding.encode_prompt(sample, tokenizer, budget)], tokenizer)
    prompt = encoding.select_prompt(batch, 0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return sample, prompt, torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]), eos


def direct_shares(model_dir, prompt, completion, groups, tokenizer):
    """The same quantities from eager attention's full weights (output_attentions=True), with
    the model computing positions and the causal mask itself from the plain token sequence."""
    model = sharp_model(model_dir, "eager")
    ids = torch.cat([prompt["input_ids"][0], completion])[None]
    mm = torch.cat([prompt["mm_token_type_ids"][0], torch.zeros_like(completion)])[None]
    visuals = {k: prompt[k] for k in encoding.VISUAL_KEYS if k in prompt}
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                           output_attentions=True, **visuals).attentions     # layers x [1, H, L, L]
    width = prompt["input_ids"].shape[1]
    video = ids[0] == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image = ids[0] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    completion_keys = torch.arange(ids.shape[1]) >= width
    text = ~(video | image | completion_keys)
    shares, visual = [], 0
    for weights in attentions:
        rows = weights[0, :, width:].double()                                          # [H, T, L]
        per_class = torch.stack([rows[..., m].sum(-1) for m in (video, image, text, completion_keys)], -1)
        per_class = per_class.mean(0)                                                  # [T, 4]
        shares.append(torch.stack([per_class[groups == g].mean(0) for g in (0, 1)]))   # [2, 4]
        visual = visual + rows[:, groups >= 0][..., video | image].mean(0).mean(0) / len(attentions)
    return torch.stack(shares), visual


@pytest.mark.parametrize("index", [0, 3], ids=["video-and-image", "image-only"])
def test_shares_match_eager_attention_weights(family, family_tiny_dir, seed_bench_root, tokenizer, index, monkeypatch):
    """On every model family (their 3D positions and attention differ in the details)."""
    tiny_model_dir = family_tiny_dir
    sample, prompt, completion, eos = prompt_and_completion(seed_bench_root, tiny_model_dir, tokenizer, index)
    assert bool(sample.video) == (index == 0) and sample.image
    monkeypatch.setattr(analyze, "QUERY_CHUNK", 4)   # several chunks per layer
    got = analyze.sample_shares(sharp_model(tiny_model_dir, "sdpa"), prompt, completion, tokenizer, [eos])
    groups = analyze.token_groups(completion.tolist(), tokenizer, [eos])
    want, want_visual = direct_shares(tiny_model_dir, prompt, completion, groups, tokenizer)
    assert got["shares"].shape == (2, 2, 4)                     # layers, (reasoning, answer), classes
    torch.testing.assert_close(got["shares"], want, atol=1e-6, rtol=0)   # fp32: sdpa vs eager rounding
    torch.testing.assert_close(got["shares"].sum(-1), torch.ones(2, 2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert got["tokens"] == {"reasoning": int((groups == 0).sum()), "answer": 1}
    visual = torch.cat([v for v in (got["video"], got["image"]) if v is not None])
    torch.testing.assert_close(visual, want_visual, atol=1e-8, rtol=1e-4)
    assert (got["video"] is None) == (index == 3) and got["image"] is not None
    # Reasoning and answer rows, and the two layers, differ by far more than the tolerance.
    assert (want[:, 0] - want[:, 1]).abs().max() > 1e-3 and (want[0] - want[1]).abs().max() > 1e-3


def test_each_query_row_splits_into_shares_that_sum_to_one(tiny_model_dir, seed_bench_root, tokenizer, monkeypatch):
    _, prompt, completion, eos = prompt_and_completion(seed_bench_root, tiny_model_dir, tokenizer, 0)
    reduce, seen = analyze.ShareRecorder.reduce, []

    def checked(self, layer, probs, groups):
        per_class = probs @ self.one_hot                                  # [H, n, C]
        torch.testing.assert_close(per_class.sum(-1), torch.ones_like(per_class[..., 0]))
        assert (per_class > 0).all(dim=(0, 1)).tolist() == [True] * 4    # every class gets some attention
        seen.append(probs.shape[1])
        return reduce(self, layer, probs, groups)

    monkeypatch.setattr(analyze.ShareRecorder, "reduce", checked)
    analyze.sample_shares(sharp_model(tiny_model_dir, "sdpa"), prompt, completion, tokenizer, [eos])
    assert sum(seen) == 2 * len(completion)   # every completion token's row, in each of the 2 layers


def test_reasoning_and_answer_tokens(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def split(text, end=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if end else [])
        groups = analyze.token_groups(ids, tokenizer, [eos])
        assert len(groups) == len(ids)
        pick = lambda g: tokenizer.decode([i for i, x in zip(ids, groups.tolist()) if x == g])
        return pick(0), pick(1), groups

    # The tiny BPE merges the answer tag's "<" onto "</think>": that token is reasoning.
    reasoning, answer, groups = split(COMPLETION)
    assert reasoning == "<think>the square is red</think><" and answer == ">A" and groups[-1] == -1
    # The last answer counts; a quoted tag inside the reasoning stays reasoning.
    reasoning, answer, _ = split("<think>not <answer>B</answer> but</think>\n<answer> C </answer>")
    assert reasoning == "<think>not <answer>B</answer> but</think>\n" and answer == "C"
    # No answer tags: every token but the end of turn is reasoning; cut short: the last one too.
    reasoning, answer, groups = split("the square is red")
    assert reasoning == "the square is red" and answer == "" and groups[-1] == -1
    reasoning, answer, groups = split("<think>red</think><answer>A", end=False)
    assert reasoning == "<think>red</think><answer>A" and (groups == 0).all()
    # An empty answer: reasoning before the tag, no answer tokens.
    reasoning, answer, _ = split("<think>red</think><answer> </answer>")
    assert reasoning.startswith("<think>red</think>") and answer == ""


def test_one_chunk_of_one_layer_exists_at_a_time(tiny_model_dir, seed_bench_root, tokenizer, monkeypatch):
    """The probabilities are computed for the completion rows only, a chunk at a time, and each
    chunk is gone before the next one (of this layer or the next) is computed: nothing keeps them."""
    _, prompt, completion, eos = prompt_and_completion(seed_bench_root, tiny_model_dir, tokenizer, 0)
    monkeypatch.setattr(analyze, "QUERY_CHUNK", 5)
    probs_of, alive, shapes = analyze.attention_probs, [], []

    def tracked(query, key, mask, rows, scaling):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier chunk's probabilities are still alive"
        probs = probs_of(query, key, mask, rows, scaling)
        alive.append(weakref.ref(probs))
        shapes.append(tuple(probs.shape))
        return probs

    monkeypatch.setattr(analyze, "attention_probs", tracked)
    model = sharp_model(tiny_model_dir, "sdpa")
    analyze.sample_shares(model, prompt, completion, tokenizer, [eos])
    length, heads = prompt["input_ids"].shape[1] + len(completion), model.config.text_config.num_attention_heads
    chunks = [min(5, len(completion) - s) for s in range(0, len(completion), 5)]
    assert shapes == [(heads, n, length) for n in chunks] * 2   # 2 layers, completion rows only
    gc.collect()
    assert all(r() is None for r in alive)


def test_command_writes_json_and_figures_for_two_checkpoints(tiny_model_dir, seed_bench_root, tmp_path):
    other = tiny.build_model(str(tmp_path / "other"), seed=1)
    out = tmp_path / "out"
    report = analyze.main(["attention", "--models", tiny_model_dir, other, "--labels", "base", "rl",
                           "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl", "--data-root", seed_bench_root,
                           "--limit", "2", "--max-new-tokens", "5", "--output-dir", str(out), *BUDGET_FLAGS])
    written = json.loads((out / "attention.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert [c["label"] for c in written["checkpoints"]] == ["base", "rl"]
    for ckpt in written["checkpoints"]:
        assert len(ckpt["layers"]["reasoning"]["visual"]) == 2 and len(ckpt["samples"]) == 2
        layer0 = {c: ckpt["layers"]["reasoning"][c][0] for c in analyze.KEY_CLASSES}
        assert sum(layer0.values()) == pytest.approx(1, abs=1e-5)
        assert ckpt["layers"]["reasoning"]["visual"][0] == pytest.approx(layer0["video"] + layer0["image"], abs=1e-5)
        # 4 frames of 56x84 within 56*56 pixels: 2 temporal patches of 1x2 merged patches, [t][h][w]
        assert ckpt["heatmap"]["sample_id"] == "l1_00000" and torch.tensor(ckpt["heatmap"]["video"]).shape == (2, 1, 2)
    # greedy from random weights: no answer tags, so reasoning only
    assert written["checkpoints"][0]["samples_with_tokens"]["answer"] == 0
    assert written["checkpoints"][0]["layers"] != written["checkpoints"][1]["layers"]
    for name in ("attention.png", "attention_heatmap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_reads_completions_and_draws_an_image_only_sample(tiny_model_dir, seed_bench_root, tmp_path):
    rows = [{"sample_id": f"l1_{i:05d}", "completion": COMPLETION} for i in range(4)]
    completions = tmp_path / "predictions.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    report = analyze.main(["attention", "--models", tiny_model_dir, "--data-root", seed_bench_root,
                           "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl", "--limit", "4",
                           "--completions", str(completions),
                           "--heatmap-sample", "l1_00003", "--output-dir", str(out), *BUDGET_FLAGS])
    ckpt = report["checkpoints"][0]
    assert ckpt["label"] == tiny_model_dir and ckpt["samples_with_tokens"] == {"reasoning": 4, "answer": 4}
    assert [s["completion"] for s in ckpt["samples"]] == [COMPLETION] * 4
    assert [s["tokens"]["answer"] for s in ckpt["samples"]] == [1] * 4
    assert ckpt["heatmap"]["video"] is None and torch.tensor(ckpt["heatmap"]["image"]).shape == (1, 1, 2)  # [1][h][w]
    assert (out / "attention_heatmap.png").exists()


def test_command_refuses_bad_settings(tiny_model_dir, seed_bench_root, tmp_path):
    common = ["attention", "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl", "--data-root",
              seed_bench_root, "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        analyze.main(common + ["--models", tiny_model_dir, "--labels", "a", "b"])
    with pytest.raises(data.DataError, match="not among the 2 samples"):
        analyze.main(common + ["--models", tiny_model_dir, "--limit", "2", "--heatmap-sample", "l1_00003"])
    missing = tmp_path / "none.jsonl"
    missing.write_text(json.dumps({"sample_id": "l1_00000", "completion": COMPLETION}) + "\n")
    with pytest.raises(data.DataError, match="no completion for sample"):
        analyze.main(common + ["--models", tiny_model_dir, "--limit", "2", "--completions", str(missing), *BUDGET_FLAGS])
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"sample_id": "l1_00000", "completion": c}) + "\n" for c in (COMPLETION, "B")))
    with pytest.raises(data.DataError, match="two different completions"):
        analyze.main(common + ["--models", tiny_model_dir, "--limit", "1", "--completions", str(twice), *BUDGET_FLAGS])


def test_the_prompt_template_reaches_the_analysed_prompts(tiny_model_dir, seed_bench_root, tmp_path, capsys,
                                                          monkeypatch):
    """--prompt-template: the layout the model was trained with is the one analysed (recorded in
    the report); a bad template stops the command in one line."""
    import encoding
    seen = []
    real = encoding.encode_batch
    monkeypatch.setattr(encoding, "encode_batch", lambda *a, **k: seen.append(k["template"]) or real(*a, **k))
    report = analyze.main(["attention", "--models", tiny_model_dir, "--data-root", seed_bench_root,
                           "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl", "--limit", "1",
                           "--max-new-tokens", "2", "--output-dir", str(tmp_path / "out"),
                           "--prompt-template", "official", *BUDGET_FLAGS])
    assert seen and all(t.name == "official" for t in seen) and report["settings"]["prompt_template"] == "official"
    bad = tmp_path / "bad.txt"
    bad.write_text("{Question}")
    with pytest.raises(SystemExit):
        analyze.main(["attention", "--models", tiny_model_dir, "--data-root", seed_bench_root, "--data",
                      f"{seed_bench_root}/annotations/validation_L1.jsonl", "--output-dir", str(tmp_path),
                      "--prompt-template", str(bad)])
    assert "unknown placeholder(s) {Question}" in capsys.readouterr().err
