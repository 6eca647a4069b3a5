"""Data: load SEED-Bench-R1 / Video-R1 annotations into Samples, build Qwen2.5-VL prompts, and turn
videos and images into the patch tensors the vision tower eats.

torchvision is not available, and transformers' Qwen2-VL video processor needs it, so all visual
preprocessing lives here, one code path for CPU and GPU. It reproduces the HF PIL image processor
(image_processing_pil_qwen2_vl) exactly: smart_resize, PIL bicubic resize on uint8, rescale in
float64 then cast to float32, normalise in float32, the same patch layout. tests/test_data.py checks
bit-equality against it.

    samples, skipped = load_samples("annotations/training_6k.jsonl", root, skip_bad=True)
    batch = collate_prompts([encode_prompt(s, tokenizer, budget) for s in samples[:4]], tokenizer)
"""

import json
import math
import os
import random
import re
from dataclasses import dataclass

import decord
import numpy as np
import torch
from PIL import Image

from rewards import PROBLEM_TYPES, ground_truth, parse_number

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


FRAME_ROUNDINGS = ("nearest", "floor")


@dataclass
class VisualBudget:
    fps: float = 2.0                    # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 16
    # How read_video turns fps into a frame count (see frame_count). "nearest" (ours): the
    # fps-based count rounded to the nearest multiple of temporal_patch_size, then clamped, so the
    # sampled fps stays as close as it can to the fps asked for. "floor" reproduces the public
    # code (qwen_vl_utils' smart_nframes): clamped first, then rounded down.
    frame_rounding: str = "nearest"
    # Seconds per temporal patch, the spacing of the temporal 3D-RoPE positions. 0 (ours): measured,
    # temporal_patch_size / the fps read_video really sampled, so positions follow the real frame
    # spacing. A positive value is used as is: 1.0 reproduces the public code, which never passes
    # the fps and so spaces every clip 1 s per temporal patch.
    second_per_grid: float = 0.0
    video_min_pixels: int = 4 * 28 * 28     # per frame, after resize
    video_max_pixels: int = 128 * 28 * 28
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    def __post_init__(self):
        # Checked here, not when the first video is read, so a bad setting fails before a run.
        if self.frame_rounding not in FRAME_ROUNDINGS:
            raise ValueError(f"frame_rounding must be one of {FRAME_ROUNDINGS}, got {self.frame_rounding!r}")
        if not self.second_per_grid >= 0:
            raise ValueError(f"second_per_grid must be 0 (measured) or positive, got {self.second_per_grid}")


def budget_from_checkpoint(model_dir, **overrides) -> VisualBudget:
    """Patch geometry and normalisation come from the checkpoint (they are baked into its vision
    tower); pixel and frame budgets stay ours (the training defaults), whatever min/max_pixels the
    checkpoint lists."""
    kw = {}
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
        kw = {k: int(cfg[k]) for k in ("patch_size", "merge_size", "temporal_patch_size") if k in cfg}
        kw.update({k: tuple(float(v) for v in cfg[k]) for k in ("image_mean", "image_std") if k in cfg})
    kw.update(overrides)
    return VisualBudget(**kw)


# ---------------------------------------------------------------------------------------------
# Samples and annotation loading

@dataclass
class Sample:
    sample_id: str
    problem_type: str           # one of PROBLEM_TYPES
    question: str               # question text incl. lettered options, no thinking instruction
    solution: str               # option letter for multiple choice, else the answer text
    video: str | None = None    # absolute paths
    image: str | None = None
    level: str | None = None    # "L1"/"L2"/"L3" (SEED-Bench-R1 validation), "train", None (Video-R1)
    domain: str | None = None
    source: str | None = None   # video_source / data_source


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
    """`question` + "Options:\\nA. ...\\nB. ...\\n": one layout for both datasets."""
    if not question.endswith("\n"):
        question += "\n"
    return question + "Options:\n" + "".join(o + "\n" for o in options)


