"""Encoding: a Sample as Qwen2-VL or Qwen2.5-VL model inputs. The chat prompt (question, options
and thinking instruction laid out by a PromptTemplate: ours, the public code's, SEED-Bench-R1's,
or a file of the user's), the video and image decoded within the visual budget and cut into the
patches the vision tower eats, prompts batched (left-padded) and split again.

torchvision is not available here, and transformers' Qwen2-VL video processor needs it, so all
visual preprocessing lives here, one code path for CPU and GPU. It reproduces the HF PIL image
processor (image_processing_pil_qwen2_vl) exactly: smart_resize, PIL bicubic resize on uint8,
rescale in float64 then cast to float32, normalise in float32, the same patch layout.
tests/test_data.py checks bit-equality against it.

    budget = budget_from_checkpoint(model_dir)                    # the visual budget defaults
    kept, encoded, skipped = encode_batch(samples, tokenizer, budget, max_prompt_length=16384)
    batch = collate_prompts(encoded, tokenizer)
"""

import json
import math
import os
import re
from dataclasses import dataclass

import decord
import numpy as np
import torch
from PIL import Image

import models
from data import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


FRAME_ROUNDINGS = ("nearest", "floor")
RESIZE_RULES = ("hf", "qwen-vl-utils")


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
    # Whether the model's video positions take second_per_grid_ts at all: the checkpoint's family
    # decides (models.Family.temporal_seconds). Qwen2.5-VL does; Qwen2-VL spaces temporal patches
    # one position apart and takes no second_per_grid_ts, so second_per_grid has no effect there.
    temporal_seconds: bool = True
    video_min_pixels: int = 4 * 28 * 28     # per frame, after resize
    video_max_pixels: int = 128 * 28 * 28
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28
    # How a size is fitted to the patch grid (smart_resize). "hf": transformers' rule. "qwen-vl-utils":
    # the rule of the qwen_vl_utils copies in the public code, which differs only for sides under
    # half a patch grid cell (e.g. 8x107 -> 28x112 there, 28x224 here).
    resize_rule: str = "hf"
    # 0: keep each frame's and image's aspect ratio within the pixel bounds above. S > 0: resize every
    # frame and image to the grid size nearest S x S whatever its shape (within the image bounds), as
    # SEED-Bench-R1's pipeline does with 256 (every visual 252x252).
    resize_to: int = 0
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
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"resize_rule must be one of {RESIZE_RULES}, got {self.resize_rule!r}")
        if self.resize_to < 0:
            raise ValueError(f"resize_to must be 0 (off) or positive, got {self.resize_to}")


def budget_from_checkpoint(model_dir, **overrides) -> VisualBudget:
    """Patch geometry and normalisation come from the checkpoint (they are baked into its vision
    tower), and so does temporal_seconds (its family, from config.json); pixel and frame budgets
    stay ours (the training defaults), whatever min/max_pixels the checkpoint lists."""
    kw = {}
    if path := models.checkpoint_file(model_dir, "config.json"):
        with open(path) as f:
            kw["temporal_seconds"] = models.family(json.load(f).get("model_type")).temporal_seconds
    if path := models.checkpoint_file(model_dir, "preprocessor_config.json"):
        with open(path) as f:
            cfg = json.load(f)
        kw.update({k: int(cfg[k]) for k in ("patch_size", "merge_size", "temporal_patch_size") if k in cfg})
        kw.update({k: tuple(float(v) for v in cfg[k]) for k in ("image_mean", "image_std") if k in cfg})
    kw.update(overrides)
    return VisualBudget(**kw)


# ---------------------------------------------------------------------------------------------
# Prompts

# The thinking instruction, asking for what the public GRPO-CARE prompt asks (in our words): an
# inner dialogue with hesitation and self-checks, self-verification, then both tag pairs.
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
# SEED-Bench-R1's prompt asks for the same two tag pairs in one sentence, with no answer-format line.
SHORT_THINKING = "Write your reasoning inside <think> </think> and your final answer inside <answer> </answer>."
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"


def _lines(options):
    return "".join(o + "\n" for o in options)


def ours_layout(question, options, answer_format):
    """question (then a newline), "Options:" and one option per line, the instruction, and on a
    line of its own the answer-format line."""
    question = question if question.endswith("\n") else question + "\n"
    block = "Options:\n" + _lines(options) if options else ""
    return f"{question}{block}{THINKING}\n{answer_format}"


