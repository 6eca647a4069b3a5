"""experiments/synthetic/diagnose.py: token classes, gradient share, zero-advantage rate."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, SMALL_BUDGET

import data
import encoding
import models

sys.path.insert(0, os.path.join(ROOT, "experiments", "synthetic"))
import diagnose  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow")


def test_zero_advantage_rate(tmp_path):
    # step 1: group a equal (2, 2), group b not (2, 1) -> 1/2
    # step 2: a equal through the bonus (2.5, 2.5), c not (1, 0), d equal (0, 0) -> 2/3
    groups = {1: {"a": [(1, 1, 0), (1, 1, 0)], "b": [(1, 1, 0), (0, 1, 0)]},
              2: {"a": [(1, 1, 0.5), (1, 1, 0.5)], "c": [(0, 1, 0), (0, 0, 0)], "d": [(0, 0, 0), (0, 0, 0)]}}
    path = tmp_path / "completions.jsonl"
    with open(path, "w") as f:
        for step, by_id in groups.items():
            for sid, rows in by_id.items():
                for acc, fmt, bonus in rows:
                    f.write(json.dumps({"step": step, "sample_id": sid, "completion": "", "accuracy": acc,
                                        "format": fmt, "bonus": bonus, "advantage": 0.0, "ref_conf": None}) + "\n")
    assert diagnose.zero_advantage_rate(path) == {"step": [1, 2], "zero_advantage_rate": [0.5, 2 / 3]}


@pytest.mark.parametrize("values", [COLOURS, None])
def test_token_classes_by_hand(tokenizer, values):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>The shape is red.</think><answer>B</answer>", "no tags at all"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    ids = torch.full((2, max(map(len, rows)) + 2), tokenizer.pad_token_id)  # [2, T], padded after the end
    mask = torch.zeros(ids.shape)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    classes = diagnose.token_classes(tokenizer, ids, mask, [values] * 2)
    pick = lambda name, i: tokenizer.decode(ids[i][classes[name][i]])  # noqa: E731
    # tiny's BPE (Qwen2's split) gives ... ' is', ' red', '.', '</', 'think', '><', 'answer', '>B', '</' ...
    assert pick("fact", 0) == " red"
    assert pick("answer", 0) == ">B"
    assert pick("other", 0) == "<think>The shape is.</think><answer</answer><|im_end|>"
    assert not classes["fact"][1].any() and not classes["answer"][1].any()
    total = sum(c.long() for c in classes.values())  # [2, T]: each completion token in exactly one class
    assert torch.equal(total, mask.long())


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tokenizer, seed_bench_root):
    torch.manual_seed(0)
    model = models.load_model(tiny_model_dir, "sdpa")
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(tiny_model_dir, **SMALL_BUDGET)
    return model, samples[:2], budget


def check_consistent(res):
    classes = res["classes"]
    assert sum(c["tokens"] for c in classes.values()) == res["tokens"]
    if res["grad_norm"] > 0:
        assert sum(c["share"] for c in classes.values()) == pytest.approx(1.0)
        # the class gradients add up to the full one: sum_c |g_c| cos(g, g_c) = |g|
        assert sum(c["grad_norm"] * c["cos"] for c in classes.values() if c["grad_norm"] > 0) == \
            pytest.approx(res["grad_norm"], rel=1e-4)


def test_gradient_share_of_chosen_completions(setup, tokenizer):
    model, samples, budget = setup

    def right(s):  # reward 2
        return f"<think>The shape is red.</think><answer>{s.solution}</answer>"

    def wrong(s):  # reward 1: formatted, wrong letter
        return f"<think>The shape is blue.</think><answer>{'B' if s.solution == 'A' else 'A'}</answer>"

    # prompt 0: rewards 2, 1, 0, 2 (a learning signal); prompt 1: four equal completions (none)
    texts = [right(samples[0]), wrong(samples[0]), "no tags", right(samples[0])] + [right(samples[1])] * 4
    prompts = diagnose.encode_prompts(samples, tokenizer, budget)
    roll = diagnose.rollout_from_texts(prompts, tokenizer, texts, 4)
    res = diagnose.gradient_share_of(model, tokenizer, roll, samples)
    check_consistent(res)
    assert res["zero_advantage_rate"] == 0.5
    assert res["reward_mean"] == pytest.approx((5 + 8) / 8)
    # one " red" / " blue" token and one ">X" token in each of the 7 formatted completions
    assert res["classes"]["fact"]["tokens"] == 7 and res["classes"]["answer"]["tokens"] == 7
    assert all(c["grad_norm"] > 0 and -1 <= c["cos"] <= 1 for c in res["classes"].values())


def test_gradient_share_samples_with_the_project_code(setup, tokenizer):
    model, samples, budget = setup
    res = diagnose.gradient_share(model, tokenizer, samples, budget, num_generations=4, max_new_tokens=8, seed=0)
    check_consistent(res)
    assert res["prompts"] == 2 and res["generations"] == 4 and 0 < res["tokens"] <= 2 * 4 * 8
    assert 0 <= res["zero_advantage_rate"] <= 1 and math.isfinite(res["reward_mean"])


def test_next_token_probs_are_the_models_own(setup, tokenizer):
    """The probability of ">A" after "...<answer" (one merged token) is the model's softmax at
    the last position of prompt + prefix."""
    model, samples, budget = setup
    prompt = encoding.encode_prompt(samples[0], tokenizer, budget)
    got = diagnose.next_token_probs(model, tokenizer, prompt, "<think>The shape is red.</think><answer",
                                    [">" + x for x in "ABCD"])
    prefix = tokenizer("<think>The shape is red.</think><answer", add_special_tokens=False)["input_ids"]
    batch = encoding.collate_prompts([prompt], tokenizer)
    batch.pop("sample_ids")
    n = len(prefix)
    batch = {**batch, "input_ids": torch.cat([batch["input_ids"], torch.tensor([prefix])], 1),
             "attention_mask": torch.cat([batch["attention_mask"], torch.ones(1, n, dtype=torch.long)], 1),
             "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], 1)}
    with torch.no_grad():
        probs = model(**batch).logits[0, -1].softmax(-1)
    for x in "ABCD":
        assert got[">" + x] == pytest.approx(probs[tokenizer.convert_tokens_to_ids(">" + x)].item())


def test_link_reads_a_model_whose_letter_ignores_the_reasoning(setup, tokenizer, monkeypatch):
    """A stub model whose letter is always A and whose stated colour is always red: the letter
    follows the fact only when the fact is red (1 of 4), its distribution never moves, and the
    fact is the truth exactly for the red clips."""
    model, samples, budget = setup

    def fake(model_, tokenizer_, prompt, prefix, candidates):
        return {c: (1.0 if c in (" red", ">A") else 0.0) for c in candidates}
    monkeypatch.setattr(diagnose, "next_token_probs", fake)
    question = "What colour is the moving shape?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"
    picked = [data.Sample(**{**samples[0].__dict__, "question": question})] * 4
    res = diagnose.link(model, tokenizer, picked, ["red", "red", "blue", "green"], budget)
    assert res == {"n": 4, "fact_is_true": 0.5, "letter_follows_fact": 0.25, "letter_spread": 0.0, "letter_mass": 1.0}


def test_link_reads_the_text_only_prompt_without_visuals(setup, tokenizer, monkeypatch):
    """reference_input="text": every prompt link reads is the prompt's text alone (no visual
    token, no pixels), the same ids encoding.without_visuals gives the reference; "full" keeps
    the clip. The letter mass is the four letters' summed probability (0.1 + 0.2 here)."""
    model, samples, budget = setup
    seen = []

    def fake(model_, tokenizer_, prompt, prefix, candidates):
        seen.append(prompt)
        return {c: {">A": 0.1, ">B": 0.2}.get(c, 0.0) for c in candidates}
    monkeypatch.setattr(diagnose, "next_token_probs", fake)
    question = "What colour is the moving shape?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"
    picked = [data.Sample(**{**samples[0].__dict__, "question": question})]
    marks = {encoding._token_id(tokenizer, t) for t in encoding.VISION_MARKS}
    full = encoding.encode_prompt(picked[0], tokenizer, budget)
    text = encoding.without_visuals(encoding.collate_prompts([full], tokenizer), tokenizer)
    res = diagnose.link(model, tokenizer, picked, ["red"], budget, reference_input="text")
    assert res["letter_mass"] == pytest.approx(0.3)
    assert len(seen) == 5 and all(not (set(p["input_ids"].tolist()) & marks) for p in seen)
    assert all(not any(k in p for k in encoding.VISUAL_KEYS) for p in seen)
    assert all(p["input_ids"].tolist() == text["input_ids"][0].tolist() for p in seen)
    seen.clear()
    diagnose.link(model, tokenizer, picked, ["red"], budget)
    assert all(set(p["input_ids"].tolist()) & marks for p in seen)


