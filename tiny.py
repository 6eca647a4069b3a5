"""Tiny, local stand-ins for the real things, for the tests, the demo, bench/ and experiments/
(top level so that all of them import it the same way, and `python tiny.py` builds them): a
byte-level BPE tokenizer with Qwen2.5-VL's special tokens (Qwen2-VL's are the same), a random
Qwen2.5-VL or Qwen2-VL checkpoint a few MB in size, and a synthetic dataset in the SEED-Bench-R1
layout (real mp4 videos, real jpg images, JSONL annotations).

Nothing here downloads anything. Tests and the demo use these so that every real code path
(tokenizer offsets, video decoding, 3D RoPE, generation, FSDP-free training) runs on a CPU.

    python tiny.py seed-bench out/tiny-seed-bench --train 32 --val 8
    python tiny.py model out/tiny-model [--warm-up out/tiny-seed-bench] [--family qwen2_vl]
    python tiny.py video-r1-eval out/tiny-video-r1 --n 10
"""

import argparse
import json
import os
import random

import numpy as np

# Qwen2.5-VL's special tokens, same spelling, so prompts look exactly like the real ones.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split. It lets a punctuation char glue onto the letters after it, so
# "<answer>A</answer>" pre-tokenizes as "<answer", ">A", "</", "answer", ">": exactly the
# merges that break "count tokens from the end" answer-span heuristics.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = ("the a an is are of to and in on with what which where who how many person hand "
         "kitchen table knife cup plate pan bowl door drawer bag box video image frame shows "
         "red green blue yellow white black square circle triangle moves left right up down "
         "next action step goal task progress current observation question options answer "
         "think first then so because therefore looking at we see can I the answer is "
         "pick put take open close wash cut stir pour place turn move hold").split()


def _corpus(n_lines=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        letter = rng.choice("ABCD")
        number = str(rng.randint(0, 999))
        lines.append(f"<think>{words}</think><answer>{letter}</answer>")
        lines.append(f"<think>\n{words}.\n</think>\n<answer>{number}</answer>")
        lines.append(f"{letter}. {words}\n")
    return lines


def build_tokenizer(vocab_size=512, extra_lines=()):
    """A byte-level BPE trained on a small synthetic corpus (plus extra_lines, e.g. the prompt's
    own instructions, so they take as few tokens as in a real vocabulary), wrapped as a HF fast
    tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus() + list(extra_lines), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def tiny_config(tokenizer, family="qwen2_5_vl", hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=2,
                init_std=None):
    """A tiny config of family (a models.FAMILIES key): the same text model and patch geometry
    in every family, each family's own vision tower. init_std = (text, vision): the std of the
    random initial weights (transformers' initializer_range, 0.02 when None)."""
    import models

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    # mrope splits the rotary half-dimension into (time, height, width) sections.
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    geometry = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=2, depth=vision_depth)
    if family == "qwen2_5_vl":  # window attention, SwiGLU blocks, positions spaced in seconds
        vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      tokens_per_second=2, window_size=112, fullatt_block_indexes=[vision_depth - 1], **geometry)
    elif family == "qwen2_vl":  # full attention, GELU blocks; hidden_size is the merger's output
        vision = dict(embed_dim=vision_hidden, mlp_ratio=2, hidden_size=hidden, **geometry)
    else:
        raise ValueError(f"tiny.py builds no {family!r} model (models.FAMILIES: {', '.join(models.FAMILIES)})")
    if init_std is not None:
        text["initializer_range"], vision["initializer_range"] = init_std
    config_class = models.family(family).model_class.config_class
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    if init_std is not None:
        config.initializer_range = init_std[0]
    return config


