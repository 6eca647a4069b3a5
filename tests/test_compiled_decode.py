"""rollout.generate's decodes, --decode static (the default: a preallocated KV cache), dynamic
(transformers' growing cache) and compiled (the static cache, the language model's decode step
through torch.compile): the same tokens, greedy and sampled, in both families, including rows
that stop early; the 3D-RoPE offsets of one prompt batch never leak into the next; and the
benches that time the decoders run."""

import os
import sys

import torch

import data
import encoding
import models
import rollout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

SMALL = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56, video_min_pixels=28 * 28,
             image_min_pixels=28 * 28)


def encoded_prompts(model_dir, tokenizer, root, n=2):
    """A video + image prompt and an image-only one (different widths and 3D-RoPE offsets), then
    others."""
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root)
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL)
    both = [s for s in samples if s.video and s.image]
    image_only = [s for s in samples if not s.video]
    return [encoding.encode_prompt(s, tokenizer, budget) for s in (both[:1] + image_only[:1] + both[1:])[:n]]


def an_early_stop(ids, eos):
    """A token to use as end of turn so that some rows stop early and others run on: one that
    occurs in some rows of ids (not at the first position) but not in all (eos: the stop ids)."""
    rows = [set(r[1:].tolist()) for r in ids]
    for token in sorted(set().union(*rows) - set(eos)):
        if 0 < sum(token in r for r in rows) < len(rows):
            return [token]
    raise AssertionError("no token separates the rows")


def both_decodes(model, prompts, tokenizer, g, gen, seeds):
    """The default static decode and the compiled one; the dynamic cache's tokens too, checked equal."""
    static = rollout.generate(model, prompts, tokenizer, g, gen, seeds)
    assert_same(static, rollout.generate(model, prompts, tokenizer, g, gen, seeds, decode="dynamic"))
    return static, rollout.generate(model, prompts, tokenizer, g, gen, seeds, decode="compiled")


def assert_same(static, compiled):
    assert torch.equal(static.completion_ids, compiled.completion_ids)
    assert torch.equal(static.completion_mask, compiled.completion_mask)
    assert torch.equal(static.truncated, compiled.truncated)
    assert static.texts == compiled.texts


def test_cache_length_rounds_up_to_a_bucket():
    assert rollout.cache_length(1665, 32) == 1792
    assert rollout.cache_length(200, 56) == 256
    assert rollout.cache_length(200, 57) == 512


def test_greedy_groups_give_the_same_tokens(family_tiny_dir, tokenizer, seed_bench_root):
    """G=4, 32 new tokens, two groups of different prompts decoded together, greedy: the same
    token ids bit for bit, and the same early stops (an end-of-turn token picked so that some
    rows stop early and others do not)."""
    model = models.load_model(family_tiny_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(family_tiny_dir, tokenizer, seed_bench_root), tokenizer)
    gen = rollout.sampling_config(tokenizer, 32, do_sample=False, temperature=None, top_p=None, top_k=None)
    static, compiled = both_decodes(model, batch, tokenizer, 4, gen, seeds=[0, 1])
    assert_same(static, compiled)
    gen.eos_token_id = an_early_stop(static.completion_ids, gen.eos_token_id)
    static, compiled = both_decodes(model, batch, tokenizer, 4, gen, seeds=[0, 1])
    assert static.truncated.any() and not static.truncated.all()  # premise: some rows stop early
    assert_same(static, compiled)


def test_sampled_groups_give_the_same_tokens(tiny_model_dir, tokenizer, seed_bench_root):
    """Sampling (temperature 1, top-p 0.95, suppressed vision tokens) from the same seeds: the
    same tokens exactly, not only the same distribution, because the sampling and the random
    draws are the same code and the logits agree to the bit that decides them."""
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(tiny_model_dir, tokenizer, seed_bench_root), tokenizer)
    gen = rollout.sampling_config(tokenizer, 32)
    static, compiled = both_decodes(model, batch, tokenizer, 4, gen, seeds=[5, 6])
    assert_same(static, compiled)
    assert len({tuple(r.tolist()) for r in static.completion_ids}) == 8  # premise: really sampled
    gen.eos_token_id = an_early_stop(static.completion_ids, gen.eos_token_id)
    static, compiled = both_decodes(model, batch, tokenizer, 4, gen, seeds=[5, 6])
    assert static.truncated.any() and not static.truncated.all()
    assert_same(static, compiled)


FRESH_PROCESS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import models, rollout, tiny
batch = torch.load(sys.argv[3], weights_only=True)
tokenizer = tiny.build_tokenizer()
out = rollout.generate(models.load_model(sys.argv[2], "sdpa").eval(), batch, tokenizer, 2,
                       rollout.sampling_config(tokenizer, 12), [4, 5], decode="compiled")