def official_layout(question, options, answer_format):
    """The public GRPO-CARE prompt's layout: "Options:" straight after the question (after its
    question mark, on the same line), one option per line, a blank line, then the instruction
    and the answer-format line as one paragraph."""
    block = "Options:\n" + _lines(options) if options else ""
    return f"{question}{block}\n{THINKING} {answer_format}"


def seed_bench_r1_layout(question, options, answer_format):
    """SEED-Bench-R1's layout: the question, a newline, one option per line with no "Options:"
    label, then a one-sentence instruction between spaces; no answer-format line."""
    return f"{question}\n{_lines(options)} {SHORT_THINKING} "


LAYOUTS = {"ours": ours_layout, "official": official_layout, "seed-bench-r1": seed_bench_r1_layout}
PLACEHOLDERS = ("question", "options", "answer_format")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_]+)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """The text of the user turn after the visuals. name: a built-in layout (LAYOUTS), or the
    path of a template file, whose text is kept in `text`: any wording, with {question} (the
    question as in the data), {options} (the lettered options, one per line, each ending in a
    newline; empty for questions without options) and {answer_format} (the answer-format line of
    the sample's problem type: ANSWER_LINE, or the file's own). A JSON file may give one text per
    problem type (`text` a dict) and its own answer-format lines (`answer_format`), which is what
    a prompt that words each type differently (the public code's) needs. --prompt-template takes
    either."""
    name: str = "ours"
    text: str | dict | None = None
    answer_format: dict | None = None

    def render(self, sample) -> str:
        answer_format = (self.answer_format or ANSWER_LINE).get(sample.problem_type, ANSWER_LINE[sample.problem_type])
        if self.text is None:
            return LAYOUTS[self.name](sample.question, sample.options, answer_format)
        text = self.text if isinstance(self.text, str) else self.text.get(sample.problem_type)
        if text is None:
            raise DataError(f"sample {sample.sample_id}: --prompt-template {self.name} has no text for problem "
                            f"type {sample.problem_type!r}")
        values = {"question": sample.question, "options": _lines(sample.options), "answer_format": answer_format}
        return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)   # one pass: no value is re-read

    def record(self):
        """What a run's settings record of it: the layout's name, or a file's path and what it said."""
        if self.text is None:
            return self.name
        return {"file": self.name, "text": self.text, **({"answer_format": self.answer_format} if self.answer_format else {})}


def template_problem(spec, text, needs_options=True):
    """Why text is no template (None: it is one): an unknown placeholder, or no {question} (or no
    {options}, where the template is for questions with options)."""
    unknown = sorted({p for p in PLACEHOLDER_RE.findall(text) if p not in PLACEHOLDERS})
    missing = [p for p in ("question", "options")[:2 if needs_options else 1] if "{" + p + "}" not in text]
    if unknown or missing:
        problem = (f"unknown placeholder(s) {', '.join('{' + p + '}' for p in unknown)}" if unknown
                   else f"no {', '.join('{' + p + '}' for p in missing)}")
        return (f"--prompt-template {spec}: {problem}; a template holds {{question}} and {{options}} (a JSON "
                f"file's template for a type without options may leave {{options}} out), and may hold "
                f"{{answer_format}}")
    return None


