"""data.py: annotation loading, prompts, video/image preprocessing (checked bit-exact against the HF
PIL image processor), prompt encoding and batching, and the errors bad data must produce."""

import json
import os
import re

import numpy as np
import pytest
import torch

import tiny
from data import DataError, Sample, load_samples, load_seed_bench_r1, load_video_r1
from encoding import (ANSWER_LINE, LAYOUTS, SHORT_THINKING, THINKING, PromptTemplate, VisualBudget,
                      prompt_template, budget_from_checkpoint, chat_prompt, check_media, collate_prompts,
                      encode_prompt, patchify_frames, prompt_text, read_video)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def option_texts(sample):
    """The texts of a sample's options, which must be lettered A. to D. in order."""
    assert [o[:3] for o in sample.options] == ["A. ", "B. ", "C. ", "D. "]
    return [o[3:] for o in sample.options]


def hf_image_processor(min_pixels, max_pixels, budget=VisualBudget()):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, image_mean=list(budget.image_mean),
                                    image_std=list(budget.image_std), patch_size=budget.patch_size,
                                    merge_size=budget.merge_size, temporal_patch_size=budget.temporal_patch_size)


# ---------------------------------------------------------------------------------------------
# SEED-Bench-R1

def test_seed_bench_train_rows(seed_bench_root):
    path = os.path.join(seed_bench_root, "annotations", "training_6k.jsonl")
    samples, skipped = load_seed_bench_r1(path, seed_bench_root, seed=0)
    raw = rows(path)
    assert skipped == [] and len(samples) == len(raw)
    for s, r in zip(samples, raw):
        assert s.sample_id == r["sample_id"] and s.problem_type == "multiple choice" and s.level == "train"
        options = option_texts(s)
        assert s.question == r["question"]               # as in the file (it ends with "\n")
        assert options["ABCD".index(s.solution)] == r["answer"]
        assert set(options) - {r["answer"]} <= set(r["negative_answers"])
        assert prompt_text(s).startswith(s.question + "Options:\n" + "".join(f"{L}. {o}\n" for L, o in zip("ABCD", options)))
        if r["task_progress_metadata"]:
            assert s.video == os.path.join(seed_bench_root, "videos", r["video_source"], r["video_basename"])
        else:
            assert s.video is None
        assert s.image == os.path.join(seed_bench_root, "images", r["video_source"], r["current_observation_basename"])
        assert s.source == r["video_source"]
    assert any(s.video is None for s in samples) and any(s.video for s in samples)
    # Deterministic per seed, independent of file order; another seed shuffles differently.
    again, _ = load_seed_bench_r1(path, seed_bench_root, seed=0)
    assert [s.options for s in again] == [s.options for s in samples]
    reversed_path = os.path.join(os.path.dirname(path), "reversed.jsonl")
    with open(reversed_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reversed(raw))
    rev, _ = load_seed_bench_r1(reversed_path, seed_bench_root, seed=0)
    assert {s.sample_id: s.options for s in rev} == {s.sample_id: s.options for s in samples}
    other, _ = load_seed_bench_r1(path, seed_bench_root, seed=1)
    assert [s.options for s in other] != [s.options for s in samples]
    assert len({s.solution for s in samples}) > 1   # each sample gets its own shuffle


def test_seed_bench_training_task_has_four_options(seed_bench_root):
    """Each training row becomes its answer and 3 distinct negatives drawn per sample and seed,
    however many negatives the row lists (tiny rows list 7, as real ones do)."""
    path = os.path.join(seed_bench_root, "annotations", "training_6k.jsonl")
    raw = {r["sample_id"]: r for r in rows(path)}
    assert all(len(r["negative_answers"]) > 3 for r in raw.values())
    drawn = {}
    for seed in range(4):
        samples, _ = load_seed_bench_r1(path, seed_bench_root, seed=seed)
        for s in samples:
            r = raw[s.sample_id]
            options = option_texts(s)   # exactly A. B. C. D.
            assert options["ABCD".index(s.solution)] == r["answer"] and options.count(r["answer"]) == 1
            wrong = [o for o in options if o != r["answer"]]
            assert len(set(wrong)) == 3 and set(wrong) <= set(r["negative_answers"])
            drawn.setdefault(s.sample_id, set()).add(frozenset(wrong))
        again, _ = load_seed_bench_r1(path, seed_bench_root, seed=seed)
        assert again == samples
    assert any(len(sets) > 1 for sets in drawn.values())   # another seed, other negatives


def test_seed_bench_question_without_newline(tmp_path, seed_bench_root):
    r = rows(os.path.join(seed_bench_root, "annotations", "validation_L1.jsonl"))[0]
    r["question"] = "Which colour?"
    path = tmp_path / "validation_L1.jsonl"
    path.write_text(json.dumps(r) + "\n")
    [s], _ = load_seed_bench_r1(str(path), seed_bench_root)
    assert s.question == "Which colour?"
    assert prompt_text(s).startswith("Which colour?\nOptions:\n" + "".join(f"{L}. {r['choice_' + L.lower()]}\n"
                                                                          for L in "ABCD"))


