"""Two processes (torchrun, gloo on CPU, FSDP2 through accelerate as on GPUs) against one.

With the same global batch (2 processes x 1 prompt = 1 process x 2 prompts) and the same seed,
a 2-process run samples the same completions (one seed per prompt's group), so it must give
the same rewards, gradient norms and, after two AdamW steps, the same weights. The tolerance
is float reordering only: gradients agree to ~1e-7 relative; after two steps at lr 1e-3 the
weights differ by at most 1e-4 (AdamW divides tiny gradients by their own tiny scale, so a
1e-7 change can move such a weight by a visible fraction of lr), and the whole update differs
by under 1% of its norm.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, multiprocess_env, read_log, read_state, train_argv
from safetensors.torch import load_file

import config
import models
import train

STEP_KEYS = ("reward", "reward_acc", "reward_fmt", "reward_bonus", "bonus_rate", "grad_norm", "lr")


def torchrun(*args, timeout=600):
    env = multiprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def argv_per_process(model_dir, root, out, *extra):
    """train_argv with 1 prompt per process: 2 processes make the global batch of care_run."""
    argv = train_argv(model_dir, root, out, *extra)
    argv[argv.index("--prompts-per-device") + 1] = "1"
    return argv


def two_process_care_steps(model_dir, root, out):
    """conftest.care_run's two steps, on two processes."""
    torchrun("train.py", *argv_per_process(model_dir, root, out, "--algo", "care", "--max-steps", "2",
                                           "--save-every", "1", "--log-completions"))
    return out


@pytest.fixture(scope="module")
def two_process_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    return two_process_care_steps(warm_model_dir, seed_bench_root, tmp_path_factory.mktemp("care-2proc"))


@pytest.fixture(scope="module")
def two_process_run_qwen2_vl(warm_qwen2_vl_dir, seed_bench_root, tmp_path_factory):
    return two_process_care_steps(warm_qwen2_vl_dir, seed_bench_root, tmp_path_factory.mktemp("care-2proc-qwen2-vl"))


@pytest.fixture
def family_two_process_run(family, request):
    return request.getfixturevalue({"qwen2_5_vl": "two_process_run", "qwen2_vl": "two_process_run_qwen2_vl"}[family])


def policy_weights(ckpt):
    return load_file(os.path.join(ckpt, "policy", "model.safetensors"))


# One process scores its 2 prompts' packed rows padded to one length, two processes one row
# each: sums round differently, which AdamW can turn into up to half a step (lr 1e-3) on an
# element whose gradient is at rounding level (see assert_same_weights).
POLICY_ATOL = 5e-4


def assert_same_weights(a, b, start, atol, min_move=1e-4):
    """The same weights up to float rounding. Elementwise, AdamW can turn rounding into a
    sizeable part of one step: its step is lr * m / (sqrt(v) + eps), and where a gradient is at
    rounding level (|g| of order eps = 1e-8) the step follows the rounding. The update as a
    whole must agree to 1%."""
    assert set(a) == set(b)
    moved = torch.cat([(a[k].float() - start[k].float()).flatten() for k in a])
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a])
    assert moved.abs().max() > min_move, "the weights did not move; the comparison would be empty"
    assert diff.abs().max() <= atol, f"max difference {diff.abs().max():.2e}"
    assert diff.norm() <= 0.01 * moved.norm(), f"update differs by {diff.norm() / moved.norm():.2%}"


