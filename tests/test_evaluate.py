"""evaluate.py: scoring per problem type, the consistency judge, resume, data-parallel runs, the
settings an output directory holds, skips, the comparison table and the command line, on the
tiny model and hand-made cases."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, multiprocess_env
from transformers import AutoTokenizer

import data
import evaluate
import judge
import models
import results
import rewards
import tiny
from data import Sample

SMALL = ["--max-new-tokens", "24", "--max-frames", "4", "--video-max-pixels", "3136", "--image-max-pixels", "3136",
         "--judge-max-new-tokens", "6"]
MC = Sample("q1", "multiple choice", "What colour is the square?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n", "B")


def seed_files(root):
    return [f"{root}/annotations/validation_{lv}.jsonl" for lv in ("L1", "L2", "L3")]


# --- scoring ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    ("100", "100", 1.0),
    ("107", "100", 0.9),   # 7% error: below 1 - t for t = 0.50 ... 0.90, not 0.95
    ("105", "100", 0.9),   # 5% is not below 5%: strict
    ("95", "100", 0.9),
    ("80", "100", 0.6),    # 20% < 0.50, 0.45, ..., 0.25 (t = 0.50 ... 0.75), not < 0.20: 6 thresholds
    ("149", "100", 0.1),
    ("150", "100", 0.0),
    ("-100", "100", 0.0),
    ("0.3", "0", 0.4),     # gt 0: absolute error 0.3 < 0.50, 0.45, 0.40, 0.35
    ("12 m", "12", 0.0),   # not a number
])
def test_mean_relative_accuracy_hand_computed(pred, gt, expected):
    assert rewards.mean_relative_accuracy(pred, gt) == pytest.approx(expected)


def test_evaluation_scores_each_problem_type():
    def s(ptype, solution, completion):
        return evaluate.score(Sample("x", ptype, "Q?", solution), completion)

    assert s("multiple choice", "B", "<think>green</think><answer>B.</answer>") == {
        "answer": "B.", "score": 1.0, "format_ok": True}
    bare = s("multiple choice", "B", " B ")  # no tag: the whole output is the answer, format fails
    assert bare["score"] == 1.0 and not bare["format_ok"] and bare["answer"] is None
    assert s("multiple choice", "B", "<answer>C</answer>")["score"] == 0.0
    assert s("numerical", "3", "<answer>3.001</answer>")["score"] == 1.0   # equal after rounding to 2 decimals
    assert s("numerical", "3", "<answer>3.01</answer>")["score"] == 0.0
    assert s("OCR", "no text here", "<answer>no text</answer>")["score"] == pytest.approx(2 / 3)  # WER 1/3
    assert s("free-form", "the red square moves", "<answer>the red square moves</answer>")["score"] == pytest.approx(1.0)
    # Regression: mean relative accuracy in evaluation (training's reward would give 0.93).
    assert s("regression", "100", "<answer>107</answer>")["score"] == pytest.approx(0.9)
    assert rewards.accuracy_reward("<answer>107</answer>", "100", "regression") == pytest.approx(0.93)


# --- consistency -----------------------------------------------------------------------------

def test_reasoning_is_read_without_the_answer():
    assert judge.reasoning_of("<think> the square is green </think>\n<answer>B</answer>") == "the square is green"
    assert judge.reasoning_of("The square is green, so <answer>B</answer> it is.") == "The square is green, so  it is."
    assert judge.reasoning_of("<answer>B</answer>") == ""
    assert judge.option_letters(MC) == ["A", "B", "C", "D"]


def test_the_judge_reads_every_option_letter_the_data_admits(tmp_path):
    """A Video-R1 row with twelve options, A to L (data.py admits A to Z): the judge sees all of
    them and names K or l as an option, not as undecided."""
    tiny.write_image(str(tmp_path / "x.png"), np.zeros((56, 56, 3), dtype=np.uint8))
    options = [f"{chr(65 + i)}. item {i}" for i in range(12)]
    (tmp_path / "mc.json").write_text(json.dumps([{"problem_id": 1, "problem": "Which?", "data_type": "image",
                                                   "problem_type": "multiple choice", "options": options,
                                                   "solution": "<answer>K</answer>", "path": "x.png"}]))
    [sample], _ = data.load_samples(str(tmp_path / "mc.json"), str(tmp_path))
    letters = judge.option_letters(sample)
    assert letters == list("ABCDEFGHIJKL") and sample.solution == "K"
    assert judge.parse_verdict("<answer>K</answer>", letters) == "K"
    assert judge.parse_verdict("<answer>l</answer>", letters) == "L"
    assert judge.parse_verdict("<answer>M</answer>", letters) is None


@pytest.mark.parametrize("reply, verdict", [
    ("<answer>B</answer>", "B"),
    ("B", "B"),
    (" (c) ", "C"),
    ("D.", "D"),
    ("<think>A or maybe D</think><answer>D</answer>", "D"),  # a judge that reasons first: last tag
    ("<answer>none</answer>", "none"),
    ("none", "none"),
    ("I think B", None),                  # malformed: undecided
    ("", None),
    ("<answer>E</answer>", None),         # not an option
    ("<answer>A or B</answer>", None),
    ("<answer></answer>", None),
])
def test_judge_replies_parse_to_a_verdict_or_undecided(reply, verdict):
    assert judge.parse_verdict(reply, ["A", "B", "C", "D"]) == verdict


def test_judged_rows_and_consistency_rate(monkeypatch, tokenizer):
    """Five multiple-choice answers and an unanswered one: the judge (canned replies) agrees
    twice, names another option once, says none once and is unreadable once. Consistency
    2 / 5 = 40%, one undecided; the unanswered sample and the numerical one are not judged."""
    seen = []

    def replies(judge, tok, texts, max_new_tokens):
        seen.extend(texts)
        return ["<answer>B</answer>", "A", "<answer>C</answer>", "none", "I cannot tell"]

    monkeypatch.setattr(judge, "judge_replies", replies)
    completions = ["<think>it is green</think><answer>B</answer>", "<think>red</think><answer>A</answer>",
                   "<think>blue?</think><answer>D</answer>", "<think>hmm</think><answer>B</answer>",
                   "<think>green</think><answer>B</answer>", "<think>no idea</think>"]
    samples = [MC] * 6 + [Sample("n", "numerical", "How many?", "3")]
    completions.append("<answer>3</answer>")
    rows = [{"key": f"L1/{i}", "benchmark": "L1", "level": "L1", "domain": None, "problem_type": s.problem_type,
             "completion": c, **evaluate.score(s, c)} for i, (s, c) in enumerate(zip(samples, completions))]
    judge.judge_rows(object(), tokenizer, samples, rows, 8)
    assert [r["verdict"] for r in rows] == ["B", "A", "C", "none", None, None, None]
    assert [r["consistent"] for r in rows] == [True, True, False, False, False, None, None]
    assert len(seen) == 5
    for text, completion in zip(seen, completions):
        assert "What colour is the square?" in text and "C. blue" in text  # question and options
        assert judge.reasoning_of(completion) in text
        assert "<answer>" not in text.split("Reasoning:")[1].split("Which option")[0]  # the answer is gone
    s = results.summarize(rows)["all"]
    assert (s["n"], s["judged"], s["consistent"], s["undecided"]) == (7, 5, 2, 1)
    assert s["consistency"] == pytest.approx(40.0)
    assert s["accuracy"] == pytest.approx(100 * 4 / 7)  # B, B, B and the number


def test_compare_prints_deltas(tmp_path):
    def run(name, acc, cons):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"model": name, "results": {
            "all": {"n": 8, "accuracy": acc, "consistency": cons},
            "L3": {"n": 4, "accuracy": acc - 10, "consistency": None}}}))
        return str(path)
    table = evaluate.main(["compare", run("grpo", 50.0, 58.0), run("care", 62.5, 82.0)])
    assert "A: grpo" in table and "B: care" in table
    assert "| all | 8 / 8 | 50.0 | 62.5 | +12.5 | 58.0 | 82.0 | +24.0 |" in table
    assert "| L3 | 4 / 4 | 40.0 | 52.5 | +12.5 | - | - | - |" in table


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read: No such file or directory"),
    ("{not json", "not JSON: "),
    ('{"model": "grpo"}', 'no "model" or no "results" table'),
    ('{"results": {"all": {"n": 1}}}', 'no "model" or no "results" table'),
    ('[1, 2]', 'no "model" or no "results" table'),
    ('{"model": "m", "results": {"all": {"n": 8, "accuracy": "50.0"}}}', "results['all']['accuracy'] is '50.0', "
                                                                        "not a number"),
    ('{"model": "m", "results": {"L1": {"n": 4, "accuracy": 1.0, "consistency": [2]}}}',
     "results['L1']['consistency'] is [2], not a number"),
])
def test_compare_names_a_bad_summary_in_one_line(content, problem, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model": "care", "results": {"all": {"n": 8, "accuracy": 50.0}}}))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    for argv in (["compare", str(bad), str(good)], ["compare", str(good), str(bad)]):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(argv)
        message = str(exit.value.code)
        assert message.startswith(f"{bad}: ") and problem in message and "\n" not in message


def test_compare_usage(capsys):
    for argv in (["compare", "--help"], ["compare", "-h"]):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(argv)
        assert exit.value.code == 0
        assert capsys.readouterr().out.startswith("usage: evaluate.py compare [-h] A/summary.json B/summary.json")
    for argv in (["compare"], ["compare", "a.json"], ["compare", "a.json", "b.json", "c.json"]):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err.startswith("usage: evaluate.py compare [-h] A/summary.json B/summary.json")


def test_compare_on_the_command_line(tmp_path):
    """A malformed summary: one line on stderr and a non-zero exit, no traceback."""
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text("{}")
    done = subprocess.run([sys.executable, "evaluate.py", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{tmp_path / 'a.json'}: not JSON: ")


def test_a_bad_row_stops_the_command_in_one_line(warm_model_dir, seed_bench_root, tmp_path):
    """Without --skip-bad-samples a bad annotation row stops the run: one line naming the file
    and the row, exit status 1, no traceback."""
    bad = tmp_path / "validation_L1.jsonl"
    bad.write_text(open(seed_files(seed_bench_root)[0]).read() + "{not json\n")
    done = subprocess.run([sys.executable, "evaluate.py", "--model", warm_model_dir, "--data", str(bad), "--data-root",
                           seed_bench_root, "--output-dir", str(tmp_path / "out"), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"evaluate.py: {bad}:5: not valid JSON")


# --- end to end on the tiny model ------------------------------------------------------------

def test_seed_bench_evaluation_end_to_end(warm_model_dir, seed_bench_root, tmp_path):
    """A tiny checkpoint on L1/L2/L3, judged by itself: every row carries its verdict, and the
    summary's counts follow from the rows."""
    summary = evaluate.main(["--model", warm_model_dir, "--data", *seed_files(seed_bench_root),
                             "--data-root", seed_bench_root, "--output-dir", str(tmp_path), *SMALL])
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12
    assert {r["level"] for r in rows} == {"L1", "L2", "L3"}
    for r in rows:
        assert set(r) >= {"sample_id", "level", "domain", "completion", "answer", "score", "format_ok",
                          "stated", "judge_reply", "verdict", "consistent"}
        assert (r["consistent"] is None) == (r["stated"] is None)  # every answered sample is judged
    assert summary["all"]["n"] == 12 and summary["L3"]["n"] == 4
    assert sum(v["n"] for k, v in summary.items() if k.startswith("L3/")) == 4
    assert summary["all"]["accuracy"] == pytest.approx(100.0 * sum(r["score"] for r in rows) / 12)
    judged = [r for r in rows if r["consistent"] is not None]
    assert judged, "the warm model answers with a letter; nothing was judged"
    assert summary["all"]["judged"] == len(judged)
    assert summary["all"]["undecided"] == sum(r["verdict"] is None for r in judged)
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["results"] == json.loads(json.dumps(summary))
    assert "| L1 | 4 |" in open(tmp_path / "summary.md").read()
    assert not list(tmp_path.glob("predictions.part*"))  # merged and removed