def test_seed_bench_validation_rows(seed_bench_root):
    for level in ("L1", "L2", "L3"):
        path = os.path.join(seed_bench_root, "annotations", f"validation_{level}.jsonl")
        samples, _ = load_samples(path, seed_bench_root)   # dispatches to the SEED-Bench-R1 loader
        for s, r in zip(samples, rows(path), strict=True):
            options = option_texts(s)
            assert s.question == r["question"] and options == [r[f"choice_{k}"] for k in "abcd"]
            assert s.solution == r["golden_choice_idx"] and options["ABCD".index(s.solution)] == r["answer"]
            assert s.level == level and s.domain == r.get("domain")
        if level == "L3":
            assert all(s.domain for s in samples)


# ---------------------------------------------------------------------------------------------
# Video-R1

def video_r1_rows():
    return [
        {"problem_id": 1, "problem": "What moves?", "data_type": "video", "problem_type": "multiple choice",
         "options": ["A. a square", "B. a circle", "C. nothing", "D. a cup"], "solution": "<answer>A</answer>",
         "path": "./vids/a.mp4", "data_source": "synthetic"},
        {"problem_id": 2, "problem": "How many squares?", "data_type": "image", "problem_type": "numerical",
         "options": [], "solution": "<answer> 1 </answer>", "path": "imgs/a.jpg", "data_source": "synthetic"},
        {"problem_id": 3, "problem": "Read the sign.", "data_type": "image", "problem_type": "OCR",
         "options": [], "solution": "<answer>STOP</answer>", "path": "imgs/a.jpg", "data_source": "synthetic"},
        {"problem_id": 4, "problem": "Describe it.", "data_type": "video", "problem_type": "free-form",
         "options": [], "solution": "<answer>a red square moves right</answer>", "path": "vids/a.mp4"},
        {"problem_id": 5, "problem": "How far does it move?", "data_type": "video", "problem_type": "regression",
         "options": [], "solution": "<answer>2.5</answer>", "path": "vids/a.mp4", "data_source": "synthetic"},
    ]


@pytest.fixture
def video_r1_root(tmp_path):
    tiny.write_video(str(tmp_path / "vids" / "a.mp4"), tiny.moving_square_clip("red", n_frames=8))
    tiny.write_image(str(tmp_path / "imgs" / "a.jpg"), tiny.moving_square_clip("blue", n_frames=1)[0])
    return tmp_path


def test_video_r1_rows(video_r1_root):
    path = video_r1_root / "train.json"
    path.write_text(json.dumps(video_r1_rows()))
    samples, skipped = load_samples(str(path), str(video_r1_root))
    assert skipped == [] and [s.problem_type for s in samples] == ["multiple choice", "numerical", "OCR",
                                                                     "free-form", "regression"]
    mc, num, ocr, free, reg = samples
    assert mc == Sample("1", "multiple choice", "What moves?", "A",
                        options=["A. a square", "B. a circle", "C. nothing", "D. a cup"],
                        video=str(video_r1_root / "vids" / "a.mp4"), source="synthetic")
    assert prompt_text(mc).startswith("What moves?\nOptions:\nA. a square\nB. a circle\nC. nothing\nD. a cup\n")
    assert num.question == "How many squares?" and num.solution == "1" and num.video is None
    assert num.image == str(video_r1_root / "imgs" / "a.jpg")
    assert ocr.solution == "STOP" and free.solution == "a red square moves right" and free.source is None
    assert reg.solution == "2.5" and reg.level is None and reg.domain is None
    # Same rows as JSONL load identically.
    jsonl = video_r1_root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in video_r1_rows()))
    assert load_video_r1(str(jsonl), str(video_r1_root))[0] == samples
    # Prompt: question, thinking instruction, then a line that depends on the problem type.
    texts = [prompt_text(s) for s in samples]
    assert texts[0].startswith(mc.question) and texts[1].startswith("How many squares?\n")
    for t in texts:
        assert "<think>" in t and "</think>" in t and "<answer>" in t and "</answer>" in t
    last = [t.rsplit("\n", 1)[1] for t in texts]
    assert "letter" in last[0] and "number" in last[1] and "transcribed" in last[2] and "text" in last[3]
    assert last[4] == last[1] and len({last[0], last[1], last[2], last[3]}) == 4