def test_two_processes_match_one(family, family_care_run, family_two_process_run, family_warm_dir):
    """In every model family: sharded by its own decoder layers, exported as its own class."""
    care_run, two_process_run, warm_model_dir = family_care_run, family_two_process_run, family_warm_dir
    one, two = read_log(care_run), read_log(two_process_run)
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for key in STEP_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        # The same prompts, dealt one per process: a group never spans processes.
        (both,), (first, second) = a["samples"], b["samples"]
        assert len(first) == len(second) == 1 and not set(first) & set(second)
        assert sorted(first + second) == sorted(both)
    assert any(r["adv_std"] > 0 for r in two), "no learning signal in the 2-process run"
    # Each prompt's completions are what one process sampled for it: every row draws from its
    # own stream, whatever process or batch it is decoded in.
    completions = [sorted((r["step"], r["sample_id"], r["completion"]) for r in map(json.loads,
                                                                                   open(run / "completions.jsonl")))
                   for run in (care_run, two_process_run)]
    assert len(completions[0]) == 2 * 2 * 4 and completions[0] == completions[1]   # steps x prompts x G
    start = load_file(os.path.join(warm_model_dir, "model.safetensors"))
    ckpt = "checkpoint-000002"
    assert_same_weights(policy_weights(care_run / ckpt), policy_weights(two_process_run / ckpt), start, POLICY_ATOL)
    # AdamW's moments are smooth in the gradients: they agree closely over the whole model.
    moments = [read_state(run / ckpt, "optimizer")["state"] for run in (care_run, two_process_run)]
    for m in ("exp_avg", "exp_avg_sq"):
        one, two = (torch.cat([state[k][m].flatten() for k in sorted(state)]) for state in moments)
        assert (one - two).norm() <= 1e-3 * one.norm(), f"{m} differs by {(one - two).norm() / one.norm():.2e}"
    ref_one, ref_two = read_state(care_run / ckpt, "reference"), read_state(two_process_run / ckpt, "reference")
    start_by_module = models.load_model(warm_model_dir).state_dict()
    # The EMA moved the reference 0.5% of the way to the policy each step: ~1e-5; elementwise,
    # 0.5% of the policy's tolerance per step.
    assert_same_weights(ref_one, ref_two, start_by_module, 2 * 0.005 * POLICY_ATOL, min_move=1e-6)
    assert type(models.load_model(two_process_run / ckpt / "policy")) is models.FAMILIES[family].model_class


def test_a_text_only_reference_on_two_processes(two_process_run, warm_model_dir, seed_bench_root, tmp_path):
    """--reference-input text under FSDP2: the sharded reference scores without the vision tower
    on every process alike. Step 1 samples what the full-input run samples (same seeds, same
    policy), so its confidences differ only by what the reference read: a little, as the warm
    model reads its prompt little (1e-4 relative); what is read is checked in test_reference."""
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care",
                                           "--max-steps", "2", "--reference-input", "text"))
    text, full = read_log(tmp_path), read_log(two_process_run)
    assert [r["step"] for r in text] == [1, 2]
    assert text[0]["reward_acc"] == full[0]["reward_acc"] and text[0]["completion_len"] == full[0]["completion_len"]
    assert 0 < text[0]["ref_conf"] < 1 and abs(text[0]["ref_conf"] - full[0]["ref_conf"]) > 1e-6


def test_checkpoint_holds_one_shard_per_process(two_process_run):
    state = os.listdir(two_process_run / "checkpoint-000002" / "state")
    assert sorted(n for n in state if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_two_process_resume_continues_the_same_run(two_process_run, warm_model_dir, seed_bench_root, tmp_path):
    shutil.copytree(two_process_run / "checkpoint-000001", tmp_path / "checkpoint-000001")
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care",
                                           "--max-steps", "2", "--save-every", "1", "--resume", "auto"))
    resumed, full = read_log(tmp_path), read_log(two_process_run)
    assert [r["step"] for r in resumed] == [2]
    for key in (*STEP_KEYS, "loss", "ref_conf"):
        assert resumed[0][key] == pytest.approx(full[1][key], rel=1e-6, abs=1e-9), key
    a, b = policy_weights(two_process_run / "checkpoint-000002"), policy_weights(tmp_path / "checkpoint-000002")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    ra = read_state(two_process_run / "checkpoint-000002", "reference")
    rb = read_state(tmp_path / "checkpoint-000002", "reference")
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=1e-7)


