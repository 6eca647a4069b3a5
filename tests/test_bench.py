"""bench/memory.py (the per-GPU memory model, its allocation tracker, its agreement with a
measured step, and the activation checkpointing it assumes) and bench/step.py's vision counts."""

import os
import sys
import tempfile

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory


def test_7b_on_4_gpus_fits_with_10_percent_headroom(tmp_path):
    est = memory.main(["--json", str(tmp_path / "memory.json")])
    assert est["fits"] and est["headroom"] >= 0.10, est["phases_gib"]
    assert 8.2e9 < est["params"] < 8.4e9  # Qwen2.5-VL-7B: 8.29B with the vision tower
    # Hand-computed sharded state: 4 bytes x 8.29B / 4 GPUs = 7.72 GiB, AdamW twice that.
    parts = est["parts_gib"]
    assert parts["parameters (fp32 shards)"] == pytest.approx(4 * est["params"] / 4 / 2**30)
    assert parts["optimizer (AdamW, fp32 shards)"] == pytest.approx(2 * parts["parameters (fp32 shards)"])
    assert parts["rollout: bf16 weights (gathered; one process: autocast's copies)"] == pytest.approx(2 * est["params"] / 2**30)
    # KV cache: 2 (K, V) x 28 layers x 8 sequences x 2768 tokens x 512 (4 KV heads x 128) x 2 bytes.
    assert parts["rollout: KV cache"] == pytest.approx(2 * 28 * 8 * 2768 * 512 * 2 / 2**30)
    # The AdamW step's scratch: one more fp32 copy of the (all trainable) shards.
    assert parts["optimizer: AdamW's foreach scratch"] == pytest.approx(parts["parameters (fp32 shards)"])
    # On one GPU it does not fit: the reason for FSDP.
    one = memory.main(["--gpus", "1", "--json", str(tmp_path / "one.json")])
    assert not one["fits"]
    # One process: autocast's bf16 copies of every weight but the 152064 x 3584 embeddings.
    assert one["parts_gib"]["rollout: bf16 weights (gathered; one process: autocast's copies)"] == \
        pytest.approx(2 * (est["params"] - 152064 * 3584) / 2**30)


def test_defaults_write_nothing_and_the_committed_estimate_is_current(tmp_path, monkeypatch):
    """Run with its defaults, memory.py prints and writes no file (it used to overwrite the
    committed bench/memory.json); that file is what the defaults give now, every field."""
    import json
    committed = os.path.join(ROOT, "bench", "memory.json")
    before, written = open(committed).read(), os.stat(committed).st_mtime_ns
    monkeypatch.chdir(tmp_path)
    est = memory.main([])
    assert os.stat(committed).st_mtime_ns == written and not os.listdir(tmp_path)
    assert json.loads(before) == json.loads(json.dumps(est))


def test_more_frames_and_longer_completions_cost_memory(tmp_path):
    base = memory.main(["--json", str(tmp_path / "a.json")])["peak_gib"]
    assert memory.main(["--frames", "32", "--json", str(tmp_path / "b.json")])["peak_gib"] > base
    assert memory.main(["--completion", "1536", "--json", str(tmp_path / "c.json")])["peak_gib"] > base
    assert memory.main(["--gpus", "8", "--json", str(tmp_path / "d.json")])["peak_gib"] < base


def test_live_bytes_tracks_allocations_and_frees():
    tracker = memory.LiveBytes()
    with tracker:
        a = torch.ones(1000)             # 4,000 bytes
        b = torch.ones(250, dtype=torch.float64)  # 2,000 bytes
        view = a[:10]                    # a view: no new storage
        a.add_(1)                        # in place: no new storage
        assert tracker.now == 6000
        del a, view
        assert tracker.now == 2000
        c = b * 2                        # 2,000 more
        assert tracker.now == 4000 and tracker.peak == 6000
    del b, c
    assert tracker.now == 0


def test_estimate_agrees_with_a_measured_step():
    """One of bench/memory.py --measure's cases, one process: each phase within 20%."""
    name, dims, overrides = memory.MEASURED_CASES[0]
    with tempfile.TemporaryDirectory() as tmp:
        memory.build_cases(tmp)
        result = memory.measure(name, dims, overrides, tmp)
    for phase, row in result["phases"].items():
        assert 0.8 <= row["ratio"] <= 1.2, (phase, row)


