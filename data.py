"""Data: SEED-Bench-R1 and Video-R1 annotation files read into Samples, every row checked.

A bad row is a DataError that names the file, the line and the sample, or, with skip_bad, a
counted skip. encoding.py turns a Sample into model inputs (prompt, video and image patches).

    samples, skipped = load_samples("annotations/training_6k.jsonl", root, skip_bad=True)
"""

import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass

from rewards import PROBLEM_TYPES, ground_truth, parse_number

# ---------------------------------------------------------------------------------------------
# Samples and annotation loading

@dataclass
class Sample:
    sample_id: str
    problem_type: str           # one of PROBLEM_TYPES
    question: str               # the question text as in the data, without options or instruction
    solution: str               # option letter for multiple choice, else the answer text
    options: list = dataclasses.field(default_factory=list)   # ["A. text", "B. text", ...]; [] if none
    video: str | None = None    # absolute paths
    image: str | None = None
    level: str | None = None    # "L1"/"L2"/"L3" (SEED-Bench-R1 validation), "train", None (Video-R1)
    domain: str | None = None
    source: str | None = None   # video_source / data_source
    reasoning: str | None = None  # chain of thought for supervised fine-tuning (sft.py), if the row has one


class DataError(ValueError):
    """A bad row, file or video. The message names the sample (or file:line), the file and the problem."""


def _read_rows(path):
    """[(where, row or DataError)] from a JSONL file or a JSON list. Bad lines become DataErrors in
    place so that the loaders can skip them one by one (skip_bad) or raise the first."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:   # a broken list cannot be split into rows: always fatal
            raise DataError(f"{path}: not valid JSON: {e}") from None
        return [(f"{path}:item {i}", row) for i, row in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{n}", DataError(f"{path}:{n}: not valid JSON: {e}")))
    return out


def _require(where, row, fields):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in fields if k not in row]
    if missing:
        sid = row.get("sample_id", row.get("problem_id"))
        raise DataError(f"{where}{f' (sample {sid})' if sid is not None else ''}: missing field(s) {missing}")


def _media(where, sid, kind, path, base, allow_outside_root):
    """The absolute path of a sample's video or image, which must exist and, unless
    allow_outside_root, resolve (os.path.realpath: after "..", symlinks) to a file under `base`:
    an annotation file should not be able to make training read files anywhere on the disk."""
    path = os.path.abspath(path)
    real, real_base = os.path.realpath(path), os.path.realpath(base)
    if not allow_outside_root and os.path.commonpath([real, real_base]) != real_base:
        raise DataError(f"{where} (sample {sid}): {kind} {path} resolves to {real}, outside {real_base}; "
                        f"--allow-outside-data-root allows it")
    if not os.path.isfile(path):
        raise DataError(f"{where} (sample {sid}): {kind} file not found: {path}")
    return path


def _text(where, sid, label, value):
    """`value`, which must be non-empty text: an empty question, answer or option would train
    (or score) on nothing."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} (sample {sid}): {label} must be non-empty text, got {value!r}")
    return value


def _distinct(where, sid, labelled):
    """[(label, option text)]: each text non-empty and no two alike (whitespace aside), or the
    question would have two right answers or a right answer scored as wrong."""
    seen = {}
    for label, text in labelled:
        key = _text(where, sid, label, text).strip()
        if key in seen:
            raise DataError(f"{where} (sample {sid}): {seen[key]} and {label} are the same option {key!r}")
        seen[key] = label


def with_options(question, options):
    """`question` + "Options:\\nA. ...\\nB. ...\\n" (the question alone when there are no
    options): how the judge and the diagnostics show a question. The prompt's own layout is
    encoding.PromptTemplate's."""
    if not options:
        return question
    if not question.endswith("\n"):
        question += "\n"
    return question + "Options:\n" + "".join(o + "\n" for o in options)


THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _reasoning(where, sid, field, value):
    """A row's chain of thought: None when it has none (no field, null or blank). Text already
    in the answer template ("<think>...</think><answer>...</answer>", as SFT files often store
    the whole reply) gives what is inside its <think>; its <answer> is dropped, because the
    sample's own solution (and option letters) are the answer trained on."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise DataError(f"{where} (sample {sid}): {field} (the reasoning) must be text, got {type(value).__name__}")
    m = THINK_RE.search(value)
    return (m.group(1) if m else value).strip() or None


def _load(rows, make_sample, skip_bad, reasoning_field=None):
    """Samples from rows (make_sample(where, row) -> Sample), with each row's reasoning_field
    as the sample's reasoning when given."""
    samples, skipped = [], []
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            sample = make_sample(where, row)
            if reasoning_field:
                sample.reasoning = _reasoning(where, sample.sample_id, reasoning_field, row.get(reasoning_field))
            samples.append(sample)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    return samples, skipped