def build_model(out_dir, seed=0, tokenizer=None, family="qwen2_5_vl", **config_overrides):
    """Write a random tiny checkpoint of family (weights, config, tokenizer, preprocessor) to
    out_dir; tokenizer: build_tokenizer()'s by default. The preprocessor config is Qwen2.5-VL-7B's
    and Qwen2-VL-7B's (patch 14, merge 2, temporal patch 2, CLIP mean and std)."""
    import torch
    from transformers import GenerationConfig

    import models

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = models.family(family).model_class(tiny_config(tokenizer, family, **config_overrides))
    # Like the real checkpoint, ship near-greedy defaults: rollouts must never inherit them.
    # Like the real checkpoints, end a sequence at <|im_end|> or <|endoftext|>: rollouts stop at both.
    text = model.config.text_config
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.1, top_p=0.001, top_k=1,
                                               repetition_penalty=1.05, bos_token_id=text.bos_token_id,
                                               eos_token_id=[text.eos_token_id, text.pad_token_id],
                                               pad_token_id=text.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}, f, indent=2)
    return out_dir


# A random tiny model at transformers' initial scale (std 0.02) barely looks at its prompt: its
# attention is near uniform and the residual stream is its own token's embedding, so swapping the
# video, the image or the options moves a completion's log-probs by ~0.01 and its greedy tokens
# not at all, and no value a test compares can see a prompt or video mixed up. At std 0.3 (text)
# and 0.6 (vision) attention is sharp and the visual embeddings are large, and every part of the
# prompt moves the log-probs (tests/test_rollout.py measures by how much).
PROMPT_SENSITIVE_STD = (0.3, 0.6)


def build_prompt_sensitive_model(out_dir, seed=0, family="qwen2_5_vl"):
    """build_model with weights large enough that completions and log-probs depend clearly on
    the video, the image, the question and the options (PROMPT_SENSITIVE_STD)."""
    return build_model(out_dir, seed=seed, family=family, init_std=PROMPT_SENSITIVE_STD)


# ---------------------------------------------------------------------------------------------
# Synthetic media and a SEED-Bench-R1-layout dataset

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def write_video(path, frames, fps=4):
    """Write uint8 frames [T, H, W, 3] to an mp4 (mpeg4 codec, built into every ffmpeg)."""
    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    t, h, w, _ = frames.shape
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def moving_square_clip(colour, n_frames=8, height=56, width=84, seed=0):
    """A coloured square sliding left to right over a grey background."""
    rng = np.random.default_rng(seed)
    frames = np.full((n_frames, height, width, 3), 128, np.uint8)
    size = height // 3
    y = int(rng.integers(0, height - size))
    for i in range(n_frames):
        x = int(i * (width - size) / max(1, n_frames - 1))
        frames[i, y:y + size, x:x + size] = COLOURS[colour]
    return frames


# Wrong answers that training rows list besides the three other clip colours: real training rows
# list about 7 negatives, of which the loader draws 3, so tests see rows with more than 3.
EXTRA_NEGATIVES = ("purple", "orange", "white", "black")


def seed_bench_options(split, answer, others, rng, extra_negatives=()):
    """A row's answer fields in SEED-Bench-R1's layout: training rows list the wrong answers,
    others then extra_negatives (negative_answers; the loader draws 3 and shuffles them in),
    validation rows carry the four lettered choices (answer and others), shuffled with rng, and
    the right letter."""
    if split == "train":
        return {"negative_answers": list(others) + list(extra_negatives)}
    options = [answer] + others
    rng.shuffle(options)
    return {**{f"choice_{k}": o for k, o in zip("abcd", options)}, "golden_choice_idx": "ABCD"[options.index(answer)]}


