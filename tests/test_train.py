"""train.py and evaluate.py end to end on the tiny model, with video and image prompts."""

import json
import os
import shutil

import pytest
import torch
from conftest import corrupt_one_video, read_log, read_state, train_argv
from safetensors.torch import load_file

import config
import evaluate
import metrics
import models
import train


def run(model_dir, root, out, *extra):
    return train.train(config.parse_config(train_argv(model_dir, root, out, *extra)))


def test_care_steps_log_everything_and_save(family, family_care_run, family_warm_dir):
    """For each model family: the run, its checkpoint, and the export loading back as the
    family's own class, with a reference of the same family."""
    care_run, warm_model_dir = family_care_run, family_warm_dir
    log = read_log(care_run)
    assert [r["step"] for r in log] == [1, 2]
    # Cosine over the 2 optimizer steps, no warmup: lr after step 1 = 1e-3 * (1 + cos(pi/2)) / 2.
    assert log[0]["lr"] == pytest.approx(5e-4) and log[1]["lr"] == pytest.approx(0.0, abs=1e-12)
    for key in ("loss", "reward", "reward_acc", "reward_fmt", "reward_bonus", "bonus_rate", "ref_conf",
                "adv_std", "completion_len", "truncation_rate", "step_time", "lr", "grad_norm"):
        assert key in log[0], key
    # The warm model answers in format part of the time: rewards and advantages are not all 0.
    assert any(r["reward"] > 0 for r in log) and any(r["adv_std"] > 0 for r in log)
    ckpt = os.path.join(care_run, "checkpoint-000002")
    assert sorted(os.listdir(ckpt)) == ["config.json", "policy", "state", "trainer_state.pt"]
    assert not any(n.endswith(".tmp") for n in os.listdir(care_run))
    # The export is the family's model, and the reference's parameters are that family's too
    # (the two families name their vision towers' parameters differently).
    exported = models.load_model(os.path.join(ckpt, "policy"))
    assert type(exported) is models.FAMILIES[family].model_class
    # The policy moved, and the reference moved towards it (EMA every step) but not all the way.
    start = models.load_model(warm_model_dir).state_dict()
    policy = exported.state_dict()
    ref = read_state(ckpt, "reference")
    assert set(ref) == set(start)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert ref[name].dtype == torch.float32
    moved = (policy[name] - start[name]).abs().sum()
    ref_moved = (ref[name] - start[name]).abs().sum()
    assert moved > 0 and 0 < ref_moved < moved


def test_the_progress_bar_shows_what_tells_a_run_is_healthy(care_run):
    """reward, accuracy, format, bonus rate, reference confidence, KL and length: every one a
    logged number; not the policy loss, which is zero by construction at one update per rollout."""
    row = read_log(care_run)[0]
    labels = [label for label, _, _ in metrics.BAR]
    assert labels == ["reward", "acc", "fmt", "bonus", "ref_conf", "kl", "len"]
    assert all(key in row for _, key, _ in metrics.BAR)
    assert "loss" not in labels and row["loss"] == pytest.approx(0.0, abs=1e-6)


def test_completions_are_logged_with_their_rewards(care_run):
    """--log-completions: one row per sampled completion (2 steps x 2 prompts x G=4), whose
    rewards average to the step's logged means."""
    log = read_log(care_run)
    rows = [json.loads(line) for line in open(os.path.join(care_run, "completions.jsonl"))]
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        assert {r["sample_id"] for r in mine} == set(log[step - 1]["samples"][0])
        assert sum(r["accuracy"] for r in mine) / 8 == pytest.approx(log[step - 1]["reward_acc"])
        assert sum(r["bonus"] > 0 for r in mine) / 8 == pytest.approx(log[step - 1]["bonus_rate"])
        with_p = [r["ref_conf"] for r in mine if r["ref_conf"] is not None]
        if with_p:
            assert sum(with_p) / len(with_p) == pytest.approx(log[step - 1]["ref_conf"])
    assert all(isinstance(r["completion"], str) and 0 <= r["format"] <= 1 for r in rows)


def test_grpo_step(family_warm_dir, seed_bench_root, tmp_path):
    run(family_warm_dir, seed_bench_root, tmp_path, "--algo", "grpo", "--max-steps", "1", "--save-every", "1")
    log = read_log(tmp_path)
    assert log[0]["reward_bonus"] == 0 and log[0]["bonus_rate"] == 0
    assert "kl" in log[0]
    cfg = json.load(open(tmp_path / "checkpoint-000001" / "config.json"))
    assert cfg["beta"] == 0.04 and cfg["ema_decay"] == 1.0


