"""Shared fixtures: a tiny tokenizer, a tiny random Qwen2.5-VL checkpoint and a tiny
SEED-Bench-R1-layout dataset, all built locally once per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tiny  # noqa: E402


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