def test_thinking_instruction():
    """Every prompt asks for reasoning as an inner dialogue that checks itself, in <think> </think>,
    then the answer in <answer> </answer>."""
    for phrase in ("inner dialogue", "'let me think'", "'wait'", "'hmm'", "'oh, I see'", "verify",
                   "<think> </think>", "<answer> </answer>"):
        assert phrase in THINKING, phrase
    assert THINKING.index("<think>") < THINKING.index("<answer>")
    for ptype in ("multiple choice", "numerical", "OCR", "free-form", "regression"):
        assert THINKING in prompt_text(Sample("x", ptype, "Q?", "1"))


def test_chat_prompt_video_and_image():
    s = Sample("x", "multiple choice", "Q?\nOptions:\nA. a\nB. b\nC. c\nD. d\n", "B", video="/v.mp4", image="/i.jpg")
    assert chat_prompt(s) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                              "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                              + prompt_text(s) + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_text(s).startswith(s.question) and "(A, B, C, D)" in prompt_text(s)
    assert "<|video_pad|>" not in chat_prompt(Sample("y", "OCR", "Read.", "x", image="/i.jpg"))


# ---------------------------------------------------------------------------------------------
# Video frames and pixel budgets

def clip_file(tmp_path, n_frames, fps, name="clip.mp4", **kw):
    path = str(tmp_path / name)
    tiny.write_video(path, tiny.moving_square_clip("green", n_frames=n_frames, **kw), fps=fps)
    return path


def test_frame_budget(tmp_path):
    path = clip_file(tmp_path, 40, 10)   # 4 seconds
    frames, fps = read_video(path, VisualBudget(fps=2.0))
    assert frames.shape == (8, 56, 84, 3) and frames.dtype == np.uint8 and fps == pytest.approx(2.0)
    assert read_video(path, VisualBudget(fps=10.0, max_frames=12))[0].shape[0] == 12    # max_frames clamps
    assert read_video(path, VisualBudget(fps=0.25, min_frames=6))[0].shape[0] == 6      # min_frames raises
    assert read_video(path, VisualBudget(fps=10.0, max_frames=7))[0].shape[0] == 6      # odd budget: inwards
    n = read_video(path, VisualBudget(fps=1.75))[0].shape[0]                            # 7 frames -> even
    assert n % 2 == 0 and abs(n - 7) == 1
    # Sampled uniformly over the clip: first and last frame included.
    frames, sample_fps = read_video(path, VisualBudget(fps=10.0, max_frames=40))
    assert frames.shape[0] == 40 and sample_fps == pytest.approx(10.0)
    short = clip_file(tmp_path, 3, 10, name="short.mp4")   # fewer frames than min_frames
    frames, _ = read_video(short, VisualBudget())
    assert frames.shape[0] == 2
    one = clip_file(tmp_path, 1, 10, name="one.mp4")       # below one temporal patch: repeat
    frames, _ = read_video(one, VisualBudget())
    assert frames.shape[0] == 2 and np.array_equal(frames[0], frames[1])


@pytest.mark.parametrize("n_frames, clip_fps, budget, nearest, floor", [
    (28, 4, {}, 8, 6),                    # 7 s at 1 fps: 7 frames, rounded to 8 or down to 6
    (22, 4, {}, 6, 4),                    # 5.5 frames: 6, or down to 4
    (20, 4, {}, 4, 4),                    # 5 frames: round-half-to-even gives 4 too
    (40, 4, {"fps": 2.0, "max_frames": 15}, 14, 14),   # both clamp to max_frames, rounded down
    (12, 4, {"min_frames": 5}, 6, 6),     # 3 frames: min_frames 5 rounded up
    (1, 4, {}, 2, 2),                     # one frame: repeated to one temporal patch
])
def test_frame_rounding(tmp_path, n_frames, clip_fps, budget, nearest, floor):
    """"nearest" rounds the fps-based count, then clamps; "floor" (the public code's
    smart_nframes) clamps, then rounds down. Budgets at 1 fps unless the case says otherwise."""
    path = clip_file(tmp_path, n_frames, clip_fps)
    for rounding, expected in (("nearest", nearest), ("floor", floor)):
        frames, fps = read_video(path, VisualBudget(**{"fps": 1.0, **budget, "frame_rounding": rounding}))
        assert frames.shape[0] == expected, rounding
        assert fps == pytest.approx(expected / n_frames * clip_fps)
    assert VisualBudget().frame_rounding == "nearest"
    with pytest.raises(ValueError, match="frame_rounding"):
        VisualBudget(frame_rounding="up")


def test_second_per_grid(tmp_path, tokenizer):
    """0 (the default): measured from the fps really sampled; a positive value as is."""
    video = clip_file(tmp_path, 40, 10)
    sample = Sample("v", "OCR", "Read.", "x", video=video)
    budget = VisualBudget(max_frames=6)   # 4 s at 2 fps would be 8 frames: 6, so 1.5 fps sampled
    _, sampled_fps = read_video(video, budget)
    assert encode_prompt(sample, tokenizer, budget)["second_per_grid_ts"].item() == pytest.approx(2 / sampled_fps)
    assert sampled_fps != 2.0
    fixed = encode_prompt(sample, tokenizer, VisualBudget(max_frames=6, second_per_grid=1.0))
    assert fixed["second_per_grid_ts"].item() == 1.0
    with pytest.raises(ValueError, match="second_per_grid"):
        VisualBudget(second_per_grid=-1.0)