# Seed 2 gives both steps a reward spread (seed 0's first step has none, so its policy and
# reference would not move), and decay 0.5 moves the reference by half the policy's step: the
# checkpoint resumed from holds a reference that differs from the start.
RESUME_FLAGS = ("--algo", "care", "--max-steps", "2", "--save-every", "1", "--log-completions", "--seed", "2",
                "--ema-decay", "0.5")


@pytest.fixture(scope="module")
def resume_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-run")
    run(warm_model_dir, seed_bench_root, out, *RESUME_FLAGS)
    return str(out)


def test_resume_continues_the_same_run(resume_run, warm_model_dir, seed_bench_root, tmp_path):
    """Crash after step 2 was logged but before its checkpoint, in the middle of writing a log
    line; resume from step 1's checkpoint: step 2 runs again, matches the uninterrupted run, and
    is logged once. The reference restored with it has moved from the start (so a resume that
    reset it would show), and scores step 2's answers as the uninterrupted run's did."""
    care_run = resume_run
    start = models.load_model(warm_model_dir).state_dict()
    moved = read_state(os.path.join(care_run, "checkpoint-000001"), "reference")
    assert max((moved[k] - start[k]).abs().max().item() for k in moved) > 1e-4
    shutil.copytree(os.path.join(care_run, "checkpoint-000001"), tmp_path / "checkpoint-000001")
    for name in ("log.jsonl", "completions.jsonl"):
        shutil.copy(os.path.join(care_run, name), tmp_path / name)
    with open(tmp_path / "log.jsonl", "a") as f:  # and the kill cut the next line short
        f.write('{"step": 3, "loss": 0.')
    run(warm_model_dir, seed_bench_root, tmp_path, *RESUME_FLAGS, "--resume", "auto")
    resumed, full = read_log(tmp_path), read_log(care_run)
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed[1]["loss"] != 0.0 or resumed[1]["adv_std"] > 0  # a step that did something
    for key in ("loss", "reward", "reward_bonus", "grad_norm", "completion_len", "lr"):   # lr: the schedule's place
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key
    a, b = ([json.loads(line) for line in open(os.path.join(d, "completions.jsonl"))] for d in (care_run, tmp_path))
    assert len(a) == len(b) == 16  # each step once
    for x, y in zip(a, b):  # the same sampled texts, scored the same, by the same reference
        assert {k: x[k] for k in ("step", "sample_id", "completion", "accuracy", "format")} == \
               {k: y[k] for k in ("step", "sample_id", "completion", "accuracy", "format")}
        assert y["advantage"] == pytest.approx(x["advantage"], rel=1e-5, abs=1e-6)
        assert (x["ref_conf"] is None) == (y["ref_conf"] is None)
        assert y["ref_conf"] == pytest.approx(x["ref_conf"], rel=1e-6, abs=1e-7)
    assert sum(x["ref_conf"] is not None for x in a) >= 4
    a = load_file(os.path.join(care_run, "checkpoint-000002", "policy", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "checkpoint-000002", "policy", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ra = read_state(os.path.join(care_run, "checkpoint-000002"), "reference")
    rb = read_state(os.path.join(tmp_path, "checkpoint-000002"), "reference")
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-5, atol=1e-6)


def test_bad_video_stops_with_its_name_or_is_skipped(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """A sample that cannot be read stops the run naming it, or with --skip-bad-samples is
    skipped and counted; the samples after it keep their own sampling seeds (fixed by their
    index in the data, not by their position among the samples kept)."""
    import data
    import rollout
    root, bad = corrupt_one_video(seed_bench_root, tmp_path)
    steps = str(len(open(f"{root}/annotations/training_6k.jsonl").readlines()) // 2)  # one epoch: each sample once
    with pytest.raises(Exception, match=bad):
        run(warm_model_dir, root, tmp_path / "strict", "--max-steps", steps, "--save-every", "100",
            "--max-completion-length", "4")
    seen = []
    real = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: seen.append((a[1]["sample_ids"], a[5])) or real(*a, **k))
    state = run(warm_model_dir, root, tmp_path / "skip", "--max-steps", steps, "--save-every", "100",
                "--max-completion-length", "4", "--skip-bad-samples")
    assert state["skipped"] == 1 and bad in state["skipped_messages"][0]
    index = {s.sample_id: i for i, s in enumerate(data.load_samples(f"{root}/annotations/training_6k.jsonl", root)[0])}
    after_a_skip = [(step, ids, seeds) for step, (ids, seeds) in enumerate(seen) if len(ids) == 1]
    assert after_a_skip   # the step that lost the bad sample
    for step, (ids, seeds) in enumerate(seen):
        assert seeds == [train.rollout_seed(0, step, index[i]) for i in ids]


def test_evaluate_checkpoint(family, family_care_run, seed_bench_root, tmp_path, monkeypatch):
    """For each model family: evaluate.py loads train.py's export as the family's own class."""
    care_run, loaded = family_care_run, []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    files = [f"{seed_bench_root}/annotations/validation_{lv}.jsonl" for lv in ("L1", "L2", "L3")]
    summary = evaluate.main(["--model", os.path.join(care_run, "checkpoint-000002", "policy"),
                             "--data", *files, "--data-root", seed_bench_root, "--output-dir", str(tmp_path),
                             "--max-new-tokens", "20", "--max-frames", "4", "--video-max-pixels", "3136",
                             "--image-max-pixels", "3136", "--judge", "none"])
    assert [type(m) for m in loaded] == [models.FAMILIES[family].model_class]
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(rows) == 12 and {r["level"] for r in rows} == {"L1", "L2", "L3"}
    for r in rows:
        assert set(r) >= {"sample_id", "level", "domain", "completion", "answer", "score", "format_ok"}
    assert summary["all"]["n"] == 12 and summary["L3"]["n"] == 4
    assert sum(v["n"] for k, v in summary.items() if k.startswith("L3/")) == 4
    expected = 100.0 * sum(r["score"] for r in rows) / 12
    assert summary["all"]["accuracy"] == pytest.approx(expected)
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["results"]["L1"]["n"] == 4
    assert "consistency" not in saved["results"]["all"] and all(r["consistent"] is None for r in rows)


# --- failures that say what happened ---------------------------------------------------------

def first_step_ids(root):
    """Sample ids of step 1 (seed 0, 2 prompts, 1 process), from the same deal train.py uses."""
    import data
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", root, seed=0)
    return [samples[i].sample_id for i in train.shard_order(len(samples), 0, 0, 0, 1, 2)[0]]


def nan_in(value):
    return value * float("nan")


@pytest.mark.parametrize("what, target", [
    ("reward", "rewards.score"),      # a NaN accuracy for the first sample
    ("loss", "care.policy_loss"),     # a NaN loss
])
def test_nan_stops_before_the_optimizer_step_naming_the_samples(warm_model_dir, seed_bench_root, tmp_path,
                                                                monkeypatch, what, target):
    module, name = target.split(".")
    real = getattr(getattr(train, module), name)
    if what == "reward":
        poisoned = lambda *a: (lambda acc, fmt: ([nan_in(acc[0])] + acc[1:], fmt))(*real(*a))
    else:
        poisoned = lambda *a, **k: (lambda loss, stats: (nan_in(loss), stats))(*real(*a, **k))
    monkeypatch.setattr(getattr(train, module), name, poisoned)
    optimizer_steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: optimizer_steps.append(1))
    with pytest.raises(FloatingPointError, match=f"step 1: non-finite {what}") as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "1")
    assert all(sid in str(err.value) for sid in first_step_ids(seed_bench_root))
    assert not optimizer_steps


