"""Rule-based rewards for GRPO-CARE.

The base reward of completion i is r_b[i] = acc[i] + fmt[i], both weighted 1:
- fmt: 1 iff the completion is exactly "<think>...</think> <answer>...</answer>".
- acc: how well the answer (the text inside the last complete <answer>...</answer> block)
  matches the ground truth, scored by problem type (option letter, number, OCR text,
  free-form text, regression value).

Everything the model writes is untrusted: garbage output scores 0 and never raises.
A problem type we don't know is a data bug, not a model bug, so that one does raise.

Three rule sets, named by --reward-rules (training) and evaluate.py --scoring:
- "ours" (the default), above; docs/algorithm.md#3-rewards-accuracy-and-format.
- "official": the public GRPO-CARE code's rules, its training reward and its evaluation
  scoring, which differ from each other (first answer block, exact letters, a decimal-point
  rule for numbers, OCR and free-form scored 0 in evaluation, ...).
- "seed-bench-r1": SEED-Bench-R1's reward and inference scoring, a first-letter match.
Each public rule is restated here in our own code and checked against the public functions'
recorded outputs (tests/fixtures/public/). docs/algorithm.md#12 lists every difference.
"""

import functools
import math
import re

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
RULES = ("ours", "official", "seed-bench-r1")

# DOTALL so reasoning and answers may span lines; only whitespace may sit between the tags.
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
OPEN, CLOSE = "<answer>", "</answer>"
TAGS = ("<think>", "</think>", OPEN, CLOSE)

# -----------------------------------------------------------------------------
# the answer: one definition for rewards, the reference's answer span, the judge and evaluation