def test_video_r1_files_with_a_separate_text_judge(warm_model_dir, tmp_path, tokenizer):
    """A Video-R1-style file (every problem type, videos and images) at its 32-frame default,
    judged by a different, text-only chat model loaded from its own path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    root = tiny.build_video_r1_eval(str(tmp_path / "data"), n=10)
    judge_dir = str(tmp_path / "judge")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    work, _ = evaluate.load_work(evaluate.parse_args(["--model", warm_model_dir, "--data", f"{root}/eval_tiny.json",
                                                      "--data-root", root, "--output-dir", "o"]))
    assert {w[3] for w in work} == {32} and {w[2] for w in work} == {"eval_tiny"}

    flags = [f for f in SMALL if f not in ("--max-frames", "4")]  # the file's own 32-frame default
    evaluate.main(["--model", warm_model_dir, "--data", f"{root}/eval_tiny.json", "--data-root", root,
                   "--output-dir", str(tmp_path / "out"), "--judge", judge_dir, *flags])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert sorted(r["problem_type"] for r in rows) == sorted(rewards.PROBLEM_TYPES * 2)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["judge"] == judge_dir
    assert {f"eval_tiny/{t}" for t in rewards.PROBLEM_TYPES} <= set(summary["results"])
    for r in rows:
        assert r["score"] == evaluate.score(Sample("x", r["problem_type"], "", r["solution"]), r["completion"])["score"]


def test_resume_skips_finished_samples_without_duplicates(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """A second run evaluates only what is missing; a crash that left a part file (with a last
    row cut short) loses nothing and duplicates nothing."""
    import rollout
    generated = []
    real = rollout.generate

    def counting(model, prompts, *args, **kwargs):
        if "sample_ids" in prompts:  # the samples' own generation, not the judge's
            generated.append(prompts["input_ids"].shape[0])
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rollout, "generate", counting)
    common = ["--model", warm_model_dir, "--data", *seed_files(seed_bench_root), "--data-root", seed_bench_root, *SMALL,
              "--batch-size", "1"]  # one sample a batch: a batch is either done or not (see the test below)
    base = common + ["--output-dir", str(tmp_path)]
    evaluate.main(base + ["--limit", "2"])
    first = {json.loads(line)["key"]: json.loads(line) for line in open(tmp_path / "predictions.jsonl")}
    assert len(first) == 6 and sum(generated) == 6

    generated.clear()
    evaluate.main(base + ["--limit", "3"])
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert sum(generated) == 3 and len(rows) == 9 and len({r["key"] for r in rows}) == 9
    assert all(r == first[r["key"]] for r in rows if r["key"] in first)  # earlier rows kept as they were

    # A crash mid-run: predictions.jsonl has 9 rows, a part file 2 more and half of a third.
    full = tmp_path / "full"
    evaluate.main(common + ["--output-dir", str(full)])
    all_rows = [json.loads(line) for line in open(full / "predictions.jsonl")]
    extra = [r for r in all_rows if r["key"] not in {x["key"] for x in rows}]
    with open(tmp_path / "predictions.part1.jsonl", "w") as f:
        f.write(json.dumps(extra[0]) + "\n" + json.dumps(extra[1]) + "\n" + json.dumps(extra[2])[:40])
    generated.clear()
    summary = evaluate.main(base)
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert sum(generated) == 1  # only the row cut short is evaluated again
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in all_rows)
    assert summary["all"]["n"] == 12 and not list(tmp_path.glob("predictions.part*"))


def test_a_resumed_sampled_evaluation_draws_the_same_samples(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """At temperature 1, a run that crashed twice and resumed writes the completions an
    uninterrupted run writes, row for row: batches are formed over the whole work list and
    seeded by their place in it, and a batch that was only partly written is evaluated again,
    whole."""
    import rollout
    generated, crash_after = [], [None]
    real = rollout.generate

    def recording(model, prompts, *args, **kwargs):
        if len(generated) == crash_after[0]:
            raise RuntimeError("crash")
        generated.append(len(prompts["sample_ids"]))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rollout, "generate", recording)
    argv = ["--model", warm_model_dir, "--data", *seed_files(seed_bench_root), "--data-root", seed_bench_root, *SMALL,
            "--temperature", "1.0", "--top-p", "1.0", "--batch-size", "2", "--judge", "none"]
    evaluate.main(argv + ["--output-dir", str(tmp_path / "whole")])
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "predictions.jsonl")]
    assert len(whole) == 12 and len({r["completion"] for r in whole}) > 3  # sampled: not all alike

    # The first crash: batches 0-5 of 2; 0 done; 1 half done; 2 not started; 3 in a part file;
    # 4 half done, its second row cut short; 5 not started.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "eval_settings.json").write_text(open(tmp_path / "whole" / "eval_settings.json").read())
    (crashed / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    (crashed / "predictions.part0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in whole[6:9]) + json.dumps(whole[9])[:50])
    generated.clear()
    crash_after[0] = 2  # the resumed run crashes too, after batches 1 and 2
    with pytest.raises(RuntimeError, match="crash"):
        evaluate.main(argv + ["--output-dir", str(crashed)])
    crash_after[0] = None
    summary = evaluate.main(argv + ["--output-dir", str(crashed)])
    resumed = [json.loads(line) for line in open(crashed / "predictions.jsonl")]
    assert [r["key"] for r in resumed] == [r["key"] for r in whole]
    assert [r["completion"] for r in resumed] == [r["completion"] for r in whole]
    assert resumed == whole and summary["all"]["n"] == 12
    assert generated == [2, 2, 2, 2]  # batches 1 and 2, then 4 and 5


def test_the_summary_counts_only_the_files_asked_for(warm_model_dir, seed_bench_root, tmp_path):
    """Rows an earlier run finished for other files, or beyond --limit, stay in predictions.jsonl
    for a later run to reuse, but the summary counts only this run's files and limit."""
    L1, L2, _ = seed_files(seed_bench_root)
    argv = ["--model", warm_model_dir, "--data-root", seed_bench_root, "--output-dir", str(tmp_path), *SMALL]
    evaluate.main(argv + ["--data", L1, L2, "--limit", "3"])
    for files, limit, levels in (([L1], "3", {"L1"}), ([L2], "1", {"L2"}), ([L2, L1], "2", {"L1", "L2"})):
        summary = evaluate.main(argv + ["--data", *files, "--limit", limit])
        n = len(files) * int(limit)
        assert summary["all"]["n"] == n and {k for k in summary if k != "all"} == levels
        saved = json.load(open(tmp_path / "summary.json"))
        assert saved["samples"] == n and saved["results"] == json.loads(json.dumps(summary))
        table = open(tmp_path / "summary.md").read()
        assert all((f"| {level} |" in table) == (level in levels) for level in ("L1", "L2"))
        rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
        assert len(rows) == 6 and len({r["key"] for r in rows}) == 6  # all kept, nothing evaluated again