@pytest.mark.parametrize("where, phase, advice", [
    ("rollout.generate", "rollout", "--num-generations (4)"),
    ("reference.answer_logprob", "reference scoring", "--logprob-chunk-size (1024)"),
    ("rollout.completion_logprobs", "policy forward and backward", "--logprob-chunk-size (1024)"),
])
def test_out_of_memory_names_the_phase_and_what_to_lower(warm_model_dir, seed_bench_root, tmp_path, monkeypatch,
                                                         where, phase, advice):
    module, name = where.split(".")
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(getattr(train, module), name, oom)
    with pytest.raises(torch.OutOfMemoryError) as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "1")
    message = str(err.value)
    assert message.startswith(f"out of memory during {phase}:"), message
    assert advice in message and "--max-frames (4)" in message and "--max-completion-length (20)" in message


def test_a_prompt_over_max_prompt_length_is_named_or_skipped(warm_model_dir, seed_bench_root, tmp_path):
    first = first_step_ids(seed_bench_root)[0]
    with pytest.raises(Exception, match=f"sample {first}: prompt has \\d+ tokens, more than --max-prompt-length 10"):
        run(warm_model_dir, seed_bench_root, tmp_path / "strict", "--max-steps", "1", "--max-prompt-length", "10")
    with pytest.raises(Exception, match="a process has no readable sample left"):  # every prompt is too long
        run(warm_model_dir, seed_bench_root, tmp_path / "skip", "--max-steps", "1", "--max-prompt-length", "10",
            "--skip-bad-samples")
