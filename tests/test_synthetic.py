"""experiments/synthetic/benchmark.py: a seeded, rule-checkable video benchmark in the
SEED-Bench-R1 layout."""

import dataclasses
import filecmp
import json
import os
import sys

import av
import numpy as np
import pytest
from conftest import ROOT

import data
import encoding

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


def test_kinds_chooses_the_trained_questions(tmp_path):
    root = benchmark.build(str(tmp_path / "b"), n_train=6, n_val=4, seed=0, kinds=("colour", "shape"))
    for name in FILES[:3]:
        assert {r["kind"] for r in rows_of(root, name)} == {"colour", "shape"}
    assert {r["kind"] for r in rows_of(root, "validation_L3")} == {"direction"}


def test_levels_mirror_seed_bench_r1(bench):
    """Loads as SEED-Bench-R1; L1 is the training distribution, L2 new backgrounds with noise,
    L3 a question type (direction of motion) that training never asks."""
    for name, n, level in zip(FILES, (24, 12, 12, 12), ("train", "L1", "L2", "L3")):
        samples, skipped = data.load_samples(os.path.join(bench, "annotations", f"{name}.jsonl"), bench)
        assert len(samples) == n and not skipped and {s.level for s in samples} == {level}
        assert all(s.video and s.image for s in samples)
    kinds = {name: {r["kind"] for r in rows_of(bench, name)} for name in FILES}
    assert kinds["training_6k"] == kinds["validation_L1"] == kinds["validation_L2"] == {"colour"}
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


# --- the experiment: experiments/synthetic/run.py ------------------------------------------

import run  # noqa: E402  (experiments/synthetic is on sys.path above)

COLOUR_Q = "What colour is the moving shape?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"


@pytest.mark.parametrize("completion, stated, verdict", [
    ("<think>The shape is green.</think><answer>B</answer>", "B", "B"),             # consistent
    ("<think>The shape is green.</think><answer>D</answer>", "D", "B"),             # answer contradicts the fact
    ("<think>The shape moves left.</think><answer>A</answer>", "A", "none"),        # a fact about something else
    ("<think>The shape is blue.</think><answer>E</answer>", None, "C"),             # no option answered
    ("<think>The shape is red.</think>", None, "A"),                                # no answer at all
])
def test_rollouts_are_checked_by_the_rule(completion, stated, verdict):
    assert run.stated_and_verdict(COLOUR_Q, completion, list("ABCD")) == (stated, verdict)


def warm_up_draws(known, letter_follows, n=4000):
    """(kind, true value, stated value is the truth, answer follows the stated value) for n
    warm-up targets."""
    import random
    rng = random.Random(0)
    samples = [data.Sample(f"s{i}", "multiple choice", "?", "A") for i in range(n)]
    truths = {s.sample_id: {k: rng.choice(benchmark.VALUES[k]) for k in run.ATTRIBUTES} for s in samples}
    draws = []
    for sample, kind, options, truth in run.warm_up_pool(samples, truths, rng):
        assert truth == truths[sample.sample_id][kind]
        target = run.warm_up_target(kind, options, truth, rng, known, letter_follows)
        stated, verdict = run.stated_and_verdict(data.with_options(sample.question, sample.options),
                                                 target.replace("<|im_end|>", ""), list("ABCD"))
        assert stated is not None and verdict != "none", target
        draws.append((kind, truth, verdict == "ABCD"[options.index(truth)], stated == verdict))
    return draws


def test_warm_up_targets_describe_the_known_values_truly_and_follow_them_at_the_set_rate():
    """Clips of a known value are described truly, the others by a value drawn from all four
    (true 1 time in 4); the answer follows the stated value at letter_follows; known = all and
    letter_follows = 1 are the supervised ceiling's true, consistent targets."""
    assert all(true and follows for *_, true, follows in warm_up_draws(run.known_values("all"), 1.0, n=500))
    draws = warm_up_draws({"red", "green"}, 0.75)
    assert {kind for kind, *_ in draws} == set(run.ATTRIBUTES)
    assert all(true for kind, truth, true, _ in draws if truth in ("red", "green"))
    others = [true for kind, truth, true, _ in draws if truth not in ("red", "green")]
    assert sum(others) / len(others) == pytest.approx(0.25, abs=0.03)
    assert sum(f for *_, f in draws) / len(draws) == pytest.approx(0.75, abs=0.03)


