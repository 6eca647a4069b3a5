"""Shared fixtures: a tiny tokenizer, tiny random Qwen2.5-VL (and Qwen2-VL) checkpoints and a
tiny SEED-Bench-R1-layout dataset, all built locally once per test session.

Most tests run on Qwen2.5-VL. Those that must hold for every model family take the `family`
fixture, which runs them once per family, with family_tiny_dir, family_warm_dir and
family_care_run: that family's counterparts of tiny_model_dir, warm_model_dir and care_run."""

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


# The files the built models and data below depend on. Under GRPO_CARE_TEST_CACHE=DIR (set by
# tests/mutations.py, which runs the tests many times) each is built once per content of these
# files and reused from DIR; otherwise (CI, a plain pytest run) each session builds its own.
FIXTURE_SOURCES = ("tiny.py", "data.py", "encoding.py", "models.py", "rewards.py")


def built(tmp_path_factory, name, build):
    """build(directory) -> directory, once per session, or once per FIXTURE_SOURCES content under
    GRPO_CARE_TEST_CACHE. Tests only read these directories."""
    cache = os.environ.get("GRPO_CARE_TEST_CACHE")
    if not cache:
        return build(str(tmp_path_factory.mktemp(name)))
    import hashlib
    digest = hashlib.sha256(name.encode())
    for source in FIXTURE_SOURCES:
        with open(os.path.join(ROOT, source), "rb") as f:
            digest.update(f.read())
    path = os.path.join(cache, f"{name}-{digest.hexdigest()[:16]}")
    if not os.path.isdir(path):
        tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(tmp)
        build(tmp)
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return built(tmp_path_factory, "tiny-model", tiny.build_model)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    return built(tmp_path_factory, "tiny-qwen2-vl", lambda d: tiny.build_model(d, family="qwen2_vl"))


@pytest.fixture(scope="session")
def sensitive_model_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL whose completions and log-probs depend clearly on the video, the image,
    the question and the options (tiny.build_prompt_sensitive_model): for the tests where prompts,
    videos or groups could be mixed up, which the other tiny models cannot see."""
    return built(tmp_path_factory, "sensitive-model", tiny.build_prompt_sensitive_model)


@pytest.fixture(scope="session")
def seed_bench_root(tmp_path_factory):
    return built(tmp_path_factory, "seed-bench", lambda d: tiny.build_seed_bench(d, n_train=8, n_val=4))


# Tiny visual budget shared by the end-to-end tests: 56x56 frames, 4 frames.
SMALL_BUDGET = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56,
                    video_min_pixels=28 * 28, image_min_pixels=28 * 28)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory, seed_bench_root):
    """The tiny checkpoint after a short format warm-up (tiny.warm_up): it answers in the
    <think>/<answer> format about half the time, at chance accuracy, so rewards, advantages
    and the CARE bonus are non-trivial."""
    return built(tmp_path_factory, "warm-model", lambda d: tiny.warm_up(
        tiny.build_model(d), f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root, **SMALL_BUDGET))


@pytest.fixture(scope="session")
def warm_qwen2_vl_dir(tmp_path_factory, seed_bench_root):
    """warm_model_dir's Qwen2-VL counterpart."""
    return built(tmp_path_factory, "warm-qwen2-vl", lambda d: tiny.warm_up(
        tiny.build_model(d, family="qwen2_vl"), f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root,
        **SMALL_BUDGET))


# --- train.py runs -------------------------------------------------------------------------


def train_argv(model_dir, root, out, *extra):
    """train.py flags for the tiny runs: G=4, 2 prompts per process, 20-token completions, a
    large lr so 2 steps move the weights, EMA every step. Seed 0: the second step has groups with
    different rewards (a learning signal), the first none; seed 2 (test_train's resume run) has
    both."""
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


def two_care_steps(model_dir, root, out):
    import config
    import train
    train.train(config.parse_config(train_argv(model_dir, root, out, "--algo", "care",
                                              "--max-steps", "2", "--save-every", "1", "--log-completions")))
    return out


@pytest.fixture(scope="session")
def care_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    """Two CARE steps in one process, 2 prompts a step, a checkpoint after each, completions logged."""
    return two_care_steps(warm_model_dir, seed_bench_root, tmp_path_factory.mktemp("care"))


@pytest.fixture(scope="session")
def care_run_qwen2_vl(warm_qwen2_vl_dir, seed_bench_root, tmp_path_factory):
    """care_run from warm_qwen2_vl_dir."""
    return two_care_steps(warm_qwen2_vl_dir, seed_bench_root, tmp_path_factory.mktemp("care-qwen2-vl"))


# --- every model family ------------------------------------------------------------------------

# models.FAMILIES' keys, and each one's fixtures (a third family adds a row and its fixtures).
FAMILY_FIXTURES = {
    "qwen2_5_vl": ("tiny_model_dir", "warm_model_dir", "care_run"),
    "qwen2_vl": ("tiny_qwen2_vl_dir", "warm_qwen2_vl_dir", "care_run_qwen2_vl"),
}


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family(request):
    """Runs the test once per model family (a models.FAMILIES key)."""
    return request.param


@pytest.fixture
def family_tiny_dir(family, request):
    return request.getfixturevalue(FAMILY_FIXTURES[family][0])


@pytest.fixture
def family_warm_dir(family, request):
    return request.getfixturevalue(FAMILY_FIXTURES[family][1])


@pytest.fixture
def family_care_run(family, request):
    return request.getfixturevalue(FAMILY_FIXTURES[family][2])