def json_template(spec, raw):
    """A JSON template file: {"template": TEXT or {problem type: TEXT}, "answer_format": {problem
    type: LINE}} (answer_format optional). Returns PromptTemplate; raises ValueError naming the
    problem."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompt-template {spec}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "template" not in doc or set(doc) - {"template", "answer_format"}:
        raise ValueError(f"--prompt-template {spec}: a JSON template is an object with \"template\" (a text, or "
                         f"one per problem type) and optionally \"answer_format\" (one line per problem type)")
    text, lines = doc["template"], doc.get("answer_format")
    if not isinstance(text, (str, dict)):
        raise ValueError(f"--prompt-template {spec}: template must be a text or an object of texts by problem type")
    if not isinstance(lines, (dict, type(None))):
        raise ValueError(f"--prompt-template {spec}: answer_format must be an object of lines by problem type")
    for what, value in (("template", text), ("answer_format", lines or {})):
        bad = [k for k, v in value.items() if k not in ANSWER_LINE or not isinstance(v, str)] if isinstance(value, dict) else []
        if bad:
            raise ValueError(f"--prompt-template {spec}: {what} for {bad[0]!r}: the problem types are "
                             f"{', '.join(ANSWER_LINE)}, each with a text")
    for kind, t in (text.items() if isinstance(text, dict) else [(None, text)]):
        if problem := template_problem(spec, t, needs_options=kind in (None, "multiple choice")):
            raise ValueError(problem)
    return PromptTemplate(os.path.abspath(spec), text, lines)


def prompt_template(spec: str) -> PromptTemplate:
    """--prompt-template: a layout name (ours, official, seed-bench-r1) or a template file, read
    and checked now: a text file (one final newline dropped, as editors add one) or a .json one
    (json_template). Raises ValueError naming the problem."""
    if spec in LAYOUTS:
        return PromptTemplate(spec)
    if not os.path.isfile(spec):
        raise ValueError(f"--prompt-template {spec!r} is neither a layout ({', '.join(LAYOUTS)}) nor a file")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    if spec.endswith(".json"):
        return json_template(spec, text)
    text = text[:-1] if text.endswith("\n") else text
    if problem := template_problem(spec, text):
        raise ValueError(problem)
    return PromptTemplate(os.path.abspath(spec), text)


OURS = PromptTemplate()


def prompt_text(sample, template=OURS) -> str:
    return template.render(sample)


def chat_prompt(sample, template=OURS) -> str:
    """Qwen2-VL's and Qwen2.5-VL's chat template (the same) with the default system message; one
    placeholder per visual, video first. encode_prompt expands each placeholder to the visual's
    token count."""
    user = ""
    if sample.video:
        user += f"<|vision_start|>{VIDEO_PAD}<|vision_end|>"
    if sample.image:
        user += f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{user}{prompt_text(sample, template)}<|im_end|>\n<|im_start|>assistant\n")


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
    """Decode the sample's video (the frames `budget` samples) and image now, and fit their sizes
    to the budget, raising the DataError that encode_prompt would raise later: an up-front pass
    over a data set finds its broken files (and absurd aspect ratios) before a run starts, not
    hours into it. Returns None."""
    try:
        if sample.video:
            frames, _ = read_video(sample.video, budget, sample.sample_id)
            resized_size(*frames.shape[1:3], budget.video_min_pixels, budget.video_max_pixels, budget)
        if sample.image:
            image = read_image(sample.image, sample.sample_id)
            resized_size(*image.shape[:2], budget.image_min_pixels, budget.image_max_pixels, budget)
    except DataError:
        raise
    except ValueError as e:   # smart_resize on absurd aspect ratios, as in encode_prompt
        raise DataError(f"sample {sample.sample_id}: {e}") from e


def smart_resize(height, width, factor, min_pixels, max_pixels, rule="hf"):
    """The size closest to (height, width) with both sides multiples of `factor` and area in
    [min_pixels, max_pixels], aspect ratio kept as well as possible. rule "hf" is transformers'
    smart_resize; "qwen-vl-utils" (the public code's) rounds a side to at least one factor first,
    and lets a side shrink to 0 when scaling down (a size we refuse)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    floor_side = factor
    if rule == "qwen-vl-utils":
        h_bar, w_bar, floor_side = max(factor, h_bar), max(factor, w_bar), 0
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(floor_side, math.floor(height / beta / factor) * factor)
        w_bar = max(floor_side, math.floor(width / beta / factor) * factor)
        if not h_bar or not w_bar:
            raise ValueError(f"{height}x{width} resizes to {h_bar}x{w_bar} within {max_pixels} pixels")
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(height, width, min_pixels, max_pixels, budget):
    """(h, w) a height x width frame or image is resized to under budget (see VisualBudget)."""
    factor = budget.patch_size * budget.merge_size
    if budget.resize_to:
        height = width = budget.resize_to
        min_pixels, max_pixels = budget.image_min_pixels, budget.image_max_pixels
    return smart_resize(height, width, factor, min_pixels, max_pixels, budget.resize_rule)


def patchify_frames(frames, min_pixels, max_pixels, budget):
    """uint8 [T,H,W,3] -> (float32 patches [grid_t*grid_h*grid_w, 3*tps*ps*ps], grid_thw [3]).
    An image is a one-frame clip; padding to tps frames repeats it, which is what HF does."""
    ps, m, tps = budget.patch_size, budget.merge_size, budget.temporal_patch_size
    t, height, width, _ = frames.shape
    h, w = resized_size(height, width, min_pixels, max_pixels, budget)
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


def encode_prompt(sample, tokenizer, budget, template=OURS) -> dict:
    out = {"sample_id": sample.sample_id}
    n_tokens = {}   # placeholder id -> how many tokens it expands to
    try:
        if sample.video:
            frames, fps = read_video(sample.video, budget, sample.sample_id)
            pv, thw = patchify_frames(frames, budget.video_min_pixels, budget.video_max_pixels, budget)
            out.update(pixel_values_videos=pv, video_grid_thw=thw[None])
            if budget.temporal_seconds:
                # Seconds per temporal patch: drives the temporal 3D-RoPE spacing (see VisualBudget).
                seconds = budget.second_per_grid or budget.temporal_patch_size / fps
                out["second_per_grid_ts"] = torch.tensor([seconds], dtype=torch.float32)
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
    ids = tokenizer(chat_prompt(sample, template), add_special_tokens=False)["input_ids"]
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
    # 0 text, 1 image placeholder, 2 video placeholder: the model's get_rope_index groups runs
    # of these to lay out 3D positions. Padding is text (0), masked out anyway.
    mm = torch.zeros_like(input_ids)
    mm[input_ids == _token_id(tokenizer, IMAGE_PAD)] = 1
    mm[input_ids == _token_id(tokenizer, VIDEO_PAD)] = 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm * attention_mask,
             "sample_ids": [e["sample_id"] for e in encoded]}
    for key in VISUAL_KEYS:
        if visuals := [e[key] for e in encoded if key in e]:
            batch[key] = torch.cat(visuals)
    return batch