def test_a_warm_model_at_chance_or_collapsed_is_refused():
    def summary(acc, cons):
        return {"results": {"L1": {"accuracy": acc, "consistency": cons}}}
    spread = [{"level": "L1", "stated": x} for x in "ABCD" * 5]
    assert run.warm_problems(summary(54.0, 75.0), spread) == []
    assert len(run.warm_problems(summary(26.0, 75.0), spread)) == 1
    assert len(run.warm_problems(summary(54.0, 30.0), spread)) == 1
    collapsed = [{"level": "L1", "stated": "D"}] * 19 + spread[:1]
    assert run.warm_problems(summary(54.0, 75.0), collapsed) == ["95% of L1 answers are one letter"]
    assert run.warm_problems(summary(54.0, 75.0), [{"level": "L1", "stated": "D"}] * 3 + spread[:1]) == []  # 75%: two guessed colours named alike
    # a known value read on 1 of 2 of its clips (the other known value on 2 of 2; unknown values do not count)
    rows = [{"level": "L1", "stated": x, "sample_id": f"s{i}", "score": sc}
            for i, (x, sc) in enumerate(zip("ABCDAB", (1.0, 1.0, 0.0, 0.0, 0.0, 1.0)))]
    truths = {"s0": "red", "s1": "green", "s2": "blue", "s3": "yellow", "s4": "red", "s5": "green"}
    assert run.warm_problems(summary(54.0, 75.0), rows, truths, {"red", "green"}) == ["reads red on 50% of its L1 clips"]
    assert run.warm_problems(summary(54.0, 75.0), rows, truths, {"green"}) == []


def test_training_curves_count_zero_advantage_groups(tmp_path):
    """Groups are (step, sample_id); a group whose rewards (accuracy + format + bonus) are all
    equal gives no gradient: here a, not b (1 and 0 right) nor c (formats differ)."""
    q = COLOUR_Q

    def row(sid, reasoning, letter, acc, fmt=1.0):
        return dict(step=1, sample_id=sid, completion=f"<think>The shape is {reasoning}.</think><answer>{letter}</answer>",
                    accuracy=acc, format=fmt, bonus=0.0, advantage=0.0)
    rows = [row("a", "red", "A", 1.0), row("a", "red", "A", 1.0), row("b", "red", "B", 0.0), row("b", "green", "B", 1.0),
            row("c", "red", "A", 1.0, 0.0), row("c", "red", "A", 1.0), row("c", "red", "A", 1.0)]
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "bonus_rate": 0.25, "ref_conf": 0.5}) + "\n")
    curve = run.training_curves(str(tmp_path), {"a": q, "b": q, "c": q})
    assert curve["zero_advantage_rate"] == [pytest.approx(1 / 3)] and curve["accuracy"] == [6 / 7]
    assert curve["consistency"] == [6 / 7]   # "red, so B" contradicts itself