def _training_options(where, sid, answer, negatives, rng):
    """The official training task: the right answer and 3 of the row's wrong answers, drawn and
    shuffled with rng, so always 4 options A-D, as the answer line "(A, B, C, D)" and the
    validation levels have. Listing all of a real row's ~7 negatives would train on a harder
    task than the one evaluated. Returns (options, solution letter)."""
    if not isinstance(negatives, list):
        raise DataError(f"{where} (sample {sid}): negative_answers must be a list, got {type(negatives).__name__}")
    negatives = [_text(where, sid, f"negative_answers[{i}]", n).strip() for i, n in enumerate(negatives)]
    answer = answer.strip()
    if answer in negatives:
        raise DataError(f"{where} (sample {sid}): the answer {answer!r} is also among the negative_answers")
    pool = list(dict.fromkeys(negatives))   # distinct, in file order, so a seed draws the same
    if len(pool) < 3:
        raise DataError(f"{where} (sample {sid}): needs at least 3 distinct negative_answers, got {len(pool)}")
    options = [answer] + rng.sample(pool, 3)
    rng.shuffle(options)
    return options, "ABCD"[options.index(answer)]


def _seed_bench_sample(where, row, root, seed, level, allow_outside_root):
    _require(where, row, ["sample_id", "question", "answer", "task_progress_metadata",
                          "video_source", "current_observation_basename"])
    sid = str(row["sample_id"])
    question = _text(where, sid, "question", row["question"])
    answer = _text(where, sid, "answer", row["answer"])
    if "negative_answers" in row:   # training row
        # Seeded by the sample id, not by file position, so reordering or filtering the file
        # never changes a sample's options or letters.
        options, solution = _training_options(where, sid, answer, row["negative_answers"],
                                              random.Random(f"{seed}-{sid}"))
    elif all(f"choice_{k}" in row for k in "abcd") and "golden_choice_idx" in row:
        options = [row[f"choice_{k}"] for k in "abcd"]
        _distinct(where, sid, [(f"choice_{k}", o) for k, o in zip("abcd", options)])
        solution = str(row["golden_choice_idx"]).strip()
        if solution not in ("A", "B", "C", "D"):
            raise DataError(f"{where} (sample {sid}): golden_choice_idx must be A-D, got {solution!r}")
        golden = options["ABCD".index(solution)]
        if answer.strip() != golden.strip():   # which one is right? The row does not say.
            raise DataError(f"{where} (sample {sid}): the answer {answer!r} is not choice_{solution.lower()} "
                            f"{golden!r}, which golden_choice_idx {solution} names")
    else:
        raise DataError(f"{where} (sample {sid}): neither negative_answers (train) nor "
                        f"choice_a..d + golden_choice_idx (validation)")
    lettered = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
    # Media live in the layout's videos/ and images/ folders: a video_source like "../x" leaves
    # them, even where it stays under the root.
    source = _text(where, sid, "video_source", row["video_source"])
    video = None
    if row["task_progress_metadata"]:   # empty metadata: the task has no progress video yet
        _require(where, row, ["video_basename"])
        videos = os.path.join(root, "videos")
        video = _media(where, sid, "video",
                       os.path.join(videos, source, _text(where, sid, "video_basename", row["video_basename"])),
                       videos, allow_outside_root)
    images = os.path.join(root, "images")
    observation = _text(where, sid, "current_observation_basename", row["current_observation_basename"])
    image = _media(where, sid, "image", os.path.join(images, source, observation), images, allow_outside_root)
    return Sample(sample_id=sid, problem_type="multiple choice", question=question, options=lettered,
                  solution=solution, video=video, image=image, level=level, domain=row.get("domain"),
                  source=row["video_source"])


def load_seed_bench_r1(annotation_file, root, seed=0, skip_bad=False, allow_outside_root=False, reasoning_field=None):
    m = re.search(r"validation_(L[123])", os.path.basename(annotation_file))
    level = m.group(1) if m else "train"
    return _load(_read_rows(annotation_file),
                 lambda where, row: _seed_bench_sample(where, row, root, seed, level, allow_outside_root), skip_bad,
                 reasoning_field)