def encode_batch(samples, tokenizer, budget, max_prompt_length=None, skip_bad=False, template=OURS):
    """Encode each sample's prompt (budget: one VisualBudget, or a list with one per sample).
    Returns (kept, encoded, skipped): the indices of the samples that could be read, their
    encoded prompts, and one message per sample left out. A sample that cannot be read, or
    whose prompt is longer than max_prompt_length tokens, raises its DataError unless skip_bad,
    which leaves it out and says why in skipped. Training and evaluation both encode here."""
    budgets = budget if isinstance(budget, list) else [budget] * len(samples)
    kept, encoded, skipped = [], [], []
    for i, (sample, sample_budget) in enumerate(zip(samples, budgets)):
        try:
            enc = encode_prompt(sample, tokenizer, sample_budget, template)
            if max_prompt_length is not None and len(enc["input_ids"]) > max_prompt_length:
                raise DataError(f"sample {sample.sample_id}: prompt has {len(enc['input_ids'])} tokens, more than "
                                f"--max-prompt-length {max_prompt_length} (lower the frame or pixel budget)")
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        kept.append(i)
        encoded.append(enc)
    return kept, encoded, skipped


# ---------------------------------------------------------------------------------------------
# A collated batch as model inputs, and one prompt of it

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def model_inputs(prompts):
    """The prompt batch as keyword arguments for the model's forward or generate call."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids") + VISUAL_KEYS
    return {k: prompts[k] for k in keys if k in prompts}


def select_prompt(prompts, i):
    """Prompt i of a collated batch as a batch of its own: left padding removed, and its own
    image and video patches (the visual tensors are concatenated over the prompts that have
    one, in prompt order). A batch without mm_token_type_ids is text only."""
    keep = prompts["attention_mask"][i].bool()
    out = {k: prompts[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in prompts}
    if "mm_token_type_ids" not in prompts:  # a text-only prompt batch (a judge's)
        return out
    mm = prompts["mm_token_type_ids"]
    for kind, pix, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        has = (mm == kind).any(dim=1)  # [P] which prompts carry this kind of visual
        if grid not in prompts or not has[i]:
            continue
        row = int(has[:i].sum())
        sizes = prompts[grid].prod(-1).tolist()  # patches per visual
        start = sum(sizes[:row])
        out[pix] = prompts[pix][start:start + sizes[row]]
        out[grid] = prompts[grid][row:row + 1]
        if kind == 2 and "second_per_grid_ts" in prompts:
            out["second_per_grid_ts"] = prompts["second_per_grid_ts"][row:row + 1]
    return out


VISION_MARKS = ("<|vision_start|>", "<|vision_end|>", VIDEO_PAD, IMAGE_PAD)


def without_visuals(prompts, tokenizer):
    """The collated prompt batch with its videos and images taken out: every visual token
    (<|vision_start|>, the placeholders, <|vision_end|>) removed from each prompt's ids, the
    pixels and grids dropped, and the prompts left-padded again. What is left is the chat
    prompt's text: system message, question, options and instruction. CARE's text-only
    reference (--reference-input text) scores the answers under it."""
    marks = torch.tensor([_token_id(tokenizer, t) for t in VISION_MARKS], device=prompts["input_ids"].device)
    rows = [ids[keep.bool() & ~torch.isin(ids, marks)]
            for ids, keep in zip(prompts["input_ids"], prompts["attention_mask"])]   # P x [n_i]
    width = max(len(r) for r in rows)
    input_ids = prompts["input_ids"].new_full((len(rows), width), tokenizer.pad_token_id)    # [P, width]
    attention_mask = torch.zeros_like(input_ids)                                             # [P, width]
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            **{k: v for k, v in prompts.items() if k == "sample_ids"}}


# ---------------------------------------------------------------------------------------------
# The visual budget on an argparse command line (evaluate.py, analyze.py; train.py and sft.py
# take it from their Config)

BUDGET_FLAGS = ("fps", "min_frames", "max_frames", "video_min_pixels", "video_max_pixels", "image_min_pixels",
                "image_max_pixels", "second_per_grid", "frame_rounding", "resize_rule", "resize_to")


TEMPLATE_HELP = ("the prompt's layout and wording: ours, official (the public GRPO-CARE layout), seed-bench-r1 "
                 "(SEED-Bench-R1's), or a FILE of your own with {question}, {options} and optionally {answer_format}; "
                 "a .json FILE may word each problem type and its answer-format line apart (docs/data.md)")
RESIZE_RULE_HELP = ("how sizes are fitted to the patch grid: hf (transformers) or qwen-vl-utils (the public code's "
                    "copy; differs only for sides of 14 pixels or fewer)")
RESIZE_TO_HELP = ("resize every video frame and image to the grid size nearest S x S whatever its shape; 0 = keep "
                  "the aspect ratio within the pixel bounds (SEED-Bench-R1's pipeline: 256, i.e. 252 x 252)")


def add_budget_arguments(parser, max_frames_help=None):
    """The visual budget's flags with VisualBudget's defaults. max_frames_help: --max-frames
    defaults to None, the caller choosing per file, and says so in this help line."""
    b = VisualBudget()
    parser.add_argument("--fps", type=float, default=b.fps, help="video frames sampled per second, within the frame budget")
    parser.add_argument("--min-frames", type=int, default=b.min_frames, metavar="N", help="fewest frames per video")
    parser.add_argument("--max-frames", type=int, default=None if max_frames_help else b.max_frames, metavar="N",
                        help=max_frames_help or "most frames per video")
    for kind, what in (("video", "per video frame"), ("image", "per image")):
        parser.add_argument(f"--{kind}-min-pixels", type=int, default=getattr(b, f"{kind}_min_pixels"), metavar="N",
                            help=f"fewest pixels {what} after resizing")
        parser.add_argument(f"--{kind}-max-pixels", type=int, default=getattr(b, f"{kind}_max_pixels"), metavar="N",
                            help=f"most pixels {what} after resizing")
    parser.add_argument("--second-per-grid", type=float, default=b.second_per_grid, metavar="S",
                        help="seconds per temporal patch in the video positions: 0 = measured from the sampled fps; "
                             "1.0 = the public code's fixed value (use what the model was trained with)")
    parser.add_argument("--frame-rounding", choices=FRAME_ROUNDINGS, default=b.frame_rounding,
                        help="frame count: nearest (round to the temporal patch, then clamp) or floor (the public "
                             "code: clamp, then round down)")
    parser.add_argument("--resize-rule", choices=RESIZE_RULES, default=b.resize_rule, help=RESIZE_RULE_HELP)
    parser.add_argument("--resize-to", type=int, default=b.resize_to, metavar="S", help=RESIZE_TO_HELP)


def budget_problem(args):
    """The first bad visual-budget setting among add_budget_arguments' flags, as one line, or None."""
    for name in ("min_frames", "video_min_pixels", "video_max_pixels", "image_min_pixels", "image_max_pixels"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if not args.fps > 0:
        return f"--fps must be above 0, got {args.fps}"
    if args.max_frames is not None and args.max_frames < args.min_frames:
        return f"--max-frames {args.max_frames} is below --min-frames {args.min_frames}"
    for kind in ("video", "image"):
        lo, hi = getattr(args, f"{kind}_min_pixels"), getattr(args, f"{kind}_max_pixels")
        if lo > hi:
            return f"--{kind}-min-pixels {lo} is above --{kind}-max-pixels {hi}"
    if args.second_per_grid < 0:
        return f"--second-per-grid must be 0 (measured) or more, got {args.second_per_grid}"
    if args.resize_to < 0:
        return f"--resize-to must be 0 (off) or more, got {args.resize_to}"
    return None
