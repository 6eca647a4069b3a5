"""Rewards against hand-computed values: format rule, answer extraction, every problem type."""

import pytest

from rewards import (PROBLEM_TYPES, accuracy_reward, extract_answer, format_reward, score,
                     word_error_rate)


def wrap(answer, think="let me look at the video"):
    return f"<think>{think}</think><answer>{answer}</answer>"

# -----------------------------------------------------------------------------
# format


@pytest.mark.parametrize("completion", [
    "<think>a</think><answer>B</answer>",
    "<think>first\nsecond\n\nthird</think><answer>B</answer>",  # newlines inside think
    "<think>a</think> \n\t <answer>B</answer>",  # whitespace between the tags
    "  \n<think>a</think><answer>B</answer>\n  ",  # surrounding whitespace
    "<think>a</think><answer>line one\nline two</answer>",
])
def test_format_valid(completion):
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize("completion", [
    "<answer>B</answer>",  # missing think
    "<think>a</think><answer>B</answer> done",  # text after </answer>
    "<answer>B</answer><think>a</think>",  # answer before think
    "Sure! <think>a</think><answer>B</answer>",  # text before <think>
    "<think>a</think> so <answer>B</answer>",  # text between the tags
    "<think>a</think><answer>B",  # unclosed answer
    "",
    None,
])
def test_format_invalid(completion):
    assert format_reward(completion) == 0.0

# -----------------------------------------------------------------------------
# extraction


def test_extract_last_answer_wins():
    text = "<think>maybe <answer>A</answer>? no.</think><answer>\n C \n</answer>"
    assert extract_answer(text) == "C"


def test_extract_none():
    assert extract_answer("<think>x</think> C") is None
    assert extract_answer("<answer>C") is None
    assert extract_answer(None) is None
    assert extract_answer("<answer></answer>") == ""


def test_solution_wrapped_in_answer_tags():
    assert accuracy_reward(wrap("B"), "<answer>B</answer>", "multiple choice") == 1.0
    assert accuracy_reward(wrap("B"), "<answer> C </answer>", "multiple choice") == 0.0
    assert accuracy_reward(wrap("12"), "<answer>12</answer>", "numerical") == 1.0
    assert accuracy_reward(wrap("8"), "<answer>10</answer>", "regression") == pytest.approx(0.8)

# -----------------------------------------------------------------------------
# accuracy per problem type


@pytest.mark.parametrize("pred,expected", [
    ("A", 1.0), (" A ", 1.0), ("A.", 1.0), ("\nA .\n", 1.0),
    ("B", 0.0), ("a", 0.0), ("A. apple", 0.0), ("(A)", 0.0), (".", 0.0),
])
def test_multiple_choice(pred, expected):
    assert accuracy_reward(wrap(pred), "A", "multiple choice") == expected


@pytest.mark.parametrize("pred,gt,expected", [
    ("3.14", "3.14", 1.0),
    ("3.141", "3.14", 1.0),  # equal after rounding to 2 decimals
    ("3.15", "3.14", 0.0),
    ("7", "7.0", 1.0),
    ("1,234", "1234", 1.0),  # thousands separator
    (" 12 ", "12", 1.0),
    ("twelve", "12", 0.0),
    ("12 apples", "12", 0.0),
])
def test_numerical(pred, gt, expected):
    assert accuracy_reward(wrap(pred), gt, "numerical") == expected


def test_word_error_rate():
    assert word_error_rate("a b c d", "a b c d") == 0.0
    assert word_error_rate("a b c d", "a x c d") == pytest.approx(1 / 4)  # substitution
    assert word_error_rate("a b c", "a c") == pytest.approx(1 / 3)  # deletion
    assert word_error_rate("a b c", "a x b c d") == pytest.approx(2 / 3)  # two insertions
    assert word_error_rate("a b c", "") == 1.0
    assert word_error_rate("a", "x y z") == 3.0
    assert word_error_rate("", "x y") == 2.0  # empty reference counts as 1 word


@pytest.mark.parametrize("pred,expected", [
    ("the quick brown fox", 1.0),
    ("the  quick\nbrown fox", 1.0),  # split on any whitespace
    ("the quick brown dog", 0.75),  # 1 of 4 words wrong
    ("the quick fox", 0.75),  # 1 of 4 words missing
    ("quick brown", 0.5),
    ("a b c d e f g h i", 0.0),  # WER > 1 is clipped to 0
])
def test_ocr(pred, expected):
    assert accuracy_reward(wrap(pred), "the quick brown fox", "OCR") == pytest.approx(expected)


