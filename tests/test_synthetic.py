"""experiments/synthetic/benchmark.py: a seeded, rule-checkable video benchmark in the
SEED-Bench-R1 layout."""

import filecmp
import json
import os
import sys

import av
import numpy as np
import pytest
from conftest import ROOT

import data

sys.path.insert(0, os.path.join(ROOT, "experiments", "synthetic"))
import benchmark  # noqa: E402

FILES = ("training_6k", "validation_L1", "validation_L2", "validation_L3")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return benchmark.build(str(tmp_path_factory.mktemp("synthetic")), n_train=24, n_val=12, seed=3)


def rows_of(root, name):
    return [json.loads(line) for line in open(os.path.join(root, "annotations", f"{name}.jsonl"))]


def test_same_seed_same_benchmark(bench, tmp_path):
    again = benchmark.build(str(tmp_path / "again"), n_train=24, n_val=12, seed=3)
    other = benchmark.build(str(tmp_path / "other"), n_train=24, n_val=12, seed=4)
    for name in FILES:
        ours = os.path.join(bench, "annotations", f"{name}.jsonl")
        assert filecmp.cmp(ours, os.path.join(again, "annotations", f"{name}.jsonl"), shallow=False)
        assert not filecmp.cmp(ours, os.path.join(other, "annotations", f"{name}.jsonl"), shallow=False)


def test_levels_mirror_seed_bench_r1(bench):
    """Loads as SEED-Bench-R1; L1 is the training distribution, L2 new backgrounds with noise,
    L3 a question type (direction of motion) that training never asks."""
    for name, n, level in zip(FILES, (24, 12, 12, 12), ("train", "L1", "L2", "L3")):
        samples, skipped = data.load_samples(os.path.join(bench, "annotations", f"{name}.jsonl"), bench)
        assert len(samples) == n and not skipped and {s.level for s in samples} == {level}
        assert all(s.video and s.image for s in samples)
    kinds = {name: {r["kind"] for r in rows_of(bench, name)} for name in FILES}
    assert kinds["training_6k"] == kinds["validation_L1"] == kinds["validation_L2"] == {"colour", "shape"}
    assert kinds["validation_L3"] == {"direction"}
    backgrounds = {name: {r["background"] for r in rows_of(bench, name)} for name in FILES}
    assert backgrounds["training_6k"] | backgrounds["validation_L1"] <= set(benchmark.PLAIN)
    assert backgrounds["validation_L2"] <= set(benchmark.NEW_ENVIRONMENTS)
    assert {r["domain"] for r in rows_of(bench, "validation_L3")} == {"horizontal", "vertical"}
    for r in rows_of(bench, "validation_L1"):
        options = [r[f"choice_{k}"] for k in "abcd"]
        assert sorted(options) == sorted(benchmark.VALUES[r["kind"]])
        assert options["ABCD".index(r["golden_choice_idx"])] == r["answer"] == r[f"true_{r['kind']}"]


def frames_of(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("name", ["validation_L1", "validation_L2", "validation_L3"])
def test_the_answer_is_in_the_pixels(bench, name):
    """Decoded from the mp4: the shape's colour is the true colour, and its centre moves in the
    true direction from the first frame to the last."""
    for r in rows_of(bench, name):
        frames = frames_of(os.path.join(bench, "videos", r["video_source"], r["video_basename"])).astype(int)
        assert len(frames) == 8
        ends = []
        for frame in (frames[0], frames[-1]):
            distance = {c: np.abs(frame - rgb).sum(-1) for c, rgb in benchmark.COLOURS.items()}
            near = {c: d < 90 for c, d in distance.items()}
            assert near[r["true_colour"]].sum() >= 30, r["sample_id"]
            ys, xs = np.nonzero(near[r["true_colour"]])
            ends.append(np.array([xs.mean(), ys.mean()]))
        moved = ends[1] - ends[0]
        dx, dy = benchmark.DIRECTIONS[r["true_direction"]]
        assert moved @ np.array([dx, dy]) > 20, (r["sample_id"], moved)


QUESTION = "What colour is the moving shape?\nOptions:\nA. blue\nB. red\nC. yellow\nD. green\n"


@pytest.mark.parametrize("reasoning_text, verdict", [
    ("The shape is red.", "B"),
    ("At first it looks yellow, but the shape is green.", "D"),  # the last one named
    ("The shape is a circle.", "none"),                          # names no colour
    ("The shape is reddish.", "none"),                           # whole words only
])
def test_rule_verdict_reads_the_stated_fact(reasoning_text, verdict):
    assert benchmark.rule_verdict(QUESTION, reasoning_text) == verdict


@pytest.mark.parametrize("kind", ["colour", "shape", "direction"])
def test_the_reasoning_template_leads_to_its_own_option(kind):
    values = benchmark.VALUES[kind]
    question = benchmark.QUESTIONS[kind] + "\nOptions:\n" + "".join(f"{'ABCD'[i]}. {v}\n" for i, v in enumerate(values))
    for i, value in enumerate(values):
        assert benchmark.rule_verdict(question, benchmark.reasoning(kind, value)) == "ABCD"[i]