def test_policy_checkpoints_its_layers(tiny_model_dir):
    """from_pretrained returns eval mode, where transformers skips checkpointing: load_policy must
    return a model in train mode, which keeps far fewer activations after its forward."""
    import models
    import config

    def held_after_forward(*flags):
        model = models.load_policy(config.parse_config(["--model", tiny_model_dir, *flags]))
        ids = torch.randint(10, 400, (4, 200), generator=torch.Generator().manual_seed(0))
        tracker = memory.LiveBytes()
        with tracker:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            held = tracker.now
        del out
        return model.training, held

    training, checkpointed = held_after_forward()
    _, plain = held_after_forward("--no-gradient-checkpointing")
    assert training and checkpointed < 0.5 * plain, (checkpointed, plain)


def test_step_bench_counts_one_vision_pass_per_phase(tmp_path):
    """bench/step.py at G=2: each phase encodes the prompt's 16 frames and image (2 frames) once,
    3 x 18 frames per step, against 3 x G x 18 for the repeat-per-sample baseline."""
    import step
    out = step.main(["--baseline", "repeat", "--num-generations", "2", "--completion", "2", "--steps", "1",
                     "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "step.json")])
    shared, repeat = out["results"]
    assert shared["video_frames"] == 16
    assert shared["vision_frames_per_prompt_per_step"] == 3 * 18
    assert repeat["vision_frames_per_prompt_per_step"] == 3 * 2 * 18
    assert out["vision_frames_ratio"] == 2


def test_gpu_bench_runs_a_tiny_step_on_cpu(tmp_path):
    """bench/gpu.py end to end at a tiny shape on CPU (on a GPU it runs Qwen2.5-VL-7B's shapes):
    every phase timed at two layer counts, completions forced to full length, the per-layer
    figures and bench/memory.py's estimate for the same shapes written to the JSON."""
    import json

    import gpu
    out = gpu.main(["--tiny", "--num-generations", "2", "--completion", "4", "--warmup-completion", "2",
                    "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    assert [r["layers"] for r in out["results"]] == [1, 2]
    for r in out["results"]:
        assert set(r["phases"]) == set(gpu.PHASES)
        assert r["completion_tokens"] == 4 and r["completions_full_length"]
        assert r["vision_patches"] > 4096  # 16 frames at 128 x 28 x 28 and the image at 256 x 28 x 28
        assert r["phases"]["rollout"]["decode_tokens_per_second"] > 0
        assert set(r["estimate"]["phases_gib"]) == {"rollout", "reference", "policy", "optimizer"}
    assert out["results"][1]["params"] > out["results"][0]["params"]
    assert "seconds_at_28_layers" in out["per_layer"]["step"]
    assert json.load(open(tmp_path / "gpu.json"))["results"][1]["layers"] == 2


def test_the_cluster_plan_names_what_fits_and_the_change_that_makes_it_fit(tmp_path):
    """--plan: every cluster x method; the 7B CARE setting with LoRA fits one 80 GB GPU with
    at least 10% headroom, full fine-tuning does not and is told the smallest change."""
    out = memory.main(["--plan", "--json", str(tmp_path / "plan.json")])
    rows = {(r["cluster"], r["method"]): r for r in out["plan"]}
    assert set(rows) == {(c, m) for c in memory.CLUSTERS for m in memory.METHODS}
    lora = rows[("1x80GB", "LoRA r=64")]
    assert lora["fits"] and lora["headroom"] >= 0.10
    full = rows[("1x80GB", "full fine-tuning")]
    assert not full["fits"] and full["change"]["flags"] == "--lora-rank 64"
    assert rows[("4x80GB", "full fine-tuning")]["fits"]
    for r in out["plan"]:  # a change only for a setting that does not fit, and the change fits
        if r["fits"]:
            assert r["change"] is None
        elif r["change"] is not None:
            assert r["change"]["headroom"] >= 0 and r["change"]["peak_gib"] < r["peak_gib"]


def test_lora_adapter_count_by_hand():
    """Rank 64 on q, k, v, o, gate, up, down of Qwen2.5-VL-7B's 28 layers: r x (in + out) each."""
    from transformers import Qwen2_5_VLConfig
    shapes = memory.shapes_of(Qwen2_5_VLConfig(**memory.QWEN25_VL_7B))
    h, kv, i = 3584, 512, 18944
    per_layer = 64 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h))
    assert memory.lora_params(shapes, 64) == 28 * per_layer == 161_480_704