def build_seed_bench(root, n_train=16, n_val=4, seed=0, n_frames=8):
    """A SEED-Bench-R1-shaped dataset: training_6k.jsonl, validation_L{1,2,3}.jsonl, videos/, images/,
    and training_with_cot_6k.jsonl: the training rows with a chain of thought in most (cot_fields).

    Each question asks for the colour of the square; the progress video shows it moving and the
    current-observation image shows its final position. About a quarter of the rows have no
    progress video (empty task_progress_metadata), as in the real data.
    """
    rng = random.Random(seed)
    ann = os.path.join(root, "annotations")
    os.makedirs(ann, exist_ok=True)
    domains = ["Daily life", "Hobbies", "Recreation", "Work"]
    sources = {"train": "epic_kitchens", "L1": "epic_kitchens", "L2": "ego4d", "L3": "ego4d"}

    def make_row(split, i):
        colour = rng.choice(list(COLOURS))
        source = sources[split]
        sid = f"{split.lower()}_{i:05d}"
        has_video = i % 4 != 3
        clip = moving_square_clip(colour, n_frames=n_frames, seed=rng.randint(0, 10**6))
        video_name, image_name = f"{sid}.mp4", f"{sid}.jpg"
        if has_video:
            write_video(os.path.join(root, "videos", source, video_name), clip)
        write_image(os.path.join(root, "images", source, image_name), clip[-1])
        others = [c for c in COLOURS if c != colour]
        row = {"sample_id": sid, "question": "What colour is the square that moves in the video?\n",
               "answer": colour, "task_progress_metadata": [{"step": 0}] if has_video else [],
               "video_source": source, "video_basename": video_name if has_video else "",
               "current_observation_basename": image_name}
        row.update(seed_bench_options(split, colour, others, rng, EXTRA_NEGATIVES))
        if split == "L3":
            row["domain"] = domains[i % len(domains)]
            row["task_goal"] = "find the moving square"
        return row

    splits = {"training_6k.jsonl": ("train", n_train)}
    splits.update({f"validation_{lv}.jsonl": (lv, n_val) for lv in ("L1", "L2", "L3")})
    written = {}
    for filename, (split, n) in splits.items():
        written[split] = [make_row(split, i) for i in range(n)]
        with open(os.path.join(ann, filename), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in written[split])
    with open(os.path.join(ann, "training_with_cot_6k.jsonl"), "w") as f:
        f.writelines(json.dumps({**row, **cot_fields(i, row["answer"])}) + "\n"
                     for i, row in enumerate(written["train"]))
    return root


# sft.py's --reasoning-field default: the field holding a training row's chain of thought.
COT_FIELD = "response"