def test_free_form():
    gt = "the cat sat on the mat"
    assert accuracy_reward(wrap(gt), gt, "free-form") == pytest.approx(1.0)
    # pred tokens: the cat sat (3); gt has 6 unigrams and 5 bigrams; precision is always 1.
    # ROUGE-1: overlap 3, R = 1/2, F = 2/3. ROUGE-2: overlap 2, R = 2/5, F = 4/7.
    # ROUGE-L: LCS 3, R = 1/2, F = 2/3. Mean = (2/3 + 4/7 + 2/3) / 3 = 40/63.
    assert accuracy_reward(wrap("the cat sat"), gt, "free-form") == pytest.approx(40 / 63)
    assert accuracy_reward(wrap("dogs bark loudly"), gt, "free-form") == 0.0


@pytest.mark.parametrize("pred,gt,expected", [
    ("10", "10", 1.0),
    ("8", "10", 0.8),
    ("12", "10", 0.8),
    ("25", "10", 0.0),  # relative error 1.5, clipped
    ("-5", "-10", 0.5),
    ("0", "0", 1.0),  # gt 0: absolute error instead
    ("0.25", "0", 0.75),
    ("1", "0", 0.0),
    ("-3", "0", 0.0),
])
def test_regression(pred, gt, expected):
    assert accuracy_reward(wrap(pred), gt, "regression") == pytest.approx(expected)


def test_accuracy_ignores_format():
    # accuracy only looks at the answer tag; format is scored separately
    assert accuracy_reward("blah <answer>A</answer> blah", "A", "multiple choice") == 1.0

# -----------------------------------------------------------------------------
# garbage in, zero out; bad problem types raise


GARBAGE = [
    None, "", "   ", "no tags at all", "<answer></answer>", "<answer>   </answer>",
    "<answer><answer>A</answer></answer>", "<answer>A", "</answer>A<answer>",
    "<answer>\u2603\u00e9\u200b\U0001f600</answer>", "<answer>\x00\x01</answer>",
    "<answer>nan</answer>", "<answer>NaN</answer>", "<answer>inf</answer>",
    "<answer>-Infinity</answer>", "<answer>1e400</answer>", "<answer>" + "9" * 5000 + "</answer>",
    "<answer>1,2,,3..4</answer>", "<answer>" + "<think>" * 1000 + "</answer>",
]


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
@pytest.mark.parametrize("completion", GARBAGE)
def test_garbage_scores_zero(completion, problem_type):
    gt = {"multiple choice": "A", "numerical": "3", "OCR": "hello world",
          "free-form": "dogs bark loudly", "regression": "3"}[problem_type]
    assert accuracy_reward(completion, gt, problem_type) == 0.0
    assert accuracy_reward(completion, f"<answer>{gt}</answer>", problem_type) == 0.0


@pytest.mark.parametrize("problem_type", ["numerical", "regression"])
def test_huge_finite_numbers_do_not_raise(problem_type):
    # far off the truth, finite, and big enough that pred - gt overflows to inf
    assert accuracy_reward(wrap("1e308"), "-1e308", problem_type) == 0.0
    assert accuracy_reward(wrap("1e308"), "3", problem_type) == 0.0


@pytest.mark.parametrize("problem_type", ["numerical", "regression"])
@pytest.mark.parametrize("x", ["inf", "-inf", "nan", "1e400"])
def test_non_finite_never_matches(x, problem_type):
    # inf == inf would otherwise be a "correct" answer
    assert accuracy_reward(wrap(x), x, problem_type) == 0.0


def test_empty_answer_scores_zero_even_against_empty_gt():
    assert accuracy_reward(wrap(""), "", "OCR") == 0.0
    assert accuracy_reward(wrap(""), "<answer></answer>", "free-form") == 0.0


@pytest.mark.parametrize("problem_type", ["multiple-choice", "ocr", "", None, "numeric"])
def test_unknown_problem_type_raises(problem_type):
    with pytest.raises(ValueError) as e:
        accuracy_reward(wrap("A"), "A", problem_type)
    assert repr(problem_type) in str(e.value)
    for known in PROBLEM_TYPES:
        assert known in str(e.value)