def _load(rows, make_sample, skip_bad):
    samples, skipped = [], []
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            samples.append(make_sample(where, row))
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
    else:
        raise DataError(f"{where} (sample {sid}): neither negative_answers (train) nor "
                        f"choice_a..d + golden_choice_idx (validation)")
    lettered = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
    # Media live in the layout's videos/ and images/ folders: a video_source like "../x" leaves
    # them, even where it stays under the root.
    video = None
    if row["task_progress_metadata"]:   # empty metadata: the task has no progress video yet
        _require(where, row, ["video_basename"])
        videos = os.path.join(root, "videos")
        video = _media(where, sid, "video", os.path.join(videos, row["video_source"], row["video_basename"]),
                       videos, allow_outside_root)
    images = os.path.join(root, "images")
    image = _media(where, sid, "image", os.path.join(images, row["video_source"], row["current_observation_basename"]),
                   images, allow_outside_root)
    return Sample(sample_id=sid, problem_type="multiple choice", question=with_options(question, lettered),
                  solution=solution, video=video, image=image, level=level, domain=row.get("domain"),
                  source=row["video_source"])


def load_seed_bench_r1(annotation_file, root, seed=0, skip_bad=False, allow_outside_root=False):
    m = re.search(r"validation_(L[123])", os.path.basename(annotation_file))
    level = m.group(1) if m else "train"
    return _load(_read_rows(annotation_file),
                 lambda where, row: _seed_bench_sample(where, row, root, seed, level, allow_outside_root), skip_bad)


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
    if ptype == "multiple choice":
        question = with_options(question, row["options"])   # options are already "A. ..."
    path = _media(where, sid, dtype, os.path.join(root, row["path"]), root, allow_outside_root)
    return Sample(sample_id=sid, problem_type=ptype, question=question, solution=solution,
                  video=path if dtype == "video" else None, image=path if dtype == "image" else None,
                  source=row.get("data_source"))


def load_video_r1(json_file, root, skip_bad=False, allow_outside_root=False):
    return _load(_read_rows(json_file),
                 lambda where, row: _video_r1_sample(where, row, root, allow_outside_root), skip_bad)


def load_samples(path, root, seed=0, skip_bad=False, allow_outside_root=False):
    """Dispatch on the first good row: Video-R1 rows have problem_id, SEED-Bench-R1 rows sample_id.
    Media that resolve outside `root` are refused unless allow_outside_root."""
    first = next((row for _, row in _read_rows(path) if isinstance(row, dict)), None)
    if first is not None and "problem_id" in first:
        return load_video_r1(path, root, skip_bad=skip_bad, allow_outside_root=allow_outside_root)
    if first is not None and "sample_id" in first:
        return load_seed_bench_r1(path, root, seed=seed, skip_bad=skip_bad, allow_outside_root=allow_outside_root)
    raise DataError(f"{path}: cannot tell the format (no row with problem_id or sample_id)")


# ---------------------------------------------------------------------------------------------
# Prompts

# The one thinking instruction, asking for what the public GRPO-CARE prompt asks (in our words):
# an inner dialogue with hesitation and self-checks, self-verification, then both tag pairs.
THINKING = ("Think about this question the way a person would when pondering it deeply: reason it out as an "
            "inner dialogue, with natural thinking expressions such as 'let me think', 'wait', 'hmm', "
            "'oh, I see' or 'let me break it down'. Reflect on your reasoning and verify it before you settle. "
            "Put your reasoning inside <think> </think>, then your final answer inside <answer> </answer>.")
ANSWER_LINE = {
    "multiple choice": "Inside <answer> </answer> give only the single option letter (A, B, C, D).",
    "numerical": "Inside <answer> </answer> give only the number.",
    "OCR": "Inside <answer> </answer> give only the transcribed text.",
    "free-form": "Inside <answer> </answer> give only your text answer.",
}
ANSWER_LINE["regression"] = ANSWER_LINE["numerical"]
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"


def prompt_text(sample) -> str:
    question = sample.question if sample.question.endswith("\n") else sample.question + "\n"
    return f"{question}{THINKING}\n{ANSWER_LINE[sample.problem_type]}"