def test_a_2_process_checkpoint_resumes_on_1_process(two_process_run, care_run, warm_model_dir,
                                                     seed_bench_root, tmp_path):
    """The sharded state is resharded on load: step 2 on one process continues the same run."""
    shutil.copytree(two_process_run / "checkpoint-000001", tmp_path / "checkpoint-000001")
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care",
                                              "--max-steps", "2", "--save-every", "1", "--resume", "auto")))
    resumed, one = read_log(tmp_path), read_log(care_run)
    assert [r["step"] for r in resumed] == [2]
    for key in STEP_KEYS:
        assert resumed[0][key] == pytest.approx(one[1][key], rel=1e-5, abs=1e-7), key
    start = load_file(os.path.join(warm_model_dir, "model.safetensors"))
    assert_same_weights(policy_weights(care_run / "checkpoint-000002"),
                        policy_weights(tmp_path / "checkpoint-000002"), start, POLICY_ATOL)


def test_ranks_deal_disjoint_shards_that_cover_the_data():
    for n, world, per in ((10, 2, 1), (10, 2, 2), (11, 3, 1), (9, 1, 4)):
        epochs = []
        for epoch in (0, 1):
            per_rank = [train.shard_order(n, epoch, 42, r, world, per) for r in range(world)]
            steps = len(per_rank[0])
            assert steps == n // (world * per) and all(len(s) == steps for s in per_rank)
            assert all(len(step) == per for rank in per_rank for step in rank)
            seen = [i for rank in per_rank for step in rank for i in step]
            assert len(seen) == len(set(seen)) == steps * world * per  # disjoint, nothing repeated
            assert set(seen) <= set(range(n))
            if steps * world * per == n:  # the data divides evenly: every sample is used
                assert sorted(seen) == list(range(n))
            epochs.append(per_rank)
        assert epochs[0] != epochs[1], "each epoch deals a new order"


@pytest.fixture(scope="module")
def fsdp_checks(warm_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-checks") / "results.json"
    torchrun("tests/fsdp_checks.py", warm_model_dir, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", ["same_slices", "generation", "logprobs", "mixed_visuals", "ema", "nan_stops_all", "export"])
def test_sharded_pieces(fsdp_checks, check):
    """tests/fsdp_checks.py: the same slices of policy and reference on each process; one
    all-gather per FSDP unit per rollout; sharded log-probs equal unsharded ones; the EMA on local
    shards equals the unsharded EMA with no communication; prompts with different visuals on the
    two processes (image only; video and image) score and backpropagate in step; a NaN on one
    process stops both; the HF export equals the weights."""
    assert check in fsdp_checks, f"{check} did not run"


def test_a_skip_on_the_second_process_is_printed_and_counted(warm_model_dir, seed_bench_root, tmp_path):
    """Two processes x 2 prompts; a corrupt video among process 1's step-1 prompts is skipped,
    printed by name and counted in the log, whichever process it was on."""
    import data
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    samples, _ = data.load_samples(f"{root}/annotations/training_6k.jsonl", str(root), seed=0)
    step1_rank1 = [samples[i] for i in train.shard_order(len(samples), 0, 0, 1, 2, 2)[0]]
    bad = next(s for s in step1_rank1 if s.video)
    with open(bad.video, "wb") as f:
        f.write(b"not a video")
    out = tmp_path / "out"
    argv = train_argv(warm_model_dir, str(root), out, "--max-steps", "1", "--skip-bad-samples",
                      "--max-completion-length", "4")
    done = torchrun("train.py", *argv)
    assert read_log(out)[0]["skipped"] == 1
    assert f"skipped: sample {bad.sample_id}" in done.stdout + done.stderr


def test_param_groups_reads_both_fsdp2_layouts():
    """fsdp.gathered saves and restores each FSDP2 unit's reshard setting through its param
    groups: a list in torch >= 2.13, a single group (or None) in earlier torch. Both are read."""
    from types import SimpleNamespace

    import fsdp
    a, b = object(), object()

    def unit(**state):
        return SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(**state))

    assert fsdp.param_groups(unit(_fsdp_param_groups=[a, b])) == [a, b]  # torch >= 2.13
    assert fsdp.param_groups(unit(_fsdp_param_group=a)) == [a]           # torch 2.11
    assert fsdp.param_groups(unit(_fsdp_param_group=None)) == []         # a unit without parameters