def test_other_settings_are_refused_until_overwrite(warm_model_dir, tiny_model_dir, seed_bench_root, tmp_path, capsys,
                                                   monkeypatch):
    """The settings are recorded with the results; a re-run with another model or decoding stops
    and names what changed, before a model is loaded; --overwrite starts over."""
    out = tmp_path / "out"
    data = ["--data", seed_files(seed_bench_root)[0], "--data-root", seed_bench_root, *SMALL]
    base = [*data, "--output-dir", str(out), "--limit", "2"]
    evaluate.main(["--model", warm_model_dir, *base])
    recorded = json.load(open(out / "eval_settings.json"))
    assert recorded["settings"]["model"] == os.path.realpath(warm_model_dir)
    assert recorded["settings"]["temperature"] == 0.1 and recorded["settings"]["max_frames"] == 4
    assert not set(recorded["settings"]) & {"output_dir", "data", "limit", "skip_bad_samples", "overwrite"}
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["settings"] for r in rows] == [recorded["hash"]] * 2
    os.symlink(warm_model_dir, tmp_path / "link")  # the same checkpoint by another path: the same setting
    evaluate.main(["--model", str(tmp_path / "link"), *base])

    from transformers import PreTrainedModel
    with monkeypatch.context() as m, pytest.raises(SystemExit) as exit:
        m.setattr(PreTrainedModel, "from_pretrained", None)  # no model of any family is loaded
        evaluate.main(["--model", tiny_model_dir, *base, "--temperature", "0.5"])
    message = str(exit.value.code)
    assert f"--model {os.path.realpath(warm_model_dir)} -> {os.path.realpath(tiny_model_dir)}" in message
    assert "--temperature 0.1 -> 0.5" in message and "--overwrite" in message and "\n" not in message
    assert "--max-frames" not in message and [json.loads(line) for line in open(out / "predictions.jsonl")] == rows

    capsys.readouterr()
    summary = evaluate.main(["--model", tiny_model_dir, *base, "--temperature", "0.5", "--limit", "1", "--overwrite"])
    assert "other settings" not in capsys.readouterr().out  # the old rows were deleted, not merely left out
    saved = json.load(open(out / "summary.json"))
    new_rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert saved["model"] == tiny_model_dir and summary["all"]["n"] == saved["samples"] == len(new_rows) == 1
    assert new_rows[0]["settings"] == json.load(open(out / "eval_settings.json"))["hash"] != recorded["hash"]

    bare = tmp_path / "bare"  # results from before settings were recorded: refused too
    bare.mkdir()
    (bare / "predictions.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="without the eval_settings.json"):
        evaluate.main(["--model", warm_model_dir, *data, "--output-dir", str(bare)])


def test_rows_made_under_other_settings_are_never_reused(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """A part file row whose settings hash is not the directory's is evaluated again."""
    import rollout
    generated = []
    real = rollout.generate

    def recording(model, prompts, *args, **kwargs):
        generated.extend(prompts.get("sample_ids", []))   # the samples' own generation, not the judge's
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rollout, "generate", recording)
    argv = ["--model", warm_model_dir, "--data", seed_files(seed_bench_root)[0], "--data-root", seed_bench_root,
            "--output-dir", str(tmp_path), "--limit", "3", "--batch-size", "1", *SMALL]
    evaluate.main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "predictions.part0.jsonl").write_text(json.dumps({**rows[2], "settings": "another"}) + "\n")
    generated.clear()
    evaluate.main(argv)
    again = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert generated == [rows[2]["sample_id"]] and again == rows


