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