def cot_fields(i, colour):
    """Training row i's chain of thought in training_with_cot_6k.jsonl, in each form sft.py
    reads: plain text; a whole reply whose <think> part is the reasoning; and no reasoning at
    all (the field missing, null or blank), which trains on the answer alone."""
    kind = i % 3
    if kind == 0:
        return {COT_FIELD: f"Looking at the video, the square that moves is {colour}."}
    if kind == 1:
        return {COT_FIELD: f"<think>Let me think: the moving square is {colour}.</think> <answer>A</answer>"}
    return [{}, {COT_FIELD: None}, {COT_FIELD: " "}][i // 3 % 3]


def build_video_r1_eval(root, n=10, seed=0, n_frames=8):
    """A Video-R1-style evaluation file, DIR/eval_tiny.json (the shape of VSI-Bench, MVBench,
    VideoMME, ... eval files): every problem type in turn, videos and images alternating."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        clip = moving_square_clip(colour, n_frames=n_frames, seed=rng.randint(0, 10**6))
        kind = "video" if i % 2 == 0 else "image"
        path = f"{kind}s/{i:04d}." + ("mp4" if kind == "video" else "jpg")
        if kind == "video":
            write_video(os.path.join(root, path), clip)
        else:
            write_image(os.path.join(root, path), clip[-1])
        ptype = ("multiple choice", "numerical", "OCR", "free-form", "regression")[i % 5]
        row = {"problem_id": i, "data_type": kind, "problem_type": ptype, "path": path, "data_source": "tiny"}
        if ptype == "multiple choice":
            options = [colour] + [c for c in COLOURS if c != colour][:3]
            rng.shuffle(options)
            row.update(problem="What colour is the square?", options=[f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)],
                       solution=f"<answer>{'ABCD'[options.index(colour)]}</answer>")
        else:
            question, answer = {"numerical": ("How many squares are there?", "1"),
                                "OCR": ("What text is written on the square?", "no text"),
                                "free-form": ("Describe what the square does.", f"the {colour} square moves"),
                                "regression": ("How many pixels wide is the square?", "12")}[ptype]
            row.update(problem=question, options=[], solution=f"<answer>{answer}</answer>")
        rows.append(row)
    with open(os.path.join(root, "eval_tiny.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return root


def supervised_loss(model, tokenizer, encoded, targets):
    """Mean cross-entropy of each target text after its prompt (prompt tokens are not learned).
    Prompts are left-padded as for generation, targets right-padded, so one batch holds both."""
    import torch

    import encoding

    batch = encoding.collate_prompts(encoded, tokenizer)
    batch.pop("sample_ids")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    tail = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_token_id, dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for i, t in enumerate(ids):
        tail[i, :len(t)] = torch.tensor(t)
        tail_mask[i, :len(t)] = 1
    n = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], tail_mask], dim=1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :n] = -100  # learn the completion only
    return model(**batch, labels=labels).loss


def warm_up(model_dir, annotation_file, data_root, steps=300, lr=3e-3, seed=0, **budget):
    """Teach a random tiny checkpoint the output format, in place, with a few supervised steps.

    Targets are "<think>the square is <colour></think><answer><letter></answer>" with a random
    colour and letter: the model learns the format but not the answer, so RL starts from
    formatted answers at about chance accuracy, where rewards, advantages and CARE's bonus are
    all non-trivial. Uses the real prompt path (encoding.encode_prompt with video and image)."""
    import torch
    from transformers import AutoTokenizer

    import data
    import encoding
    import models

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = models.load_model(model_dir)
    samples, _ = data.load_samples(annotation_file, data_root, seed=seed)
    vb = encoding.budget_from_checkpoint(model_dir, **budget)
    encoded = [encoding.encode_prompt(s, tokenizer, vb) for s in samples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        enc = rng.choice(encoded)
        target = (f"<think>the square is {rng.choice(list(COLOURS))}</think>"
                  f"<answer>{rng.choice('ABCD')}</answer><|im_end|>")
        supervised_loss(model, tokenizer, [enc], [target]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


def main():
    import models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="write a tiny random Qwen2.5-VL (or Qwen2-VL) checkpoint")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--family", choices=list(models.FAMILIES), default="qwen2_5_vl",
                   help="the model family, as config.json's model_type spells it")
    m.add_argument("--warm-up", metavar="DATA_ROOT", default=None,
                   help="teach the output format on DATA_ROOT/annotations/training_6k.jsonl (see warm_up)")
    d = sub.add_parser("seed-bench", help="write a synthetic SEED-Bench-R1-layout dataset")
    d.add_argument("out")
    d.add_argument("--train", type=int, default=16)
    d.add_argument("--val", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("video-r1-eval", help="write a synthetic Video-R1-style evaluation file with its media")
    v.add_argument("out")
    v.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    if args.what == "model":
        build_model(args.out, seed=args.seed, family=args.family)
        if args.warm_up:
            ann = os.path.join(args.warm_up, "annotations", "training_6k.jsonl")
            warm_up(args.out, ann, args.warm_up, seed=args.seed, max_frames=4, video_max_pixels=56 * 56,
                    image_max_pixels=56 * 56, video_min_pixels=28 * 28, image_min_pixels=28 * 28)
        print("wrote", args.out)
    elif args.what == "seed-bench":
        print("wrote", build_seed_bench(args.out, n_train=args.train, n_val=args.val, seed=args.seed))
    else:
        print("wrote", build_video_r1_eval(args.out, n=args.n))


if __name__ == "__main__":
    main()