def test_two_processes_give_the_one_process_summary(warm_model_dir, seed_bench_root, tmp_path):
    """9 samples (not a multiple of 2) in batches of 2 over 2 processes: the same predictions and
    summary as one process, no sample lost or evaluated twice."""
    args = ["evaluate.py", "--model", warm_model_dir, "--data", *seed_files(seed_bench_root), "--data-root",
            seed_bench_root, "--limit", "3", "--batch-size", "2", *SMALL]
    env = multiprocess_env()
    for n, out in ((1, "one"), (2, "two")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args,
               "--output-dir", str(tmp_path / out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    one, two = (json.load(open(tmp_path / out / "summary.json")) for out in ("one", "two"))
    assert one["results"] == two["results"] and one["samples"] == two["samples"] == 9
    rows = {out: [json.loads(line) for line in open(tmp_path / out / "predictions.jsonl")] for out in ("one", "two")}
    assert rows["one"] == rows["two"]
    assert len({r["key"] for r in rows["two"]}) == 9


def test_skips_on_every_process_are_printed_and_counted(warm_model_dir, tmp_path):
    """--skip-bad-samples on 2 processes, batches of 1: a broken video on each process (one of
    them twice: a repeated row gives the same message) and a row whose image is missing. Each
    skip is printed once, by the process it happens on, and counted once."""
    root = tiny.build_seed_bench(str(tmp_path / "data"), n_train=0, n_val=4)
    L1, L2 = f"{root}/annotations/validation_L1.jsonl", f"{root}/annotations/validation_L2.jsonl"
    l1 = [json.loads(line) for line in open(L1)]
    with open(L1, "a") as f:
        f.write(json.dumps(l1[0]) + "\n")  # the same sample again: key l1_00000#2, batch 4, process 0
    for row in l1[:2]:  # batches 0 and 1: processes 0 and 1
        with open(f"{root}/videos/{row['video_source']}/{row['video_basename']}", "wb") as f:
            f.write(b"not a video")
    l2 = [json.loads(line) for line in open(L2)]
    os.remove(f"{root}/images/{l2[1]['video_source']}/{l2[1]['current_observation_basename']}")  # a loading skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "evaluate.py",
           "--model", warm_model_dir, "--data", L1, L2, "--data-root", root, "--output-dir", str(tmp_path / "out"),
           "--batch-size", "1", "--judge", "none", "--skip-bad-samples", *SMALL]
    done = subprocess.run(cmd, cwd=ROOT, env=multiprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # (Counted in the whole output: a line can follow another process's progress bar.)
    for process, key in ((0, "L1/l1_00000"), (1, "L1/l1_00001"), (0, "L1/l1_00000#2")):
        assert done.stderr.count(f"process {process}: skipped {key}: sample l1_") == 1, done.stderr
    assert done.stderr.count("skipped while loading: ") == 1
    assert done.stderr.count(f"skipped while loading: {L2}:2 (sample {l2[1]['sample_id']})") == 1
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["skipped"] == len(summary["skipped_messages"]) == 4 and summary["samples"] == 5
    assert sum(l2[1]["sample_id"] in m for m in summary["skipped_messages"]) == 1
    assert results.summarize([]) == {}  # every sample skipped: an empty table, not a division by zero


def test_a_rule_as_judge(warm_model_dir, tmp_path):
    """--judge FILE.py:FUNCTION calls a rule with (question, reasoning): here the synthetic
    benchmark's, which reads the fact a reasoning states (experiments/synthetic)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "synthetic"))
    import benchmark
    root = benchmark.build(str(tmp_path / "data"), n_train=0, n_val=6, seed=1)
    rule = os.path.join(ROOT, "experiments", "synthetic", "benchmark.py") + ":rule_verdict"
    evaluate.main(["--model", warm_model_dir, "--data", f"{root}/annotations/validation_L1.jsonl", "--data-root", root,
                   "--output-dir", str(tmp_path / "out"), "--judge", rule, *SMALL])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    questions = {json.loads(line)["sample_id"]: json.loads(line) for line in open(f"{root}/annotations/validation_L1.jsonl")}
    judged = [r for r in rows if r["consistent"] is not None]
    assert judged, "the warm model answers with a letter; nothing was judged"
    for r in judged:
        q = questions[r["sample_id"]]
        question = q["question"] + "Options:\n" + "".join(f"{'ABCD'[i]}. {q['choice_' + k]}\n" for i, k in enumerate("abcd"))
        assert r["judge_reply"] == benchmark.rule_verdict(question, judge.reasoning_of(r["completion"]))
        assert r["consistent"] == (r["verdict"] == r["stated"])
    summary = json.load(open(tmp_path / "out" / "summary.json"))["results"]["all"]
    assert summary["consistent"] == sum(r["consistent"] for r in judged)


# --- the command line ------------------------------------------------------------------------

def test_help_explains_every_option(capsys, monkeypatch):
    """Every option has a help line that gives its default or says it is required."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n")[1]
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):  # "  --flag METAVAR   help" or "  --flag METAVAR" with the help below
            current = line.split()[0].rstrip(",")
            entries[current] = " ".join(line.split()[1:])
        elif current:
            entries[current] += " " + line.strip()
    flags = ["--model", "--data", "--data-root", "--output-dir", "--judge", "--judge-max-new-tokens", "--batch-size",
             "--max-new-tokens", "--temperature", "--top-p", "--fps", "--min-frames", "--max-frames",
             "--video-min-pixels", "--video-max-pixels", "--image-min-pixels", "--image-max-pixels", "--limit",
             "--seed", "--skip-bad-samples", "--overwrite"]
    assert set(flags) <= set(entries)
    for option, entry in entries.items():
        if option != "-h":
            assert re.search(r"\((default: .+|required)\)$", entry), f"{option} gives no default: {entry}"
            words = [w for w in entry.split() if not re.fullmatch(r"[][A-Z_.]+", w)]  # less the metavar
            assert len(words) >= 4, f"{option} has no help: {entry}"
    assert "(default: 0.1)" in entries["--temperature"] and "(default: off)" in entries["--skip-bad-samples"]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--judge-max-new-tokens", "-1"], "--judge-max-new-tokens must be at least 1"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--fps", "0"], "--fps must be above 0"),
    (["--min-frames", "0"], "--min-frames must be at least 1"),
    (["--min-frames", "8", "--max-frames", "4"], "--max-frames 4 is below --min-frames 8"),
    (["--video-min-pixels", "5000", "--video-max-pixels", "4000"],
     "--video-min-pixels 5000 is above --video-max-pixels 4000"),
    (["--image-max-pixels", "0"], "--image-max-pixels must be at least 1"),
    (["--limit", "-1"], "--limit must be 0 (all) or more"),
    (["--model", "no/such/checkpoint"], "--model no/such/checkpoint: no such directory"),
    (["--data", "no/such/file.jsonl"], "--data: no such file: no/such/file.jsonl"),
    (["--judge", "no/such/judge"], "--judge no/such/judge: no such directory"),
    (["--judge", "no/such/rule.py:verdict"], "--judge no/such/rule.py:verdict: no such file"),
])
def test_bad_settings_stop_before_anything_is_loaded(flags, message, seed_bench_root, tmp_path, capsys, monkeypatch):
    """One line naming the setting; the model is never loaded (from_pretrained would fail)."""
    from transformers import PreTrainedModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_loading)  # any family
    base = {"--model": seed_bench_root, "--data": seed_files(seed_bench_root)[0], "--data-root": seed_bench_root,
            "--output-dir": str(tmp_path)}
    for name, value in zip(flags[::2], flags[1::2]):
        base.pop(name, None)
    argv = [x for name, value in base.items() for x in (name, value)] + flags
    with pytest.raises(SystemExit) as exit:
        evaluate.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and f"error: {message}" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing written