def chat_prompt(sample) -> str:
    """Qwen2.5-VL's chat template with the default system message; one placeholder per visual,
    video first. encode_prompt expands each placeholder to the visual's token count."""
    user = ""
    if sample.video:
        user += f"<|vision_start|>{VIDEO_PAD}<|vision_end|>"
    if sample.image:
        user += f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{user}{prompt_text(sample)}<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# Pixels: decode, resize, normalise, patchify

def frame_count(total, video_fps, budget):
    """How many frames read_video samples from a clip of `total` frames at `video_fps`: about
    budget.fps per second, within [min_frames, max_frames] and never more than the clip has, a
    multiple of temporal_patch_size and at least one temporal patch (a clip shorter than that
    repeats its last frame). Odd min/max_frames round inwards, so the budgets are hard limits."""
    tps = budget.temporal_patch_size
    wanted = total / video_fps * budget.fps
    lo = math.ceil(budget.min_frames / tps) * tps
    hi = min(budget.max_frames, total) // tps * tps
    if budget.frame_rounding == "floor":   # the public code: clamp, then round down
        return max(tps, math.floor(min(max(wanted, lo), hi, total) / tps) * tps)
    return min(max(round(wanted / tps) * tps, lo, tps), max(tps, hi))   # round, then clamp


def _undecodable(sample_id, path, e):
    # decord raises bare RuntimeErrors/DECORDErrors for broken files
    return DataError(f"sample {sample_id}: cannot decode video {path}: {type(e).__name__}: {e}")


def read_video(path, budget, sample_id="?"):
    """Uniformly sample frame_count frames, first and last included. Returns (uint8 [T,H,W,3],
    the fps actually sampled), T a multiple of temporal_patch_size."""
    if not os.path.isfile(path):
        raise DataError(f"sample {sample_id}: video file not found: {path}")
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, video_fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:
        raise _undecodable(sample_id, path, e) from e
    if total == 0 or not math.isfinite(video_fps) or video_fps <= 0:
        raise DataError(f"sample {sample_id}: video {path} has {total} frames at {video_fps} fps")
    nframes = frame_count(total, video_fps, budget)
    idx = torch.linspace(0, total - 1, nframes).round().long()
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except Exception as e:
        raise _undecodable(sample_id, path, e) from e
    return frames, nframes / total * video_fps


def read_image(path, sample_id="?"):
    """uint8 [H,W,3] RGB; transparency composited onto white, as the HF processor does."""
    try:
        with Image.open(path) as img:
            if "A" in img.getbands() or img.info.get("transparency") is not None:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
            return np.array(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"sample {sample_id}: cannot read image {path}: {type(e).__name__}: {e}") from e


