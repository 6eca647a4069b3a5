"""A procedurally generated video benchmark in the SEED-Bench-R1 layout whose answers and whose
reasoning can both be checked by rule.

Each clip shows one shape (square, circle, triangle, cross) of one colour (red, green, blue,
yellow) sliding across a background in one direction (left, right, up, down). Questions are
4-way multiple choice about what is seen:

  level   questions               backgrounds
  train   colour (--kinds)        plain (four training colours)
  L1      colour (--kinds)        plain, the training ones        (same distribution)
  L2      colour (--kinds)        stripes and checks + pixel noise (new environments)
  L3      direction of motion     plain                            (a question type not trained on)

--kinds colour,shape asks about shape too. The experiment (run.py) trains on colour alone: its
2-layer language model learned to read colour off the clip in a short supervised warm-up, not
shape, though its vision features tell both (see the experiment's README).

Options are listed in one fixed order per question kind (VALUES), in training rows too (as
choice_a..d + golden_choice_idx, which the SEED-Bench-R1 loader takes as given), so the step
from a stated value to its option letter is a fixed map a tiny model learns in a short warm-up.
With --option-order shuffled (SEED-Bench-R1's own practice) that step is a lookup in the prompt,
which a 2- or 4-layer model did not learn in 1,500 warm-up steps: its consistency stayed at
chance, leaving nothing for the consistency bonus to keep.

The reasoning template states the one fact the question turns on ("The shape is red.", "The
shape is a circle.", "The shape moves left."), so rule_verdict can read which option a
reasoning leads to, and evaluate.py's consistency can be checked exactly instead of by a judge
model. Seeded: the same seed writes the same files.

    python experiments/synthetic/benchmark.py out/synthetic --train 3000 --val 300
"""

import argparse
import json
import os
import random
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tiny import seed_bench_options, write_image, write_video  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PLAIN = {"grey": (128, 128, 128), "light grey": (175, 175, 175), "dark grey": (70, 70, 70), "beige": (200, 190, 160)}
NEW_ENVIRONMENTS = ("stripes", "checks")
QUESTIONS = {"colour": "What colour is the moving shape?",
             "shape": "What shape moves in the video?",
             "direction": "In which direction does the shape move?"}
VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": tuple(DIRECTIONS)}
TRAINED_KINDS = ("colour",)
SIZE = 56   # frame height and width of the experiment's clips (a multiple of 28)


def budget(size=SIZE):
    """The visual budget the experiment trains, evaluates and diagnoses with: 8 frames (of which
    the frame rule keeps 4) and images at the benchmark's size, never resized."""
    return dict(max_frames=8, video_max_pixels=size * size, image_max_pixels=size * size,
                video_min_pixels=28 * 28, image_min_pixels=28 * 28)