print(json.dumps(out.completion_ids.tolist()))
"""


def test_one_prompt_batch_leaves_nothing_for_the_next(family_tiny_dir, tokenizer, seed_bench_root, tmp_path):
    """Two rollouts in a row, of prompts of different lengths and 3D-RoPE offsets, give the
    second the tokens a freshly loaded model gives it, every decode (transformers keeps
    the last batch's rope_deltas on the model; a compiled graph could keep shapes), and, for
    the compiled decode, the tokens a fresh process gives it (nothing of torch.compile's
    process-wide caches carries over)."""
    import json
    import subprocess
    prompts = encoded_prompts(family_tiny_dir, tokenizer, seed_bench_root, n=3)
    first, second = (encoding.collate_prompts(p, tokenizer) for p in (prompts[:1], prompts[1:]))
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    gen = rollout.sampling_config(tokenizer, 12)
    after = {}
    for decode in rollout.DECODES:
        used = models.load_model(family_tiny_dir, "sdpa").eval()
        rollout.generate(used, first, tokenizer, 2, gen, [3], decode=decode)
        again = rollout.generate(used, second, tokenizer, 2, gen, [4, 5], decode=decode)
        fresh = rollout.generate(models.load_model(family_tiny_dir, "sdpa").eval(), second, tokenizer, 2, gen, [4, 5],
                                 decode=decode)
        assert torch.equal(again.completion_ids, fresh.completion_ids), decode
        after[decode] = again.completion_ids
    torch.save(second, tmp_path / "second.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, root, family_tiny_dir, str(tmp_path / "second.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == after["compiled"].tolist()


def test_only_the_language_model_is_compiled(tiny_model_dir, tokenizer, seed_bench_root, monkeypatch):
    """--decode compiled compiles the language model's forward (once per model), not the whole
    model through generate(); the static and dynamic decodes compile nothing."""
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    batch = encoding.collate_prompts(encoded_prompts(tiny_model_dir, tokenizer, seed_bench_root)[:1], tokenizer)
    compiled, whole = [], []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real(fn, **kw))
    monkeypatch.setattr(model, "get_compiled_call", lambda config: whole.append(config))
    gen = rollout.sampling_config(tokenizer, 4)
    rollout.generate(model, batch, tokenizer, 2, gen, seeds=[0])
    rollout.generate(model, batch, tokenizer, 2, gen, seeds=[0], decode="dynamic")
    assert compiled == [] and whole == []
    for _ in range(2):
        rollout.generate(model, batch, tokenizer, 2, gen, seeds=[0], decode="compiled")
    assert len(compiled) == 1 and compiled[0].__self__ is model.model.language_model and whole == []
    assert "forward" not in vars(model.model.language_model)   # the eager forward is back


def test_decode_bench_runs_on_cpu(tmp_path):
    """bench/decode.py end to end at a tiny shape: one group at a time, one batched decode and
    the compiled one timed, compile time kept apart, the same completions every way."""
    import decode
    out = decode.main(["--tiny", "--prompts", "2", "--lengths", "6", "--num-generations", "2", "--repeats", "1",
                       "--paths", "per-group", "static", "dynamic", "compiled", "--device", "cpu",
                       "--json", str(tmp_path / "decode.json")])
    r = out["results"][0]
    assert r["rows"] == 4 and all(r["tokens_per_second"][p] > 0 for p in ("per-group", "static", "dynamic", "compiled"))
    assert r["same_tokens"] and r["rows_identical"] == 1.0 and r["speedup_over_per_group"]["static"] > 0
    assert "compile_seconds" in r
    assert (tmp_path / "decode.json").exists()


def test_gpu_bench_runs_lora_and_compares_the_decoders(tmp_path):
    """bench/gpu.py (tiny, CPU): a LoRA step (adapters alone trained, the reference their EMA),
    then both decoders on the same policy at two row counts, each rate against a bandwidth bound."""
    import gpu
    out = gpu.main(["--tiny", "--layers", "1", "--num-generations", "2", "--completion", "4", "--lora-rank", "4",
                    "--warmup-completion", "2", "--repeat", "1", "--decode", "--decode-prompts", "1", "2",
                    "--decode-repeats", "1", "--bandwidth-gbs", "100", "--device", "cpu",
                    "--json", str(tmp_path / "gpu.json")])
    r = out["results"][0]
    assert out["lora_rank"] == 4 and r["params"] > 0
    assert [d["rows"] for d in r["decode"]] == [2, 4]
    for d in r["decode"]:
        assert d["same_tokens"] and d["tokens_per_second"]["compiled"] > 0 and 0 < d["fraction_of_bound"]["static"]