LETTERED_OPTION_RE = re.compile(r"([A-Z])\.(\s.*|)", re.DOTALL)   # "A. text"; "A." alone is an empty option


def _option_letters(where, sid, options):
    """The letters of a Video-R1 row's options, which come lettered ("A. text"). They must run
    A, B, C... in order, because the solution, the answer line and evaluate.py name options by
    these letters, and their texts must be distinct."""
    if not isinstance(options, list) or not options:
        raise DataError(f"{where} (sample {sid}): multiple choice row without options")
    letters, texts = [chr(ord("A") + i) for i in range(len(options))], []
    for letter, option in zip(letters, options):
        m = LETTERED_OPTION_RE.fullmatch(option) if isinstance(option, str) else None
        if not m or m.group(1) != letter:
            raise DataError(f"{where} (sample {sid}): option {option!r} does not look like '{letter}. text'")
        texts.append((f"option {letter}", m.group(2)))
    _distinct(where, sid, texts)
    return letters


def _video_r1_solution(where, sid, row):
    """The row's ground truth ("<answer>X</answer>" -> "X"; bare "X" as is), checked against its
    problem type: an option letter (upper-cased: "b" names option B) or a number where the
    reward parses one, so a bad row fails here and not as a silent zero reward."""
    solution = ground_truth(str(row["solution"]))
    ptype = row["problem_type"]
    if not solution:
        raise DataError(f"{where} (sample {sid}): empty solution {row['solution']!r}")
    if ptype == "multiple choice":
        letters = _option_letters(where, sid, row.get("options"))
        if solution.upper() not in letters:
            raise DataError(f"{where} (sample {sid}): solution {solution!r} is not one of the option letters "
                            f"{', '.join(letters)}")
        return solution.upper()
    if ptype in ("numerical", "regression") and parse_number(solution) is None:
        raise DataError(f"{where} (sample {sid}): {ptype} solution {solution!r} is not a number")
    return solution


def _video_r1_sample(where, row, root, allow_outside_root):
    _require(where, row, ["problem_id", "problem", "data_type", "problem_type", "solution", "path"])
    sid = str(row["problem_id"])
    ptype, dtype = row["problem_type"], row["data_type"]
    if ptype not in PROBLEM_TYPES:
        raise DataError(f"{where} (sample {sid}): unknown problem_type {ptype!r}, expected one of {PROBLEM_TYPES}")
    if dtype not in ("image", "video"):
        raise DataError(f"{where} (sample {sid}): unknown data_type {dtype!r}, expected 'image' or 'video'")
    question = _text(where, sid, "problem (the question)", row["problem"])
    solution = _video_r1_solution(where, sid, row)
    options = list(row["options"]) if ptype == "multiple choice" else []   # already "A. ..."
    path = _media(where, sid, dtype, os.path.join(root, _text(where, sid, "path", row["path"])), root,
                  allow_outside_root)
    return Sample(sample_id=sid, problem_type=ptype, question=question, solution=solution, options=options,
                  video=path if dtype == "video" else None, image=path if dtype == "image" else None,
                  source=row.get("data_source"))


def load_video_r1(json_file, root, skip_bad=False, allow_outside_root=False, reasoning_field=None):
    return _load(_read_rows(json_file),
                 lambda where, row: _video_r1_sample(where, row, root, allow_outside_root), skip_bad, reasoning_field)


def load_samples(path, root, seed=0, skip_bad=False, allow_outside_root=False, reasoning_field=None):
    """Dispatch on the first good row: Video-R1 rows have problem_id, SEED-Bench-R1 rows sample_id.
    Media that resolve outside `root` are refused unless allow_outside_root. reasoning_field:
    the row field read into Sample.reasoning (sft.py), None for none."""
    first = next((row for _, row in _read_rows(path) if isinstance(row, dict)), None)
    kw = dict(skip_bad=skip_bad, allow_outside_root=allow_outside_root, reasoning_field=reasoning_field)
    if first is not None and "problem_id" in first:
        return load_video_r1(path, root, **kw)
    if first is not None and "sample_id" in first:
        return load_seed_bench_r1(path, root, seed=seed, **kw)
    raise DataError(f"{path}: cannot tell the format (no row with problem_id or sample_id)")
