"""Rule-based rewards for GRPO-CARE.

The base reward of completion i is r_b[i] = acc[i] + fmt[i], both weighted 1:
- fmt: 1 iff the completion is exactly "<think>...</think> <answer>...</answer>".
- acc: how well the text in the last <answer> tag matches the ground truth, scored by
  problem type (option letter, number, OCR text, free-form text, regression value).

Everything the model writes is untrusted: garbage output scores 0 and never raises.
A problem type we don't know is a data bug, not a model bug, so that one does raise.
Explained in docs/algorithm.md#3-rewards-accuracy-and-format.
"""

import functools
import math
import re

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")

# DOTALL so reasoning and answers may span lines; only whitespace may sit between the tags.
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# -----------------------------------------------------------------------------
# format and answer extraction


def format_reward(completion: str) -> float:
    """1.0 iff the whole completion (special tokens already removed) is think-then-answer."""
    if not isinstance(completion, str):
        return 0.0
    return 1.0 if FORMAT_RE.fullmatch(completion.strip()) else 0.0


def extract_answer(text: str) -> str | None:
    """The stripped text inside the LAST <answer>...</answer>, or None if there is none.
    Last wins because models often quote the tag while reasoning before the real answer."""
    if not isinstance(text, str):
        return None
    matches = ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def ground_truth(solution: str) -> str:
    """Video-R1 stores solutions as "<answer>A</answer>"; others store the bare "A"."""
    inner = extract_answer(solution)
    return inner if inner is not None else str(solution).strip()

# -----------------------------------------------------------------------------
# per-type comparisons; each gets two non-empty strings and returns a score in [0, 1]


def parse_number(text: str) -> float | None:
    """Spaces and "," thousands separators are dropped, so "1,234" is 1234 (and a European
    "3,14" is 314: we accept that rather than guess the locale). nan/inf and overflow -> None."""
    try:
        x = float(text.replace(" ", "").replace(",", ""))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def multiple_choice_score(pred, gt):
    # Only whitespace and one trailing "." are forgiven: "A." matches "A", but "A. apple" or
    # "a" do not. Rewarding letter-plus-text would need guessing where the letter ends.
    def norm(s):
        s = s.strip()
        return s[:-1].strip() if s.endswith(".") else s
    return 1.0 if norm(pred) and norm(pred) == norm(gt) else 0.0


def numerical_score(pred, gt):
    p, g = parse_number(pred), parse_number(gt)
    if p is None or g is None:
        return 0.0
    return 1.0 if round(p, 2) == round(g, 2) else 0.0


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / number of reference words (at least 1)."""
    ref, hyp = reference.split(), hypothesis.split()
    # prev[j] = edits to turn the first i-1 reference words into the first j hypothesis words
    prev = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        cur = [i] + [0] * len(hyp)
        for j in range(1, len(hyp) + 1):
            cur[j] = min(prev[j] + 1,  # deletion
                         cur[j - 1] + 1,  # insertion
                         prev[j - 1] + (ref[i - 1] != hyp[j - 1]))  # substitution / match
        prev = cur
    return prev[-1] / max(1, len(ref))


def ocr_score(pred, gt):
    # WER exceeds 1 when the prediction has many extra words, hence the clip.
    return min(1.0, max(0.0, 1.0 - word_error_rate(gt, pred)))


@functools.cache
def rouge():
    # Imported lazily: rouge_score pulls in nltk, which costs ~1s at import time.
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def free_form_score(pred, gt):
    scores = rouge().score(gt, pred)  # (target, prediction)
    return sum(s.fmeasure for s in scores.values()) / len(scores)


def regression_score(pred, gt):
    # Relative error, 1 - min(1, |p - g| / |g|). A relative error is undefined at g == 0, so
    # there we use the absolute error: predicting exactly 0 scores 1, being off by >= 1 scores 0.
    p, g = parse_number(pred), parse_number(gt)
    if p is None or g is None:
        return 0.0
    err = abs(p - g) / abs(g) if g != 0 else abs(p - g)
    return 1.0 - min(1.0, err)  # err may be inf when p - g overflows; min() handles it


def mean_relative_accuracy(pred, gt):
    """Evaluation metric for regression answers (VSI-Bench's): the share of the thresholds
    0.50, 0.55, ..., 0.95 at which the relative error |pred - gt| / |gt| is below 1 - threshold.
    A 7% error passes 9 of the 10 (not 0.95) and scores 0.9; 50% or more scores 0. At gt == 0
    the absolute error stands in, as in regression_score."""
    p, g = parse_number(pred), parse_number(gt)
    if p is None or g is None:
        return 0.0
    err = abs(p - g) / abs(g) if g != 0 else abs(p - g)
    # (100 - t) / 100 is the float nearest to 1 - t / 100 (1 - 0.95 is 0.050000000000000044)
    return sum(err < (100 - t) / 100 for t in range(50, 100, 5)) / 10


SCORERS = {
    "multiple choice": multiple_choice_score,
    "numerical": numerical_score,
    "OCR": ocr_score,
    "free-form": free_form_score,
    "regression": regression_score,
}
assert tuple(SCORERS) == PROBLEM_TYPES
# Evaluation scores regression answers by mean relative accuracy; training keeps the smooth
# 1 - relative error as its reward.
EVAL_SCORERS = {**SCORERS, "regression": mean_relative_accuracy}

# -----------------------------------------------------------------------------
# public entry points


def accuracy_reward(completion: str, solution: str, problem_type: str, scorers=SCORERS) -> float:
    """Score the last <answer> of `completion` against `solution`, in [0, 1] (scorers:
    EVAL_SCORERS for evaluation)."""
    if problem_type not in scorers:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")
    pred = extract_answer(completion)
    # A missing or empty answer scores 0 for every type, even against an empty ground truth:
    # otherwise "<answer></answer>" would be a free reward.
    if not pred:
        return 0.0
    gt = ground_truth(solution)
    if not gt:
        return 0.0
    return float(scorers[problem_type](pred, gt))


def score(completions: list[str], solutions: list[str],
          problem_types: list[str]) -> tuple[list[float], list[float]]:
    """(acc, fmt) lists for a batch; r_b[i] = acc[i] + fmt[i]."""
    # strict: a length mismatch means the batch was assembled wrongly, so fail loudly
    rows = list(zip(completions, solutions, problem_types, strict=True))
    acc = [accuracy_reward(c, s, t) for c, s, t in rows]
    fmt = [format_reward(c) for c, _, _ in rows]
    return acc, fmt