def test_read_eval_counts_right_answers_the_reasoning_does_not_lead_to(tmp_path):
    rows = [{"level": "L1", "score": 1.0, "consistent": True}, {"level": "L1", "score": 1.0, "consistent": False},
            {"level": "L1", "score": 0.0, "consistent": False}, {"level": "L1", "score": 1.0, "consistent": None},
            {"level": "L2", "score": 1.0, "consistent": False}]
    with open(tmp_path / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = {"results": {lv: {"accuracy": 0.0} for lv in ("all", "L1", "L2", "L3", "L1/horizontal")}}
    json.dump(summary, open(tmp_path / "summary.json", "w"))
    results = run.read_eval(str(tmp_path))["results"]
    assert results["L1"]["correct_inconsistent"] == 25.0 and results["L2"]["correct_inconsistent"] == 100.0
    assert results["all"]["correct_inconsistent"] == 40.0
    assert "correct_inconsistent" not in results["L3"] and "correct_inconsistent" not in results["L1/horizontal"]


def summary(acc, cons):
    return {"results": {lv: {"accuracy": acc, "consistency": cons} for lv in ("all",) + run.LEVELS}}


# Two seeds of every run: (accuracy, consistency) per seed.
TWO_SEEDS = {"warm": ((25.0, 100.0), (27.0, 100.0)), "ceiling": ((90.0, 100.0), (92.0, 100.0)),
             "sft": ((60.0, 100.0), (70.0, 100.0)), "grpo": ((40.0, 80.0), (50.0, 60.0)),
             "grpo_nokl": ((42.0, 70.0), (50.0, 65.0)), "care": ((45.0, 90.0), (55.0, 100.0)),
             "care_frozen": ((40.0, 85.0), (50.0, 85.0)), "care_text": ((44.0, 95.0), (56.0, 90.0))}


def test_results_table_mean_and_spread():
    evals = {(seed, run_): summary(*TWO_SEEDS[run_][seed]) for run_ in run.RUNS for seed in (0, 1)}
    table = run.results_table(evals, [0, 1])
    assert table["grpo"]["L1"]["accuracy"] == {"mean": 45.0, "std": pytest.approx(50 ** 0.5), "per_seed": [40.0, 50.0]}
    md = run.markdown(table, [0, 1], run.Settings())
    # consistency per seed: GRPO - warm -20, -40; SFT - GRPO +20, +40; CARE - noKL +20, +35; noKL - GRPO -10, +5;
    # CARE - GRPO +10, +40; frozen - EMA -5, -15; text - full +5, -10
    assert ("| L2 | consistency (%) | 100.0 ± 0.0 | 100.0 ± 0.0 | 100.0 ± 0.0 | 70.0 ± 14.1 | 67.5 ± 3.5 | "
            "95.0 ± 7.1 | 85.0 ± 0.0 | 92.5 ± 3.5 | -30.0 ± 14.1 | 30.0 ± 14.1 | 27.5 ± 10.6 | -2.5 ± 10.6 | "
            "25.0 ± 21.2 | -10.0 ± 7.1 | -2.5 ± 10.6 |" in md)
    assert "| visual_attention" not in md  # no run has attention numbers here: no empty rows
    assert "| L1 | accuracy (%) | 26.0 ± 1.4 | 91.0 ± 1.4 | 65.0 ± 7.1 |" in md
    # every seed's numbers: seed 1 on L3, its runs then its differences (accuracy / consistency)
    assert ("| 1 | 27.0 / 100.0 | 92.0 / 100.0 | 70.0 / 100.0 | 50.0 / 60.0 | 50.0 / 65.0 | 55.0 / 100.0 | "
            "50.0 / 85.0 | 56.0 / 90.0 | 23.0 / -40.0 | 20.0 / 40.0 | 5.0 / 35.0 | 0.0 / 5.0 | 5.0 / 40.0 | "
            "-5.0 / -15.0 | 1.0 / -10.0 |" in md.split("| L3 seed |")[1])


def test_bonus_table_averages_each_window_over_seeds():
    """Per CARE arm and window: counts summed, confidences and bonus rates averaged over the seeds
    with such answers ('-' where none has any)."""
    def window(lo, hi, c, i):
        return {"steps": [lo, hi], **({"consistent": dict(zip(("n", "ref_conf", "bonus_rate"), c))} if c else {}),
                **({"inconsistent": dict(zip(("n", "ref_conf", "bonus_rate"), i))} if i else {})}
    bonus = {f"seed{seed}/{arm}": [window(1, 100, (10, 0.8, 0.5), (4, 0.2 + seed / 10, 0.0)),
                                   window(101, 200, (12, 0.9, 0.6), None)]
             for seed in (0, 1) for arm in run.CARE_ARMS}
    md = run.bonus_table(bonus, [0, 1])
    assert "| GRPO-CARE | 1-100 | 20 | 8 | 0.80 | 0.25 | 0.50 | 0.00 |" in md
    assert "| CARE, text-only ref. | 101-200 | 24 | - | 0.90 | - | 0.60 | - |" in md


def test_seed_diagnostics_put_each_seeds_start_beside_what_the_bonus_did():
    """Per seed: the warm model's numbers, no-KL GRPO's right-but-inconsistent share, each CARE
    arm's separation (consistent minus inconsistent confidence) in its first and last window,
    and CARE - noKL consistency; '-' where a window lacks one kind."""
    evals = {(seed, run_): summary(*TWO_SEEDS[run_][seed]) for run_ in run.RUNS for seed in (0, 1)}
    for (seed, run_), e in evals.items():
        for level in e["results"].values():
            level["correct_inconsistent"] = 7.0 if run_ == "grpo_nokl" else 2.0
    w = lambda c, i: {"steps": [1, 100], **({"consistent": {"n": 3, "ref_conf": c, "bonus_rate": 1.0}} if c else {}),
                      **({"inconsistent": {"n": 2, "ref_conf": i, "bonus_rate": 0.0}} if i else {})}
    bonus = {f"seed{seed}/{a}": [w(0.8, 0.3), w(0.5, 0.6 if seed == 0 else None)] for seed in (0, 1) for a in run.CARE_ARMS}
    md = run.seed_diagnostics(run.results_table(evals, [0, 1]), bonus, [0, 1])
    assert "| 0 | 25.0 / 100.0 / 2.0 | 7.0 | +0.50 / -0.10 | +0.50 / -0.10 | +0.50 / -0.10 | +20.0 |" in md
    assert "| 1 | 27.0 / 100.0 / 2.0 | 7.0 | +0.50 / - | +0.50 / - | +0.50 / - | +35.0 |" in md


def fake_results(path, seeds, s):
    """A results.json as main writes it, with every seed's evaluations, curves and diagnostics."""
    evals = {f"seed{seed}/{run_}": summary(*TWO_SEEDS[run_][seed % 2])["results"] for seed in seeds for run_ in run.RUNS}
    json.dump({"settings": dataclasses.asdict(s), "seeds": seeds, "evals": evals,
               "curves": {f"seed{seed}/{a}": {"step": [1]} for seed in seeds for a in run.ALGOS},
               "bonus_split": {f"seed{seed}/{a}": [] for seed in seeds for a in run.CARE_ARMS},
               "warm_models": {f"seed{seed}": [{"warm_up_seed": seed}] for seed in seeds}}, open(path, "w"))


def test_seeds_are_added_to_an_existing_results_file(tmp_path):
    """--seeds 2: seeds 0 and 1 of the results file are kept and read back, seed 2 joins them;
    a seed run again takes this call's numbers; other settings are refused in one line."""
    s = run.Settings(out=str(tmp_path))
    fake_results(tmp_path / "results.json", [0, 1], s)
    evals, curves, warm, bonus = {(2, "grpo"): "new"}, {}, {}, {}
    seeds = run.add_earlier_seeds(str(tmp_path / "results.json"), dataclasses.replace(s, seeds="2,1"), [2, 1],
                                  evals, curves, warm, bonus)
    assert seeds == [0, 1, 2]
    assert evals[(0, "care")]["results"]["L1"] == {"accuracy": 45.0, "consistency": 90.0}
    assert (1, "care") not in evals and evals[(2, "grpo")] == "new"   # seed 1 is this call's
    assert set(curves) == {(0, a) for a in run.ALGOS} and set(warm) == {"seed0"}
    assert set(bonus) == {f"seed0/{a}" for a in run.CARE_ARMS}
    table = run.results_table({**evals, **{(k, r): summary(1.0, 1.0) for k in (1, 2) for r in run.RUNS}}, seeds)
    assert table["grpo_nokl"]["L1"]["accuracy"]["per_seed"] == [42.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="other settings .*lr 0.0003 -> 0.001"):
        run.add_earlier_seeds(str(tmp_path / "results.json"), dataclasses.replace(s, lr=1e-3), [2], {}, {}, {}, {})


def test_run_and_diagnose_do_not_import_each_other():
    """diagnose.py is a library of run.py's, never the other way round (a cycle made each
    half-initialised when imported first)."""
    import ast
    for name, other in (("diagnose.py", "run"),):
        tree = ast.parse(open(os.path.join(ROOT, "experiments", "synthetic", name)).read())
        imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert other not in imported


def test_attention_shares_join_the_table(tmp_path):
    """read_attention: each run's visual share (video + image) of reasoning and answer tokens per
    level, in %, as analyze.py attention writes it; None where a run has no such tokens."""
    for level, warm in (("L1", 0.1), ("L2", 0.2), ("L3", 0.3)):
        os.makedirs(tmp_path / f"attention-{level}")
        report = {"checkpoints": [
            {"label": "warm", "mean_over_layers": {"reasoning": {"visual": warm}, "answer": {"visual": 0.05}}},
            {"label": "sft", "mean_over_layers": {"reasoning": {"visual": 0.4}, "answer": None}}]}
        json.dump(report, open(tmp_path / f"attention-{level}" / "attention.json", "w"))
    shares = run.read_attention(str(tmp_path))
    assert shares["warm"]["L2"] == {"visual_attention_reasoning": pytest.approx(20.0),
                                    "visual_attention_answer": pytest.approx(5.0)}
    assert shares["sft"]["L3"] == {"visual_attention_reasoning": pytest.approx(40.0), "visual_attention_answer": None}


def test_the_chains_of_thought_state_the_true_fact(tmp_path):
    """cot_file: each training row gets the reasoning its true answer follows from, in the
    field sft.py reads."""
    import sft
    s = run.Settings(out=str(tmp_path), n_train=6, n_val=2)
    run.build_benchmark(s)
    rows = [json.loads(line) for line in open(run.cot_file(s))]
    assert len(rows) == 6
    for r in rows:
        assert r[sft.SFTConfig.reasoning_field] == f"The shape is {r['answer']}."


def test_the_experiment_runs_end_to_end(tmp_path):
    """--smoke: the whole experiment (benchmark, warm-up, GRPO and CARE, evaluation with the
    rule, table and plot) on a handful of questions and steps."""
    out = tmp_path / "exp"
    run.main(["--smoke", "--out", str(out)])
    results = json.load(open(out / "results.json"))
    assert set(results["probe"]["after"]) == {"colour", "shape", "direction"}
    assert [t["warm_up_seed"] for t in results["warm_models"]["seed0"]] == [0]
    for model in ("warm", "ceiling", "sft", "grpo", "grpo_nokl", "care", "care_frozen", "care_text"):
        for level in ("L1", "L2", "L3"):
            row = results["results"][model][level]
            assert 0 <= row["accuracy"]["mean"] <= 100 and len(row["accuracy"]["per_seed"]) == 1
    shares = [results["results"][model]["L1"][f"visual_attention_{group}"]["mean"] for model in results["results"]
              for group in ("reasoning", "answer")]
    assert any(x is not None for x in shares) and all(x is None or 0 < x < 100 for x in shares)
    for algo in run.ALGOS:
        curve = results["curves"][f"seed0/{algo}"]
        assert curve["step"] == [1, 2] and all(0 <= x <= 1 for x in curve["accuracy"] + curve["consistency"] +
                                                curve["zero_advantage_rate"])
    assert all(x == 0 for x in results["curves"]["seed0/grpo"]["bonus_rate"] + results["curves"]["seed0/grpo_nokl"]["bonus_rate"])
    assert set(results["bonus_split"]) == {f"seed0/{a}" for a in ("care", "care_frozen", "care_text")}
    assert results["evals"]["seed0/care_text"]["L1"]["accuracy"] == results["results"]["care_text"]["L1"]["accuracy"]["mean"]
    predictions = [json.loads(line) for line in open(out / "seed0" / "care" / "eval" / "predictions.jsonl")]
    assert len(predictions) == 12 and all(p["judge_reply"] is not None for p in predictions if p["stated"] in list("ABCD"))
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| L3 | accuracy (%) |" in open(out / "results.md").read()


def test_supervised_loss_pads_prompts_and_targets_without_changing_them(tiny_model_dir, tokenizer, seed_bench_root):
    """tiny.supervised_loss on a batch of two (different prompt and target lengths) is the
    token-weighted mean of the two alone: padding changes nothing."""
    import torch
    from conftest import SMALL_BUDGET

    import models
    import tiny
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(tiny_model_dir, **SMALL_BUDGET)
    short = data.Sample(**{**samples[3].__dict__, "question": "Colour?\nOptions:\nA. red\nB. blue\n"})
    encoded = [encoding.encode_prompt(s, tokenizer, budget) for s in (samples[0], short)]
    assert len(encoded[0]["input_ids"]) != len(encoded[1]["input_ids"])
    targets = ["<think>The shape is red.</think><answer>A</answer><|im_end|>", "<answer>B</answer><|im_end|>"]
    with torch.no_grad():
        alone = [tiny.supervised_loss(model, tokenizer, [e], [t]).item() for e, t in zip(encoded, targets)]
        both = tiny.supervised_loss(model, tokenizer, encoded, targets).item()
    n = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]  # every target token is learned
    assert both == pytest.approx((n[0] * alone[0] + n[1] * alone[1]) / sum(n), rel=1e-4)


def test_vision_output_is_scaled_to_the_text_embeddings(tiny_model_dir, tmp_path):
    """match_text_scale: afterwards the vision tokens of fresh clips have the mean norm of the
    token embeddings, and every feature is the old one times the returned factor."""
    import random

    import numpy as np
    import torch

    import models

    model = models.load_model(tiny_model_dir, "sdpa").eval()
    budget = encoding.budget_from_checkpoint(tiny_model_dir, **run.budget(56))
    pixels, grids, _ = run.clip_batch(4, random.Random(3), np.random.default_rng(3), budget, 56, str(tmp_path / "c.mp4"))
    with torch.no_grad():
        before = run.pooled_features(model, pixels, grids)
    scale = run.match_text_scale(model, budget, 56)
    with torch.no_grad():
        after = run.pooled_features(model, pixels, grids)
        out = model.model.get_video_features(pixels, grids)
        tokens = torch.cat(list(out.pooler_output if hasattr(out, "pooler_output") else out))
    torch.testing.assert_close(after, before * scale)
    text = model.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
    assert tokens.norm(dim=-1).mean().item() == pytest.approx(text.item(), rel=0.3)   # fitted on other clips