def budget_flags(size=SIZE):
    """budget(size) as the flags of train.py, sft.py, evaluate.py and analyze.py."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in budget(size).items()]


def levels(kinds=TRAINED_KINDS):
    """The question kinds each split asks: the trained kinds, except L3 (direction)."""
    return {"train": tuple(kinds), "L1": tuple(kinds), "L2": tuple(kinds), "L3": ("direction",)}


def reasoning(kind, value):
    """The reasoning template: the one fact the answer follows from."""
    return {"colour": f"The shape is {value}.", "shape": f"The shape is a {value}.",
            "direction": f"The shape moves {value}."}[kind]


def rule_verdict(question, reasoning_text):
    """The option a reasoning leads to, read by rule: the last value of the asked attribute that
    the reasoning names, mapped to its option letter; "none" when it names none of them."""
    kind = next(k for k, q in QUESTIONS.items() if q in question)
    options = dict((text, letter) for letter, text in re.findall(r"^([A-D])\. (.+)$", question, re.MULTILINE))
    named = re.findall(r"\b(" + "|".join(VALUES[kind]) + r")\b", reasoning_text.lower())
    return options.get(named[-1], "none") if named else "none"


def shape_mask(shape, size):
    """[size, size] bool mask of the shape."""
    y, x = np.mgrid[0:size, 0:size]
    c, r = (size - 1) / 2, size / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= r ** 2
    if shape == "triangle":  # apex up
        return np.abs(x - c) <= y / 2
    third = size // 3  # cross
    return ((x >= third) & (x < size - third)) | ((y >= third) & (y < size - third))


def background(name, height, width, rng):
    if name in PLAIN:
        return np.broadcast_to(np.array(PLAIN[name], np.uint8), (height, width, 3)).copy()
    a, b = rng.choice(list(PLAIN), size=2, replace=False)
    y, x = np.mgrid[0:height, 0:width]
    first = (x // 7) % 2 == 0 if name == "stripes" else ((x // 7) + (y // 7)) % 2 == 0
    return np.where(first[..., None], np.array(PLAIN[a], np.uint8), np.array(PLAIN[b], np.uint8))


def clip(shape, colour, direction, bg, rng, n_frames=8, height=56, width=56, noise=0.0):
    """uint8 frames [T, H, W, 3]: the shape crossing the frame in `direction`, start to end."""
    size = height // 3
    dx, dy = DIRECTIONS[direction]
    base = background(bg, height, width, rng)
    across = int(rng.integers(0, (height if dx else width) - size))  # the fixed coordinate
    frames = np.repeat(base[None], n_frames, axis=0)
    mask = shape_mask(shape, size)
    for i in range(n_frames):
        step = i * ((width if dx else height) - size) // max(1, n_frames - 1)
        along = step if (dx + dy) > 0 else (width if dx else height) - size - step
        x, y = (along, across) if dx else (across, along)
        frames[i, y:y + size, x:x + size][mask] = COLOURS[colour]
    if noise:
        frames = np.clip(frames + rng.normal(0, noise, frames.shape), 0, 255).astype(np.uint8)
    return frames


def answer_fields(split, kind, answer, rng, option_order):
    """The row's options: VALUES' fixed order, or SEED-Bench-R1's (training negatives, which the
    loader shuffles in; validation choices shuffled here)."""
    if option_order == "shuffled":
        return seed_bench_options(split, answer, [v for v in VALUES[kind] if v != answer], rng)
    values = VALUES[kind]
    return {**{f"choice_{k}": v for k, v in zip("abcd", values)}, "golden_choice_idx": "ABCD"[values.index(answer)]}


def make_row(split, i, rng, media_root, n_frames, size, option_order="fixed", kinds=TRAINED_KINDS):
    asked = levels(kinds)[split]
    kind = asked[i % len(asked)]
    truth = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "direction": rng.choice(list(DIRECTIONS))}
    bg = rng.choice(NEW_ENVIRONMENTS) if split == "L2" else rng.choice(list(PLAIN))
    np_rng = np.random.default_rng(rng.randint(0, 2**31))
    frames = clip(truth["shape"], truth["colour"], truth["direction"], bg, np_rng, n_frames, size, size,
                  noise=12.0 if split == "L2" else 0.0)
    sid = f"{split.lower()}_{i:05d}"
    source = "synthetic_" + split.lower()
    write_video(os.path.join(media_root, "videos", source, f"{sid}.mp4"), frames)
    write_image(os.path.join(media_root, "images", source, f"{sid}.jpg"), frames[-1])
    answer = truth[kind]
    row = {"sample_id": sid, "question": QUESTIONS[kind] + "\n", "answer": answer, "task_progress_metadata": [{"step": 0}],
           "video_source": source, "video_basename": f"{sid}.mp4", "current_observation_basename": f"{sid}.jpg",
           "kind": kind, "background": bg, **{f"true_{k}": v for k, v in truth.items()}}
    row.update(answer_fields(split, kind, answer, rng, option_order))
    if split == "L3":
        row["domain"] = "horizontal" if truth["direction"] in ("left", "right") else "vertical"
    return row


def build(root, n_train=3000, n_val=300, seed=0, n_frames=8, size=56, option_order="fixed", kinds=TRAINED_KINDS):
    """Write annotations/training_6k.jsonl and validation_L{1,2,3}.jsonl with their videos and
    current-observation images (the last frame) under root; return root."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, filename, n in (("train", "training_6k.jsonl", n_train), ("L1", "validation_L1.jsonl", n_val),
                               ("L2", "validation_L2.jsonl", n_val), ("L3", "validation_L3.jsonl", n_val)):
        rng = random.Random(f"{seed}/{split}")
        with open(os.path.join(root, "annotations", filename), "w") as f:
            for i in range(n):
                f.write(json.dumps(make_row(split, i, rng, root, n_frames, size, option_order, kinds)) + "\n")
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=56, help="frame height and width, a multiple of 28")
    p.add_argument("--option-order", choices=("fixed", "shuffled"), default="fixed")
    p.add_argument("--kinds", default=",".join(TRAINED_KINDS), help="question kinds of train, L1 and L2 (colour, shape)")
    args = p.parse_args()
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= {"colour", "shape"}:
        p.error(f"--kinds: colour and/or shape, got {args.kinds}")
    print("wrote", build(args.out, args.train, args.val, args.seed, args.frames, args.size, args.option_order, kinds))


if __name__ == "__main__":
    main()