def test_pixel_budget():
    budget = VisualBudget()
    big = np.random.default_rng(0).integers(0, 256, (4, 300, 500, 3), dtype=np.uint8)
    small = big[:, :30, :50]
    for frames, lo, hi in [(big, 8 * 28 * 28, 32 * 28 * 28), (small, 8 * 28 * 28, 32 * 28 * 28),
                           (big, 4 * 28 * 28, 128 * 28 * 28)]:
        pv, (t, gh, gw) = patchify_frames(frames, lo, hi, budget)
        h, w = gh * 14, gw * 14
        assert h % 28 == 0 and w % 28 == 0 and lo <= h * w <= hi
        assert t == 2 and pv.shape == (t * gh * gw, 3 * 2 * 14 * 14) and pv.dtype == torch.float32
    pv, thw = patchify_frames(big[:3], 8 * 28 * 28, 32 * 28 * 28, budget)   # odd T: pad with the last frame
    assert thw[0] == 2 and torch.equal(pv, patchify_frames(big[[0, 1, 2, 2]], 8 * 28 * 28, 32 * 28 * 28, budget)[0])


# ---------------------------------------------------------------------------------------------
# Bit-exact against the HF PIL image processor

def test_identical_frames_patchify_like_hf_image():
    budget = VisualBudget()
    frame = np.random.default_rng(1).integers(0, 256, (123, 70, 3), dtype=np.uint8)
    for lo, hi in [(budget.video_min_pixels, budget.video_max_pixels), (4 * 28 * 28, 6 * 28 * 28)]:
        ref = hf_image_processor(lo, hi)(images=[frame], return_tensors="pt")
        pv, thw = patchify_frames(np.stack([frame] * 2), lo, hi, budget)
        assert torch.equal(thw[None], ref["image_grid_thw"])
        assert torch.equal(pv, ref["pixel_values"])
        pv4, thw4 = patchify_frames(np.stack([frame] * 4), lo, hi, budget)   # two temporal patches
        assert thw4[0] == 2 and torch.equal(pv4, torch.cat([ref["pixel_values"]] * 2))
    with pytest.raises(AssertionError):   # the comparison can fail: a different frame differs
        assert torch.equal(patchify_frames(np.stack([frame[::-1]] * 2), lo, hi, budget)[0], ref["pixel_values"])


def test_image_path_matches_hf(tmp_path, tokenizer):
    from PIL import Image
    budget = VisualBudget()
    array = np.random.default_rng(2).integers(0, 256, (170, 300, 3), dtype=np.uint8)   # non-square
    path = str(tmp_path / "img.png")   # lossless, so HF and we see the same pixels
    Image.fromarray(array).save(path)
    enc = encode_prompt(Sample("img", "OCR", "Read.", "x", image=path), tokenizer, budget)
    ref = hf_image_processor(budget.image_min_pixels, budget.image_max_pixels)(images=[Image.open(path)],
                                                                               return_tensors="pt")
    assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])
    assert "pixel_values_videos" not in enc and "video_grid_thw" not in enc
    assert (enc["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == \
        ref["image_grid_thw"].prod() // 4


def test_budget_from_checkpoint(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3, "max_pixels": 12845056}))
    b = budget_from_checkpoint(str(tmp_path), max_frames=8)
    assert b.patch_size == 16 and b.image_mean == (0.5, 0.5, 0.5) and b.max_frames == 8
    assert b.image_max_pixels == VisualBudget().image_max_pixels
    assert budget_from_checkpoint(str(tmp_path / "nowhere")) == VisualBudget()


# ---------------------------------------------------------------------------------------------
# Encoding and batching

