"""Shared fixtures: a tiny tokenizer, a tiny random Qwen2.5-VL checkpoint and a tiny
SEED-Bench-R1-layout dataset, all built locally once per test session."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tiny


def multiprocess_env():
    """The environment for a 2-process torchrun: one thread each, and CUDA hidden unless there
    are 2 GPUs, so that on a 1-GPU machine these tests still check the gloo/FSDP2 path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process, and refuses a second Accelerator with another
    mixed precision. On a GPU, evaluate.py's Accelerator ("no") followed by train.py's ("bf16")
    in one test process would then fail; each test starts from a fresh state instead."""
    yield
    from accelerate.state import AcceleratorState
    # internal: accelerate has no public reset of its process-wide state.
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.build_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def seed_bench_root(tmp_path_factory):
    return tiny.build_seed_bench(str(tmp_path_factory.mktemp("seed-bench")), n_train=8, n_val=4)


# Tiny visual budget shared by the end-to-end tests: 56x56 frames, 4 frames.
SMALL_BUDGET = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56,
                    video_min_pixels=28 * 28, image_min_pixels=28 * 28)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory, seed_bench_root):
    """The tiny checkpoint after a short format warm-up (tiny.warm_up): it answers in the
    <think>/<answer> format about half the time, at chance accuracy, so rewards, advantages
    and the CARE bonus are non-trivial."""
    path = tiny.build_model(str(tmp_path_factory.mktemp("warm-model")))
    return tiny.warm_up(path, f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root, **SMALL_BUDGET)


# --- train.py runs -------------------------------------------------------------------------


def train_argv(model_dir, root, out, *extra):
    """train.py flags for the tiny runs: G=4, 2 prompts per process, 20-token completions, a
    large lr so 2 steps move the weights, EMA every step. Seed 0: both of the first two steps
    have groups with different rewards (a learning signal), which not every seed gives."""
    budget = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_BUDGET.items()]
    return ["--model", model_dir, "--data", f"{root}/annotations/training_6k.jsonl", "--data-root", root,
            "--output-dir", str(out), "--num-generations", "4", "--prompts-per-device", "2",
            "--max-completion-length", "20", "--lr", "1e-3", "--ema-every", "1", "--seed", "0", *budget, *extra]


def corrupt_one_video(seed_bench_root, tmp_path):
    """A copy of the dataset in tmp_path/data whose first training video is not a video.
    Returns (data root, that sample's id)."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    rows = [json.loads(line) for line in open(root / "annotations" / "training_6k.jsonl")]
    bad = next(r for r in rows if r["task_progress_metadata"])
    with open(root / "videos" / bad["video_source"] / bad["video_basename"], "wb") as f:
        f.write(b"not a video")
    return str(root), bad["sample_id"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_state(ckpt, part):
    """One part ("policy", "reference", "optimizer") of a checkpoint's sharded state, whole."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:  # not inside the checkpoint: other tests list it
        dcp_to_torch_save(os.path.join(ckpt, "state"), os.path.join(tmp, "whole.pt"))
        return torch.load(os.path.join(tmp, "whole.pt"), weights_only=False)[part]


@pytest.fixture(scope="session")
def care_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    """Two CARE steps in one process, 2 prompts a step, a checkpoint after each, completions logged."""
    import config
    import train
    out = tmp_path_factory.mktemp("care")
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, out, "--algo", "care",
                                              "--max-steps", "2", "--save-every", "1", "--log-completions")))
    return out