def check_media(sample, budget):
    """Decode the sample's video (the frames `budget` samples) and image now, raising the
    DataError that encode_prompt would raise later: an up-front pass over a data set finds its
    broken files before a run starts, not hours into it. Returns None."""
    if sample.video:
        read_video(sample.video, budget, sample.sample_id)
    if sample.image:
        read_image(sample.image, sample.sample_id)


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """The size closest to (height, width) with both sides multiples of `factor` and area in
    [min_pixels, max_pixels], aspect ratio kept as well as possible (same as HF/Qwen)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify_frames(frames, min_pixels, max_pixels, budget):
    """uint8 [T,H,W,3] -> (float32 patches [grid_t*grid_h*grid_w, 3*tps*ps*ps], grid_thw [3]).
    An image is a one-frame clip; padding to tps frames repeats it, which is what HF does."""
    ps, m, tps = budget.patch_size, budget.merge_size, budget.temporal_patch_size
    t, height, width, _ = frames.shape
    h, w = smart_resize(height, width, ps * m, min_pixels, max_pixels)
    mean, std = np.array(budget.image_mean, np.float32), np.array(budget.image_std, np.float32)
    out = []
    for frame in frames:
        # HF's PIL processor step for step (bicubic on uint8, rescale in float64 then cast,
        # normalise in float32), so the tests can demand bit equality, not closeness.
        x = np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.BICUBIC))
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((x - mean) / std).transpose(2, 0, 1))
    out += [out[-1]] * (-t % tps)
    x = np.stack(out)   # [T', C, h, w]
    grid_t, grid_h, grid_w = len(out) // tps, h // ps, w // ps
    # Qwen2-VL layout: tokens ordered (t, merge-block row, merge-block col, row in block, col in
    # block) so the merger's 2x2 groups are contiguous; features ordered (C, tps, ps, ps).
    x = x.reshape(grid_t, tps, 3, grid_h // m, m, ps, grid_w // m, m, ps)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, 3 * tps * ps * ps)
    return torch.from_numpy(patches), torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Tokenised prompts and batches

def _token_id(tokenizer, token):
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no single id for {token}")
    return tid


def encode_prompt(sample, tokenizer, budget) -> dict:
    out = {"sample_id": sample.sample_id}
    n_tokens = {}   # placeholder id -> how many tokens it expands to
    try:
        if sample.video:
            frames, fps = read_video(sample.video, budget, sample.sample_id)
            pv, thw = patchify_frames(frames, budget.video_min_pixels, budget.video_max_pixels, budget)
            # Seconds per temporal patch: drives the temporal 3D-RoPE spacing (see VisualBudget).
            seconds = budget.second_per_grid or budget.temporal_patch_size / fps
            out.update(pixel_values_videos=pv, video_grid_thw=thw[None],
                       second_per_grid_ts=torch.tensor([seconds], dtype=torch.float32))
            n_tokens[_token_id(tokenizer, VIDEO_PAD)] = int(thw.prod()) // budget.merge_size ** 2
        if sample.image:
            frame = read_image(sample.image, sample.sample_id)
            pv, thw = patchify_frames(frame[None], budget.image_min_pixels, budget.image_max_pixels, budget)
            out.update(pixel_values=pv, image_grid_thw=thw[None])
            n_tokens[_token_id(tokenizer, IMAGE_PAD)] = int(thw.prod()) // budget.merge_size ** 2
    except DataError:
        raise
    except ValueError as e:   # smart_resize on absurd aspect ratios
        raise DataError(f"sample {sample.sample_id}: {e}") from e
    ids = tokenizer(chat_prompt(sample), add_special_tokens=False)["input_ids"]
    # Exactly one placeholder per visual; a question quoting "<|image_pad|>" would break the
    # token/feature alignment in the model, so refuse it here with a readable message.
    for token in (VIDEO_PAD, IMAGE_PAD):
        tid = _token_id(tokenizer, token)
        if ids.count(tid) != (1 if tid in n_tokens else 0):
            raise DataError(f"sample {sample.sample_id}: prompt has {ids.count(tid)} {token} tokens")
    expanded = []
    for tid in ids:
        expanded.extend([tid] * n_tokens.get(tid, 1))
    out["input_ids"] = torch.tensor(expanded, dtype=torch.long)
    return out


def collate_prompts(encoded, tokenizer) -> dict:
    """Left-pad (generation appends on the right) and concatenate the visuals in prompt order,
    which is the order the model consumes grid_thw rows in."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad_token_id")
    length = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[i, length - n:] = e["input_ids"]
        attention_mask[i, length - n:] = 1
    # 0 text, 1 image placeholder, 2 video placeholder: Qwen2.5-VL's get_rope_index groups runs
    # of these to lay out 3D positions. Padding is text (0), masked out anyway.
    mm = torch.zeros_like(input_ids)
    mm[input_ids == _token_id(tokenizer, IMAGE_PAD)] = 1
    mm[input_ids == _token_id(tokenizer, VIDEO_PAD)] = 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm * attention_mask,
             "sample_ids": [e["sample_id"] for e in encoded]}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if parts := [e[key] for e in encoded if key in e]:
            batch[key] = torch.cat(parts)
    return batch