def test_encode_and_collate(tmp_path, tokenizer):
    budget = VisualBudget(max_frames=6)   # 4 s at 2 fps would be 8 frames: clamped, so 1.5 fps
    video = clip_file(tmp_path, 40, 10, height=112, width=168)
    image = str(tmp_path / "img.jpg")
    tiny.write_image(image, tiny.moving_square_clip("red", n_frames=1)[0])
    both = Sample("both", "multiple choice", "Q?\nOptions:\nA. a\nB. b\nC. c\nD. d\n", "A", video=video, image=image)
    only_image = Sample("img", "numerical", "How many?", "1", image=image)
    enc = encode_prompt(both, tokenizer, budget)
    vid, img = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    t, gh, gw = enc["video_grid_thw"][0].tolist()
    assert t == 3   # 6 frames / temporal patch 2
    assert (enc["input_ids"] == vid).sum() == t * gh * gw // 4
    assert (enc["input_ids"] == img).sum() == enc["image_grid_thw"][0].prod() // 4
    assert enc["pixel_values_videos"].shape == (t * gh * gw, 3 * 2 * 14 * 14)
    assert enc["pixel_values"].shape == (enc["image_grid_thw"][0].prod(), 3 * 2 * 14 * 14)
    _, sample_fps = read_video(video, budget)
    assert sample_fps == pytest.approx(1.5) and enc["second_per_grid_ts"].item() == pytest.approx(4 / 3)
    assert enc["second_per_grid_ts"].shape == (1,) and enc["second_per_grid_ts"].item() == pytest.approx(2 / sample_fps)
    # The placeholders expand in place: text around them tokenizes exactly like chat_prompt.
    ids = enc["input_ids"].tolist()
    first_vid = ids.index(vid)
    assert ids[first_vid - 1] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert tokenizer.decode(ids[:first_vid]) == chat_prompt(both).split("<|video_pad|>")[0]

    enc2 = encode_prompt(only_image, tokenizer, budget)
    batch = collate_prompts([enc2, enc], tokenizer)
    n1, n2 = len(enc2["input_ids"]), len(enc["input_ids"])
    assert n1 < n2 and batch["input_ids"].shape == (2, n2) and batch["sample_ids"] == ["img", "both"]
    assert torch.equal(batch["input_ids"][0, n2 - n1:], enc2["input_ids"])          # left padded
    assert (batch["input_ids"][0, :n2 - n1] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * (n2 - n1) + [1] * n1 and batch["attention_mask"][1].all()
    mm = batch["mm_token_type_ids"]
    assert torch.equal(mm == 2, batch["input_ids"] == vid) and torch.equal(mm == 1, batch["input_ids"] == img)
    assert set(mm.unique().tolist()) == {0, 1, 2}
    assert torch.equal(batch["pixel_values"], torch.cat([enc2["pixel_values"], enc["pixel_values"]]))
    assert batch["image_grid_thw"].shape == (2, 3) and batch["video_grid_thw"].shape == (1, 3)
    assert torch.equal(batch["pixel_values_videos"], enc["pixel_values_videos"])
    assert batch["second_per_grid_ts"].shape == (1,)
    assert "pixel_values_videos" not in collate_prompts([enc2], tokenizer)


# ---------------------------------------------------------------------------------------------
# Errors

def test_video_errors(tmp_path, tokenizer):
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(DataError, match="vid-7") as e:
        encode_prompt(Sample("vid-7", "OCR", "Read.", "x", video=missing), tokenizer, VisualBudget())
    assert missing in str(e.value)
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match="vid-8") as e:
        read_video(str(corrupt), VisualBudget(), sample_id="vid-8")
    assert str(corrupt) in str(e.value)


def refused(path, load, sample_id, problem, **kw):
    """`load` on a file with one bad row between two good ones raises a DataError that names the
    row's line, its sample and the problem; with skip_bad the row is one counted skip."""
    with pytest.raises(DataError) as e:
        load(str(path), **kw)
    message = str(e.value)
    assert f"{path}:2 (sample {sample_id})" in message and problem in message, message
    samples, skipped = load(str(path), skip_bad=True, **kw)
    assert len(samples) == 2 and skipped == [message]
    return message


@pytest.mark.parametrize("split, change, problem", [
    ("train", {"question": " \n"}, "question must be non-empty text"),
    ("train", {"answer": ""}, "answer must be non-empty text"),
    ("train", {"answer": "purple"}, "the answer 'purple' is also among the negative_answers"),
    ("train", {"negative_answers": ["purple", "", "orange", "white"]}, "negative_answers[1] must be non-empty text"),
    ("train", {"negative_answers": "purple"}, "negative_answers must be a list"),
    ("train", {"negative_answers": ["purple", "orange", "purple", "orange"]}, "at least 3 distinct negative_answers"),
    ("L1", {"question": ""}, "question must be non-empty text"),
    ("L1", {"choice_b": " "}, "choice_b must be non-empty text"),
    ("L1", {"choice_a": "mauve", "choice_c": "mauve "}, "choice_a and choice_c are the same option 'mauve'"),
    ("L1", {"choice_a": "mauve", "choice_b": "teal", "golden_choice_idx": "B", "answer": "mauve"},
     "the answer 'mauve' is not choice_b 'teal', which golden_choice_idx B names"),
    ("L1", {"video_source": 7}, "video_source must be non-empty text, got 7"),
    ("train", {"current_observation_basename": None}, "current_observation_basename must be non-empty text"),
])
def test_bad_seed_bench_rows(tmp_path, seed_bench_root, split, change, problem):
    name = "training_6k.jsonl" if split == "train" else "validation_L1.jsonl"
    raw = rows(os.path.join(seed_bench_root, "annotations", name))
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in [raw[0], {**raw[2], "sample_id": "bad-1", **change}, raw[1]]))
    refused(path, lambda p, **kw: load_samples(p, seed_bench_root, **kw), "bad-1", problem)


