"""bench/static_decode.py (measured, not adopted): a static KV cache and a compiled decode
step give the same tokens as rollout.generate's dynamic cache, greedy and sampled, with one
prefill per group, including rows that stop early; and the benches that time the two run."""

import os
import sys

import torch

import data
import encoding
import models
import rollout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import static_decode  # noqa: E402  (bench/)

SMALL = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56, video_min_pixels=28 * 28,
             image_min_pixels=28 * 28)


def encoded_prompts(model_dir, tokenizer, root):
    """A video + image prompt and an image-only one (different widths and 3D-RoPE offsets)."""
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root)
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL)
    both = next(s for s in samples if s.video and s.image)
    image_only = next(s for s in samples if not s.video)
    return [encoding.encode_prompt(s, tokenizer, budget) for s in (both, image_only)]


def an_early_stop(ids, eos):
    """A token to use as end of turn so that some rows stop early and others run on: one that
    occurs in some rows of ids (not at the first position) but not in all (eos: the stop ids)."""
    rows = [set(r[1:].tolist()) for r in ids]
    for token in sorted(set().union(*rows) - set(eos)):
        if 0 < sum(token in r for r in rows) < len(rows):
            return [token]
    raise AssertionError("no token separates the rows")


def both_paths(model, prompts, tokenizer, g, gen, seeds):
    return (rollout.generate(model, prompts, tokenizer, g, gen, seeds=seeds),
            static_decode.generate(model, prompts, tokenizer, g, gen, seeds))


def assert_same(hf, static):
    assert torch.equal(hf.completion_ids, static.completion_ids)
    assert torch.equal(hf.completion_mask, static.completion_mask)
    assert torch.equal(hf.truncated, static.truncated)
    assert hf.texts == static.texts


def test_cache_length_rounds_up_to_a_bucket():
    assert static_decode.cache_length(1665, 32) == 1792
    assert static_decode.cache_length(200, 56) == 256
    assert static_decode.cache_length(200, 57) == 512


def test_greedy_groups_give_the_same_tokens(family_tiny_dir, tokenizer, seed_bench_root):
    """G=4, 32 new tokens, one prefill per group, two groups of different prompts, greedy: the
    same token ids bit for bit, and the same early stops (an end-of-turn token picked so that
    one group stops early and the other does not)."""
    model = models.load_model(family_tiny_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(family_tiny_dir, tokenizer, seed_bench_root), tokenizer)
    gen = rollout.sampling_config(tokenizer, 32, do_sample=False, temperature=None, top_p=None, top_k=None)
    hf, static = both_paths(model, batch, tokenizer, 4, gen, seeds=[0, 1])
    assert_same(hf, static)
    gen.eos_token_id = an_early_stop(hf.completion_ids, gen.eos_token_id)
    hf, static = both_paths(model, batch, tokenizer, 4, gen, seeds=[0, 1])
    assert hf.truncated.any() and not hf.truncated.all()  # premise: some rows stop early
    assert_same(hf, static)


def test_sampled_groups_give_the_same_tokens(tiny_model_dir, tokenizer, seed_bench_root):
    """Sampling (temperature 1, top-p 0.95, suppressed vision tokens) from the same seed: the
    same tokens exactly, not only the same distribution, because the sampling code and the
    random draws are generate()'s own and the logits agree to the bit that decides them."""
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(tiny_model_dir, tokenizer, seed_bench_root), tokenizer)
    gen = rollout.sampling_config(tokenizer, 32)
    hf, static = both_paths(model, batch, tokenizer, 4, gen, seeds=[5, 6])
    assert_same(hf, static)
    assert len({tuple(r.tolist()) for r in hf.completion_ids}) == 8  # premise: really sampled
    gen.eos_token_id = an_early_stop(hf.completion_ids, gen.eos_token_id)
    hf, static = both_paths(model, batch, tokenizer, 4, gen, seeds=[5, 6])
    assert hf.truncated.any() and not hf.truncated.all()
    assert_same(hf, static)


def test_decode_bench_runs_on_cpu(tmp_path):
    """bench/decode.py end to end at a tiny shape: both paths timed, compile time kept apart."""
    import decode
    out = decode.main(["--tiny", "--lengths", "8", "--num-generations", "2", "--repeats", "1",
                       "--device", "cpu", "--json", str(tmp_path / "decode.json")])
    r = out["results"][0]
    assert r["tokens_per_second"]["hf"] > 0 and r["tokens_per_second"]["static"] > 0
    assert r["same_tokens"]
    assert (tmp_path / "decode.json").exists()


def test_only_the_static_path_compiles(tiny_model_dir, tokenizer, seed_bench_root, monkeypatch):
    """The static path really runs generate()'s compiled forward (on a CPU too), the default
    path never does."""
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(tiny_model_dir, tokenizer, seed_bench_root)[:1], tokenizer)
    calls = []
    real = model.get_compiled_call
    monkeypatch.setattr(model, "get_compiled_call", lambda config: calls.append(config) or real(config))
    gen = rollout.sampling_config(tokenizer, 4)
    rollout.generate(model, batch, tokenizer, 2, gen, seeds=[0])
    assert calls == []
    static_decode.generate(model, batch, tokenizer, 2, gen, seeds=[0])
    assert len(calls) == 1 and calls[0].mode == "reduce-overhead"


def test_gpu_bench_compares_the_decoders(tmp_path):
    """bench/gpu.py --decode (tiny, CPU): the same policy decodes both ways, both timed."""
    import gpu
    out = gpu.main(["--tiny", "--layers", "1", "--num-generations", "2", "--completion", "4",
                    "--warmup-completion", "2", "--repeat", "1", "--decode", "--decode-repeats", "1",
                    "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    d = out["results"][0]["decode"]
    assert d["length"] == 4 and d["tokens_per_second"]["static"] > 0 and d["same_tokens"]