# -----------------------------------------------------------------------------
# batch


def test_score_batch():
    completions = [
        wrap("B"),  # right, well formatted
        "<answer>B</answer>",  # right, no think
        wrap("3.15"),  # wrong, well formatted
        "garbage",
        wrap("the quick brown dog"),
    ]
    solutions = ["B", "<answer>B</answer>", "3.14", "1", "the quick brown fox"]
    types = ["multiple choice", "multiple choice", "numerical", "regression", "OCR"]
    acc, fmt = score(completions, solutions, types)
    assert acc == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.75])
    assert fmt == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        score([wrap("A")], ["A", "B"], ["multiple choice"])

# -----------------------------------------------------------------------------
# one answer everywhere: the last complete block, never reaching across tags


@pytest.mark.parametrize("text,answer", [
    ("<answer>C</think><answer>C</answer>", "C"),            # a stray tag before the real block
    ("<think>a</think><answer>B</answer><answer>A</answer>", "A"),   # the last block
    ("<answer>C</think></answer>", None),                    # malformed: a tag inside the answer
    ("<answer>C<think>x</answer>", None),
    ("<answer><answer>A</answer></answer>", None),           # the last block holds a </answer>
    ("<answer>A</answer> and <answer>B", "A"),               # an unclosed block is not a block
    ("<answer>\n B \n</answer>", "B"),
])
def test_the_answer_is_the_last_complete_block(text, answer):
    assert extract_answer(text) == answer


def test_one_answer_for_rewards_reference_judge_and_evaluation(tokenizer):
    """rewards, the reference's span, the judge and evaluation read the answer through
    rewards.answer_block: a malformed last block is no answer for any of them."""
    import judge
    import reference
    from rewards import answer_block, eval_score
    good, bad = "<think>x</think><answer>C</think><answer>B</answer>", "<think>x</think><answer>B</think></answer>"
    assert answer_block(good) == (len(good) - len("B</answer>"), len(good) - len("</answer>"))
    assert accuracy_reward(good, "B", "multiple choice") == 1.0 and accuracy_reward(bad, "B", "multiple choice") == 0.0
    span = reference.answer_char_span(good)
    assert good[span[0]:span[1]] == "B" and reference.answer_char_span(bad) is None
    ids = tokenizer(bad, add_special_tokens=False)["input_ids"]
    assert reference.answer_token_span(ids, tokenizer) is None
    assert judge.parse_verdict(good, ["A", "B"]) == "B" and judge.parse_verdict("<answer>B</think></answer>", ["B"]) is None
    assert eval_score(good, "B", "multiple choice") == 1.0 and eval_score(bad, "B", "multiple choice") == 0.0


@pytest.mark.parametrize("pred", ["3 4", "1 234", "3\t4"])
def test_spaces_inside_a_number_make_it_no_number(pred):
    assert accuracy_reward(wrap(pred), "34", "numerical") == 0.0
    assert accuracy_reward(wrap(pred), "34", "regression") == 0.0
    assert accuracy_reward(wrap(f" {pred[0]} "), pred[0], "numerical") == 1.0   # surrounding spaces are fine


@pytest.mark.parametrize("rules", ["official", "seed-bench-r1"])
@pytest.mark.parametrize("completion", GARBAGE)
def test_public_rules_never_raise_on_garbage(completion, rules):
    for ptype, gt in (("multiple choice", "A"), ("numerical", "3"), ("regression", "3"), ("OCR", "a b"),
                      ("free-form", "a b")):
        if rules == "seed-bench-r1" and ptype != "multiple choice":
            continue
        assert 0.0 <= accuracy_reward(completion, gt, ptype, rules=rules) <= 1.0
        from rewards import eval_score
        assert 0.0 <= eval_score(completion or "", gt, ptype, rules) <= 1.0


def test_seed_bench_r1_rules_refuse_other_problem_types():
    from rewards import check_rules_cover
    assert check_rules_cover("seed-bench-r1", {"multiple choice"}) is None
    problem = check_rules_cover("seed-bench-r1", {"multiple choice", "numerical"})
    assert "multiple choice only" in problem and "numerical" in problem
    assert check_rules_cover("official", set(PROBLEM_TYPES)) is None