@pytest.mark.parametrize("good, change, problem", [
    (0, {"solution": "<answer>E</answer>"}, "solution 'E' is not one of the option letters A, B, C, D"),
    (0, {"solution": "a square"}, "solution 'a square' is not one of the option letters"),
    (0, {"options": ["a square", "a circle"]}, "option 'a square' does not look like 'A. text'"),
    (0, {"options": ["A. a square", "C. a circle"]}, "option 'C. a circle' does not look like 'B. text'"),
    (0, {"options": ["A. a square", "B."]}, "option B must be non-empty text"),
    (0, {"options": ["A. red", "B. blue", "C. red"]}, "option A and option C are the same option 'red'"),
    (0, {"options": []}, "multiple choice row without options"),
    (0, {"solution": "<answer> </answer>"}, "empty solution"),
    (3, {"solution": ""}, "empty solution"),
    (1, {"solution": "<answer>one</answer>"}, "numerical solution 'one' is not a number"),
    (4, {"solution": "<answer>far</answer>"}, "regression solution 'far' is not a number"),
    (1, {"problem": ""}, "problem (the question) must be non-empty text"),
    (1, {"path": ["a.mp4"]}, "path must be non-empty text, got ['a.mp4']"),
])
def test_bad_video_r1_rows(video_r1_root, good, change, problem):
    raw = video_r1_rows()
    path = video_r1_root / "bad.jsonl"
    bad = {**raw[good], "problem_id": "bad-1", **change}
    path.write_text("".join(json.dumps(r) + "\n" for r in [raw[0], bad, raw[1]]))
    refused(path, lambda p, **kw: load_samples(p, str(video_r1_root), **kw), "bad-1", problem)


def test_lower_case_solution_letter(video_r1_root):
    path = video_r1_root / "train.json"
    path.write_text(json.dumps([dict(video_r1_rows()[0], solution="<answer>b</answer>")]))
    [s], _ = load_samples(str(path), str(video_r1_root))
    assert s.solution == "B"


def test_video_r1_media_outside_the_data_root(tmp_path):
    """A path that leaves the root, by "..", a symlink or an absolute path, is refused unless allowed."""
    root = tmp_path / "data"
    elsewhere = str(tmp_path / "elsewhere.mp4")
    tiny.write_video(elsewhere, tiny.moving_square_clip("red", n_frames=4))
    tiny.write_image(str(root / "imgs" / "a.jpg"), tiny.moving_square_clip("blue", n_frames=1)[0])
    (root / "link.mp4").symlink_to(elsewhere)
    good = video_r1_rows()[1]   # imgs/a.jpg, inside
    path = root / "train.jsonl"
    for media in ("../elsewhere.mp4", "link.mp4", elsewhere):
        bad = dict(video_r1_rows()[3], problem_id="bad-1", path=media)
        path.write_text("".join(json.dumps(r) + "\n" for r in [good, bad, dict(good, problem_id=6)]))
        message = refused(path, lambda p, **kw: load_samples(p, str(root), **kw), "bad-1",
                          "--allow-outside-data-root allows it")
        assert elsewhere in message
        samples, skipped = load_samples(str(path), str(root), allow_outside_root=True)
        assert not skipped and samples[1].video == os.path.abspath(root / media)