def test_routes_separates_right_answers_by_where_they_come_from():
    """Step 1: a blue clip answered through "blue" (right, reasoning true) and a lucky "green, so
    C" (right elsewhere); step 2: "green, so C" again and a wrong "green, so B"."""
    rows = [{"step": 1, "sample_id": "b", "accuracy": 1.0, "completion": "<think>The shape is blue.</think><answer>C</answer>"},
            {"step": 1, "sample_id": "b", "accuracy": 1.0, "completion": "<think>The shape is green.</think><answer>C</answer>"},
            {"step": 2, "sample_id": "b", "accuracy": 1.0, "completion": "<think>The shape is green.</think><answer>C</answer>"},
            {"step": 2, "sample_id": "b", "accuracy": 0.0, "completion": "<think>The shape is green.</think><answer>B</answer>"}]
    res = diagnose.routes(rows, {"b": ("colour", "blue")}, window=1)
    assert res["first"] == {"blue": {"n": 2, "accuracy": 1.0, "states_truth": 0.5, "right_elsewhere": 0.5}}
    assert res["last"] == {"blue": {"n": 2, "accuracy": 0.5, "states_truth": 0.0, "right_elsewhere": 0.5}}


def test_bonus_split_by_consistency_and_mixed_groups():
    """Group (1, a) holds a consistent and an inconsistent right answer (mixed); group (1, b) one
    consistent right answer; wrong answers and answers without ref_conf are left out."""
    q = "What colour is the moving shape?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"

    def row(sid, reasoning, letter, acc, p, bonus):
        return {"step": 1, "sample_id": sid, "accuracy": acc, "ref_conf": p, "bonus": bonus,
                "completion": f"<think>The shape is {reasoning}.</think><answer>{letter}</answer>"}
    rows = [row("a", "blue", "C", 1.0, 0.9, 0.5), row("a", "green", "C", 1.0, 0.3, 0.0),
            row("a", "green", "B", 0.0, 0.8, 0.0), row("b", "blue", "C", 1.0, 0.7, 0.5),
            row("b", "red", "C", 1.0, None, 0.0)]
    (w,) = diagnose.bonus_split(rows, {"a": q, "b": q}, [(1, 1)])
    assert w["consistent"] == {"n": 2, "ref_conf": pytest.approx(0.8), "bonus_rate": 1.0}
    assert w["inconsistent"] == {"n": 1, "ref_conf": 0.3, "bonus_rate": 0.0}
    assert w["mixed consistent"] == {"n": 1, "ref_conf": 0.9, "bonus_rate": 1.0}
    assert w["mixed inconsistent"] == {"n": 1, "ref_conf": 0.3, "bonus_rate": 0.0}