def answer_block(text):
    """(start, end) character offsets of the inside of the LAST complete <answer>...</answer>
    block, or None. The block is the last "</answer>" and the last "<answer>" before it; if
    what lies between holds another format tag (as in "<answer>C</think></answer>"), the
    answer is malformed and there is none: an answer never reaches across tags. Last wins
    because models often quote the tag while reasoning, before the real answer."""
    if not isinstance(text, str):
        return None
    end = text.rfind(CLOSE)
    start = text.rfind(OPEN, 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    start += len(OPEN)
    return None if any(tag in text[start:end] for tag in TAGS) else (start, end)


def extract_answer(text: str) -> str | None:
    """The stripped answer (answer_block), "" for an empty one, None if there is none."""
    block = answer_block(text)
    return None if block is None else text[block[0]:block[1]].strip()


def format_reward(completion: str) -> float:
    """1.0 iff the whole completion (special tokens already removed, surrounding whitespace
    stripped) is think-then-answer."""
    if not isinstance(completion, str):
        return 0.0
    return 1.0 if FORMAT_RE.fullmatch(completion.strip()) else 0.0


def ground_truth(solution: str) -> str:
    """Video-R1 stores solutions as "<answer>A</answer>"; others store the bare "A"."""
    inner = extract_answer(solution)
    return inner if inner is not None else str(solution).strip()

# -----------------------------------------------------------------------------
# per-type comparisons; each gets two non-empty strings and returns a score in [0, 1]


def parse_number(text: str) -> float | None:
    """A number, with "," thousands separators dropped ("1,234" is 1234, and a European "3,14"
    is 314: we accept that rather than guess the locale). Spaces inside are not dropped: "3 4"
    is not 34. nan/inf and overflow -> None."""
    try:
        x = float(text.strip().replace(",", ""))
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
# the public GRPO-CARE code's rules ("official"). Its training reward and its evaluation
# scoring share the answer extraction and the multiple-choice and numerical rules.

FIRST_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def first_answer(text):
    """The public code's answer: the FIRST <answer>...</answer> (reaching across other tags),
    stripped; "" when there is none."""
    m = FIRST_ANSWER_RE.search(text)
    return m.group(1).strip() if m else ""


def public_number(text):
    """float() after dropping every ","; None where float() refuses (so "1_000" and " 3 " are
    numbers, "3 4" is not)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def official_numerical(pred, gt, finite_only):
    # The answer and the solution must both have a decimal mark ("." or ",") or both lack one:
    # "3.0" does not match "3", nor "1,234" match "1234".
    if ("." in gt or "," in gt) != ("." in pred or "," in pred):
        return 0.0
    p, g = public_number(pred), public_number(gt)
    if p is None or g is None or (finite_only and not math.isfinite(p)):
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


def official_regression(pred, gt):
    # (|p - g| + 1e-9) / (|g| + 1e-9): an exact answer scores 1 - 1e-9/|g|, and 0 where g = 0.
    p, g = public_number(pred), public_number(gt)
    if p is None or g is None or not math.isfinite(p):
        return 0.0
    return 1.0 - min(1.0, max(0.0, (abs(p - g) + 1e-9) / (abs(g) + 1e-9)))


def official_accuracy(completion, gt, problem_type):
    """The public training reward of GRPO-CARE (gt: the bare solution)."""
    pred = first_answer(completion)
    if problem_type == "multiple choice":
        return 1.0 if pred == gt.strip() else 0.0
    if problem_type == "numerical":
        return official_numerical(pred, gt, finite_only=True)
    if problem_type == "OCR":
        return min(1.0, max(0.0, 1.0 - word_error_rate(gt, pred)))
    if problem_type == "free-form":
        return min(1.0, max(0.0, free_form_score(pred, gt)))
    return official_regression(pred, gt)


def official_mra(pred, gt):
    """The public evaluation's mean relative accuracy, in float32 as it computes it: the error
    relative to |gt| + 1e-8 against the float32 thresholds 0.50, ..., 0.95 (so an error of
    exactly 10% passes 0.90, which float64 would not)."""
    import torch
    p, g = public_number(pred), public_number(gt)
    if p is None or g is None:
        return 0.0
    p, g = torch.tensor(p, dtype=torch.float32), torch.tensor(g, dtype=torch.float32)
    error = (p - g).abs() / (g.abs() + 1e-8)
    thresholds = torch.arange(0.5, 0.95 + 0.025, 0.05, dtype=torch.float32)
    return (error < 1 - thresholds).float().mean().item()


def official_eval_score(completion, gt, problem_type):
    """The public evaluation scoring of GRPO-CARE: the first answer block, or the whole output
    when there is none (or it is empty); OCR and free-form answers score 0."""
    pred = first_answer(completion) or completion
    if problem_type == "multiple choice":
        return 1.0 if pred.strip() == gt.strip() else 0.0
    if problem_type == "numerical":
        return official_numerical(pred, gt, finite_only=False)
    if problem_type == "regression":
        return official_mra(pred, gt)
    return 0.0

# -----------------------------------------------------------------------------
# SEED-Bench-R1's rules ("seed-bench-r1"): its training reward and its inference scoring are
# the same function. It first asks math_verify whether the completion and the solution
# "<answer>B.</answer>" are equal; math_verify parses no option letter, so that never holds for
# a multiple-choice solution (checked for every letter) and only the letter match below decides.
# It trains on multiple choice alone; other types are refused (check_rules_cover).

SBR1_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def seed_bench_r1_accuracy(completion, gt):
    """1 iff the first <answer> block's first character is the solution's first character:
    "B) text", "BB" and "Because..." all match "B"; no block or an empty one scores 0."""
    m = SBR1_ANSWER_RE.search(completion)
    pred = m.group(1).strip() if m else ""
    return 1.0 if pred and gt.strip() and pred[0] == gt.strip()[0] else 0.0


def check_rules_cover(rules, problem_types):
    """A one-line reason why `rules` cannot score these problem types, or None."""
    if rules not in RULES:
        return f"unknown rules {rules!r}; known: {', '.join(RULES)}"
    other = sorted(set(problem_types) - {"multiple choice"})
    if rules == "seed-bench-r1" and other:
        return (f"the seed-bench-r1 rules score multiple choice only (SEED-Bench-R1 trains on nothing else, "
                f"and its math_verify step would decide other types); the data has {', '.join(other)}")
    return None

# -----------------------------------------------------------------------------
# public entry points


def accuracy_reward(completion: str, solution: str, problem_type: str, scorers=SCORERS, rules="ours") -> float:
    """Score the answer of `completion` against `solution`, in [0, 1], by `rules` (scorers:
    EVAL_SCORERS for evaluation under our rules)."""
    if problem_type not in scorers:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")
    if not isinstance(completion, str):
        return 0.0
    gt = ground_truth(solution)
    if rules == "official":
        return official_accuracy(completion, gt, problem_type)
    if rules == "seed-bench-r1":
        return seed_bench_r1_accuracy(completion, gt)
    return compare(extract_answer(completion), gt, problem_type, scorers)


def compare(pred, gt, problem_type, scorers=SCORERS):
    """Our score of the answer pred (None: there is none) against the bare ground truth gt. A
    missing or empty answer scores 0 for every type, even against an empty ground truth:
    otherwise "<answer></answer>" would be a free reward."""
    if not pred or not gt:
        return 0.0
    return float(scorers[problem_type](pred, gt))


def format_score(completion: str, rules="ours") -> float:
    """The format reward by `rules`: ours strips surrounding whitespace first; the public
    GRPO-CARE code matches the completion as it is (a trailing newline fails); SEED-Bench-R1
    matches only its start (text after </answer> passes)."""
    if not isinstance(completion, str):
        return 0.0
    if rules == "official":
        return 1.0 if FORMAT_RE.fullmatch(completion) else 0.0
    if rules == "seed-bench-r1":
        return 1.0 if FORMAT_RE.match(completion) else 0.0
    return format_reward(completion)


def eval_score(completion: str, solution: str, problem_type: str, rules="ours") -> float:
    """One evaluation score by `rules`. Ours, like the public evaluation, compares a completion
    with no <answer> block as a whole (so a bare "B" counts) and scores regression by mean
    relative accuracy."""
    if problem_type not in EVAL_SCORERS:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")
    if rules == "official":
        return official_eval_score(completion, ground_truth(solution), problem_type)
    if rules == "seed-bench-r1":
        return seed_bench_r1_accuracy(completion, ground_truth(solution))
    if not isinstance(completion, str):
        return 0.0
    pred = extract_answer(completion)
    return compare(completion.strip() if pred is None else pred, ground_truth(solution), problem_type, EVAL_SCORERS)


def score(completions: list[str], solutions: list[str], problem_types: list[str],
          rules="ours") -> tuple[list[float], list[float]]:
    """(acc, fmt) lists for a batch by `rules`; r_b[i] = acc[i] + fmt[i]."""
    # strict: a length mismatch means the batch was assembled wrongly, so fail loudly
    rows = list(zip(completions, solutions, problem_types, strict=True))
    acc = [accuracy_reward(c, s, t, rules=rules) for c, s, t in rows]
    fmt = [format_score(c, rules) for c, _, _ in rows]
    return acc, fmt