@pytest.mark.parametrize("with_video", [True, False])
def test_seed_bench_media_outside_the_data_root(tmp_path, seed_bench_root, with_video):
    """A video_source of "../x" leaves videos/ and images/, the layout's media folders."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    raw = rows(root / "annotations" / "training_6k.jsonl")
    row = next(r for r in raw if bool(r["task_progress_metadata"]) == with_video)
    (root / "x").mkdir()
    if with_video:
        shutil.copy(root / "videos" / row["video_source"] / row["video_basename"], root / "x")
    shutil.copy(root / "images" / row["video_source"] / row["current_observation_basename"], root / "x")
    bad = dict(row, sample_id="bad-1", video_source="../x")
    path = root / "annotations" / "training_6k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [raw[0], bad, raw[1]]))
    kind, name = ("video", row["video_basename"]) if with_video else ("image", row["current_observation_basename"])
    message = refused(path, lambda p, **kw: load_samples(p, str(root), **kw), "bad-1",
                      "--allow-outside-data-root allows it")
    assert f"{kind} {root / 'x' / name} " in message and f"outside {os.path.realpath(root / (kind + 's'))};" in message
    samples, skipped = load_samples(str(path), str(root), allow_outside_root=True)
    assert not skipped and samples[1].image == str(root / "x" / row["current_observation_basename"])
    assert samples[1].video == (str(root / "x" / row["video_basename"]) if with_video else None)


def test_check_media(tmp_path):
    video, image = clip_file(tmp_path, 8, 4), str(tmp_path / "good.jpg")
    tiny.write_image(image, tiny.moving_square_clip("red", n_frames=1)[0])
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    assert check_media(Sample("ok", "OCR", "Read.", "x", video=video, image=image), VisualBudget()) is None
    for broken in (dict(video=str(corrupt), image=image), dict(video=video, image=str(corrupt))):
        with pytest.raises(DataError, match="sample broken-3") as e:
            check_media(Sample("broken-3", "OCR", "Read.", "x", **broken), VisualBudget())
        assert str(corrupt) in str(e.value)


def test_check_media_refuses_what_encoding_refuses(tmp_path, tokenizer):
    """An image whose aspect ratio the resize cannot take (300:1): --check-data names it up
    front with the DataError encoding would raise at its step."""
    image = str(tmp_path / "strip.png")
    tiny.write_image(image, np.zeros((1, 300, 3), dtype=np.uint8))
    sample = Sample("strip-1", "OCR", "Read.", "x", image=image)
    with pytest.raises(DataError) as encoding_error:
        encode_prompt(sample, tokenizer, VisualBudget())
    with pytest.raises(DataError) as check_error:
        check_media(sample, VisualBudget())
    assert str(check_error.value) == str(encoding_error.value) == "sample strip-1: aspect ratio must be below 200, got 1x300"


def test_missing_file_at_load(tmp_path, seed_bench_root):
    raw = rows(os.path.join(seed_bench_root, "annotations", "training_6k.jsonl"))
    with_video = next(r for r in raw if r["task_progress_metadata"])
    bad = dict(with_video, sample_id="gone", video_basename="gone.mp4")
    path = tmp_path / "training.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [raw[0], bad, raw[1]]))
    with pytest.raises(DataError, match="gone") as e:
        load_seed_bench_r1(str(path), seed_bench_root)
    assert "gone.mp4" in str(e.value) and f"{path}:2" in str(e.value)
    samples, skipped = load_seed_bench_r1(str(path), seed_bench_root, skip_bad=True)
    assert [s.sample_id for s in samples] == [raw[0]["sample_id"], raw[1]["sample_id"]] and len(skipped) == 1


def test_malformed_rows(video_r1_root):
    good = video_r1_rows()
    no_path = {k: v for k, v in good[1].items() if k != "path"}
    unknown = dict(good[2], problem_id=99, problem_type="essay")
    bad_dtype = dict(good[2], problem_id=98, data_type="audio")
    lines = [json.dumps(good[0]), "{not json", json.dumps(no_path), json.dumps(unknown), json.dumps(bad_dtype),
             json.dumps(good[4])]
    path = video_r1_root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{path}:2"):
        load_video_r1(str(path), str(video_r1_root))
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=f"{path}:2.*path"):
        load_samples(str(path), str(video_r1_root))
    path.write_text("\n".join(lines[:1] + lines[3:]) + "\n")
    with pytest.raises(DataError, match="99.*essay"):
        load_video_r1(str(path), str(video_r1_root))
    path.write_text("\n".join(lines) + "\n")
    samples, skipped = load_video_r1(str(path), str(video_r1_root), skip_bad=True)
    assert [s.sample_id for s in samples] == ["1", "5"] and len(skipped) == 4
    assert f"{path}:2" in skipped[0] and "path" in skipped[1] and "essay" in skipped[2] and "audio" in skipped[3]


def test_batch_runs_through_tiny_model(tiny_model_dir, seed_bench_root):
    # The real consumer: placeholder counts, grids and mm_token_type_ids must line up with the
    # vision features or Qwen2.5-VL raises.
    from transformers import AutoTokenizer

    import models
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = models.load_model(tiny_model_dir, "sdpa").eval()
    budget = budget_from_checkpoint(tiny_model_dir)
    samples, _ = load_samples(os.path.join(seed_bench_root, "annotations", "training_6k.jsonl"), seed_bench_root)
    samples = [next(s for s in samples if s.video), next(s for s in samples if not s.video)]
    batch = collate_prompts([encode_prompt(s, tok, budget) for s in samples], tok)
    batch.pop("sample_ids")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# Prompt layouts and the user's own template

MC_SAMPLE = Sample("x", "multiple choice", "Which colour?", "B", options=["A. red", "B. blue"])


def test_the_official_layout():
    """The public GRPO-CARE prompt: "Options:" right after the question mark, one option per line,
    a blank line, then the instruction and the answer-format line as one paragraph."""
    assert PromptTemplate("official").render(MC_SAMPLE) == (
        "Which colour?Options:\nA. red\nB. blue\n\n" + THINKING + " " + ANSWER_LINE["multiple choice"])
    assert PromptTemplate("official").render(Sample("y", "numerical", "How many?", "3")) == (
        "How many?\n" + THINKING + " " + ANSWER_LINE["numerical"])


def test_the_seed_bench_r1_layout():
    """SEED-Bench-R1's: the question, a newline, the options without a label, then one short
    instruction between spaces and no answer-format line."""
    assert PromptTemplate("seed-bench-r1").render(MC_SAMPLE) == f"Which colour?\nA. red\nB. blue\n {SHORT_THINKING} "


def test_our_layout_is_unchanged():
    assert PromptTemplate("ours").render(MC_SAMPLE) == (
        "Which colour?\nOptions:\nA. red\nB. blue\n" + THINKING + "\n" + ANSWER_LINE["multiple choice"])
    assert prompt_text(MC_SAMPLE) == PromptTemplate().render(MC_SAMPLE) and set(LAYOUTS) == {"ours", "official",
                                                                                            "seed-bench-r1"}


def test_a_template_file_of_the_users_own(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Q: {question}\n{options}Say {answer_format} {not a placeholder} {}\n")
    template = prompt_template(str(path))
    text = template.render(Sample("x", "multiple choice", "Which {options}?", "B", options=["A. red", "B. blue"]))
    # each placeholder filled once, the values never re-read, the final newline dropped
    assert text == ("Q: Which {options}?\nA. red\nB. blue\nSay " + ANSWER_LINE["multiple choice"]
                    + " {not a placeholder} {}")
    assert chat_prompt(MC_SAMPLE, template).endswith(template.render(MC_SAMPLE) + "<|im_end|>\n<|im_start|>assistant\n")


def test_a_json_template_words_each_problem_type_apart(tmp_path):
    """A .json template: its text for the sample's problem type, its own answer line where it
    gives one (ours elsewhere), no {options} needed for a type without options; a type it has
    no text for is a data error naming the sample."""
    import json

    from data import DataError
    path = tmp_path / "public.json"
    path.write_text(json.dumps({"template": {"multiple choice": "{question}Options:\n{options}\nGo. {answer_format}",
                                             "numerical": "{question}\nGo. {answer_format}"},
                                "answer_format": {"multiple choice": "Letter only."}}))
    template = prompt_template(str(path))
    mc = Sample("m", "multiple choice", "Which?", "B", options=["A. red", "B. blue"])
    num = Sample("n", "numerical", "How many?", "3")
    assert template.render(mc) == "Which?Options:\nA. red\nB. blue\n\nGo. Letter only."
    assert template.render(num) == "How many?\nGo. " + ANSWER_LINE["numerical"]
    with pytest.raises(DataError, match="sample o: .*no text for problem type 'OCR'"):
        template.render(Sample("o", "OCR", "Read it.", "abc"))


@pytest.mark.parametrize("doc,problem", [
    ("not json", "not valid JSON"),
    ('{"text": "{question}{options}"}', 'an object with "template"'),
    ('{"template": {"multiple choice": "{question}"}}', "no {options}"),
    ('{"template": {"numerical": "{Question}"}}', "unknown placeholder(s) {Question}"),
    ('{"template": {"essay": "{question}"}}', "template for 'essay': the problem types are"),
    ('{"template": "{question}{options}", "answer_format": "Letter."}', "answer_format must be an object"),
])
def test_a_bad_json_template_is_refused_in_one_line(tmp_path, doc, problem):
    path = tmp_path / "t.json"
    path.write_text(doc)
    with pytest.raises(ValueError, match=re.escape(problem)):
        prompt_template(str(path))


@pytest.mark.parametrize("text,problem", [
    ("{Question} {options}", "unknown placeholder(s) {Question}"),
    ("{question} only", "no {options}"),
    ("{options}", "no {question}"),
])
def test_a_bad_template_is_refused_in_one_line(tmp_path, text, problem):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(problem)):
        prompt_template(str(path))
    with pytest.raises(ValueError, match="neither a layout"):
        prompt_template(str(tmp_path / "missing.txt"))


def test_the_template_reaches_the_token_ids(tmp_path, tokenizer, seed_bench_root):
    samples, _ = load_samples(os.path.join(seed_bench_root, "annotations", "validation_L1.jsonl"), seed_bench_root)
    budget = VisualBudget(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56,
                          video_min_pixels=28 * 28, image_min_pixels=28 * 28)
    path = tmp_path / "t.txt"
    path.write_text("{options}{question} zebra")
    mine = encode_prompt(samples[0], tokenizer, budget, prompt_template(str(path)))["input_ids"].tolist()
    ours = encode_prompt(samples[0], tokenizer, budget)["input_ids"].tolist()
    assert mine != ours and tokenizer.decode(mine).count("zebra") == 1
    assert tokenizer.decode(mine).index("A. ") < tokenizer.decode(mine).index(samples[0].question.strip())