def test_a_model_directory_that_is_not_a_model_is_named_in_one_line(seed_bench_root, tmp_path, capsys):
    """A directory without config.json (here the data root) stops before anything loads, not
    with tokenizer errors blaming sentencepiece."""
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--model", seed_bench_root, "--data", seed_files(seed_bench_root)[0], "--data-root",
                       seed_bench_root, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"error: --model {seed_bench_root}: no config.json, not a model directory" in err
    assert not os.path.exists(tmp_path / "out")


def test_the_public_video_switches_reach_the_prompts(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """--second-per-grid and --frame-rounding evaluate a model the way it was trained (e.g. with
    train.py --reproduce-official); both reach the visual budget and are recorded settings."""
    import encoding
    budgets = []
    real = encoding.encode_prompt
    monkeypatch.setattr(encoding, "encode_prompt",
                        lambda s, tok, budget, *rest: budgets.append(budget) or real(s, tok, budget, *rest))
    evaluate.main(["--model", warm_model_dir, "--data", seed_files(seed_bench_root)[0], "--data-root", seed_bench_root,
                   "--output-dir", str(tmp_path), "--limit", "1", "--judge", "none", *SMALL,
                   "--second-per-grid", "1.0", "--frame-rounding", "floor"])
    assert budgets and all(b.second_per_grid == 1.0 and b.frame_rounding == "floor" for b in budgets)
    settings = json.load(open(tmp_path / "eval_settings.json"))["settings"]
    assert settings["second_per_grid"] == 1.0 and settings["frame_rounding"] == "floor"


def test_the_public_evaluations_reach_scoring_prompt_budget_and_stopping(warm_model_dir, seed_bench_root, tmp_path,
                                                                          monkeypatch):
    """--reproduce-official (eval_bench.py) and --preset seed-bench-r1 (infer.py): the scoring
    rules, the prompt layout, the visual pipeline and the decoding reach the pieces that use
    them and are recorded; every completion stops at the checkpoint's end-of-sequence ids."""
    import encoding
    import rewards
    import rollout
    real_encode, real_score, real_config = encoding.encode_prompt, rewards.eval_score, rollout.sampling_config
    for switch, rules in ((["--reproduce-official"], "official"), (["--preset", "seed-bench-r1"], "seed-bench-r1")):
        encoded, scored, configs = [], [], []
        monkeypatch.setattr(encoding, "encode_prompt", lambda *a: encoded.append(a) or real_encode(*a))
        monkeypatch.setattr(rewards, "eval_score", lambda *a: scored.append(a) or real_score(*a))
        monkeypatch.setattr(rollout, "sampling_config", lambda *a, **k: configs.append(k) or real_config(*a, **k))
        out = tmp_path / rules
        evaluate.main(["--model", warm_model_dir, "--data", seed_files(seed_bench_root)[0], "--data-root",
                       seed_bench_root, "--output-dir", str(out), "--limit", "2", "--judge", "none",
                       "--max-new-tokens", "8", *switch])
        settings = json.load(open(out / "eval_settings.json"))["settings"]
        assert settings["scoring"] == rules and settings["prompt_template"] == rules
        assert encoded and all(a[3].name == rules and a[2].frame_rounding == "floor" for a in encoded)
        if rules == "official":   # qwen_vl_utils' effective per-frame bounds, as in training's switch
            assert all((a[2].video_min_pixels, a[2].video_max_pixels) == (100352, 105369) for a in encoded)
        assert scored and all(a[3] == rules for a in scored)
        assert configs[0]["stop"] == rollout.stop_ids(AutoTokenizer.from_pretrained(warm_model_dir),
                                                      models.load_model(warm_model_dir))
        assert len(configs[0]["stop"]) == 2
    assert encoded[0][2].resize_to == 256 and configs[0]["repetition_penalty"] == 1.05   # the preset's
    assert settings["max_new_tokens"] == 8   # a flag given explicitly wins over the preset's 256


def test_compare_refuses_summaries_scored_by_different_rules(tmp_path):
    def summary(name, scoring):
        path = tmp_path / f"{name}.json"
        settings = {"scoring": scoring} if scoring else {}
        path.write_text(json.dumps({"model": name, "settings": settings, "results": {"all": {"n": 1, "accuracy": 50.0}}}))
        return str(path)
    with pytest.raises(SystemExit, match="scored by the official rules .* by the ours rules"):
        evaluate.main(["compare", summary("a", "official"), summary("b", None)])   # an old summary: ours
    assert "scoring: official rules" in evaluate.main(["compare", summary("c", "official"), summary("d", "official")])


def test_seed_bench_r1_scoring_refuses_other_problem_types(warm_model_dir, tmp_path):
    root = tiny.build_video_r1_eval(str(tmp_path / "data"), n=5)
    with pytest.raises(data.DataError, match="--scoring seed-bench-r1: the seed-bench-r1 rules score multiple choice"):
        evaluate.main(["--model", warm_model_dir, "--data", f"{root}/eval_tiny.json", "--data-root", root,
                       "--output-dir", str(tmp_path / "out"), "--scoring", "seed-bench-r1", "--judge", "none"])


def test_a_batch_is_scored_sample_by_sample(sensitive_model_dir, seed_bench_root, tmp_path):
    """Under the prompt-sensitive model, sampling at temperature 1, every sample gets its own
    completion; evaluated in batches of 3 or one by one, each row is the same (each sample is
    sampled from its own seeded stream), so a batch whose prompts, videos, rows or seeds were
    mixed up would show."""
    rows = {}
    for size in (3, 1):
        out = tmp_path / f"batch{size}"
        evaluate.main(["--model", sensitive_model_dir, "--data", seed_files(seed_bench_root)[0], "--data-root",
                       seed_bench_root, "--output-dir", str(out), "--judge", "none", "--batch-size", str(size),
                       "--mixed-precision", "no", *SMALL, "--temperature", "1", "--top-p", "1"])
        rows[size] = {r["key"]: r["completion"] for r in map(json.loads, open(out / "predictions.jsonl"))}
    assert rows[3] == rows[1] and len(rows[1]) == 4
    assert len(set(rows[1].values())) == 4
