"""GRPO versus GRPO-CARE at toy scale, on a CPU: does GRPO gain accuracy, does its reasoning
drift from its answers, and does the consistency bonus keep them in agreement beyond what
dropping the KL term does, as the paper's ablation reports at 7B? (README.md here has the
results and how to read them.)

    python experiments/synthetic/run.py                  # the default run: 3 seeds
    python experiments/synthetic/run.py --seeds 3,4      # adds seeds 3 and 4 to OUT/results.json
    python experiments/synthetic/run.py --sweep-lrs 1e-4,3e-4,1e-3 --seeds 0   # the lr sweep
    python experiments/synthetic/run.py --smoke          # a handful of steps (the CI test)

Once: the benchmark (benchmark.py) and a tiny random Qwen2.5-VL (tiny.py) whose vision tower
alone is pretrained on fresh clips, decoded exactly as training decodes them, to tell colour,
shape and direction apart: the stand-in for a pretrained encoder, shared by every seed, with a
held-out linear probe of what its features tell. Then per seed:
  1. warm-up (supervised, the whole model): "<think>The shape is red.</think><answer>A</answer>",
     describing clips of the known values (red and green) truly and the others by a value at
     random, and answering the stated value's letter with probability letter_follows (0.75):
     the warm model reads half the colours and guesses the rest, and its answer mostly, not
     always, follows its reasoning, so the letter can learn to follow the stated fact (the
     consistent route) or to read the clip directly (the shortcut). Each warm model is checked
     (warm_problems) and refused if at chance, inconsistent or collapsed onto one answer; the
     next warm-up seed is then tried, and every try is reported;
  2. the supervised ceiling: the same warm-up on true, consistent answers (run "ceiling");
  3. sft.py from the warm model on the true chains of thought ("The shape is red." and the
     right letter), as many examples as an RL run's prompts (steps x prompts), at the RL
     learning rate (run "sft": SEED-Bench-R1's SFT baseline at toy scale);
  4. train.py from the warm model, one run per arm of ALGOS (GRPO with and without its KL,
     CARE with an EMA, a frozen and a text-only reference): same data, steps, seed, learning
     rate and sampling seeds; everything else train.py's defaults (the official recipe);
  5. evaluate.py on L1/L2/L3 for each model, with benchmark.py's rule_verdict as the
     consistency judge (exact, no judge model), and analyze.py attention: the share of the
     generated tokens' attention on the video and image tokens.
Then OUT/results.json and results.md (mean and spread over seeds, every seed's numbers, the
differences the reading rests on, and the bonus diagnostics of each CARE arm over training) and
OUT/curves.png (accuracy, rule-checked consistency, bonus rate, reference confidence and
zero-advantage groups of the training rollouts against step). A step whose output exists is
skipped, so an interrupted run picks up where it stopped; each command is printed and logged
under OUT/. Seeds already in OUT/results.json and not run again are kept (add_earlier_seeds).
"""

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import benchmark  # noqa: E402
import diagnose  # noqa: E402
from benchmark import budget, budget_flags  # noqa: E402,F401  (the visual budget every command gets)

# The RL runs and their train.py flags, the paper's ablation (GRPO-CARE Table 3) and two more:
#   grpo         GRPO with its KL (beta 0.04) to the frozen warm model;
#   grpo_nokl    the same with the KL term removed (beta 0): what dropping the KL alone does;
#   care         GRPO-CARE (EMA reference, no KL): care - grpo_nokl is the bonus's own effect;
#   care_frozen  CARE with a frozen reference (--ema-decay 1.0, the public code's effective
#                behaviour): frozen - EMA isolates the reference's drift towards the policy;
#   care_text    CARE whose EMA reference reads the question, options and reasoning but not the
#                clip (--reference-input text): it cannot find an answer likely from the clip.
ALGOS = {"grpo": ["--algo", "grpo"], "grpo_nokl": ["--algo", "grpo", "--beta", "0"], "care": ["--algo", "care"],
         "care_frozen": ["--algo", "care", "--ema-decay", "1.0"],
         "care_text": ["--algo", "care", "--reference-input", "text"]}
CARE_ARMS = tuple(a for a, flags in ALGOS.items() if "care" in flags)
RUNS = ("warm", "ceiling", "sft") + tuple(ALGOS)   # ceiling: the warm-up's recipe on true answers
LABELS = {"warm": "warm-up", "ceiling": "SFT ceiling", "sft": "SFT", "grpo": "GRPO", "grpo_nokl": "GRPO, no KL",
          "care": "GRPO-CARE", "care_frozen": "CARE, frozen ref.", "care_text": "CARE, text-only ref."}
# The differences the reading rests on: (run, minus run, label), each taken per seed.
DIFFS = (("grpo", "warm", "GRPO - warm"), ("sft", "grpo", "SFT - GRPO"), ("care", "grpo_nokl", "CARE - noKL"),
         ("grpo_nokl", "grpo", "noKL - GRPO"), ("care", "grpo", "CARE - GRPO"), ("care_frozen", "care", "frozen - EMA"),
         ("care_text", "care", "text - full"))
LEVELS = ("L1", "L2", "L3")
ATTRIBUTES = ("colour", "shape", "direction")


@dataclass
class Settings:
    out: str = "out/synthetic"
    seeds: str = "0,1,2"
    jobs: int = 1                 # seeds run at once; each process gets cpu_count // jobs threads
    # benchmark
    n_train: int = 3000
    n_val: int = 200
    frames: int = 8
    size: int = benchmark.SIZE    # frame height and width
    kinds: str = "colour"         # the question kinds trained on (and asked in L1, L2)
    # the vision tower's pretraining (once, shared by every seed: the "pretrained encoder")
    vision_steps: int = 800
    vision_lr: float = 2e-3
    probe_clips: int = 512        # held-out clips for the linear probe (half fit, half test)
    # warm-up (supervised, from the pretrained encoder): a partly grounded, mostly consistent start
    warm_up_steps: int = 1500
    warm_up_batch: int = 8
    warm_up_lr: float = 2e-3
    known: str = "red,green"      # clips of these values are described truly in the warm-up, others at random
    letter_follows: float = 0.75  # the answer is the stated value's letter this often, else another one
    warm_tries: int = 3           # warm-ups tried per seed until one passes warm_problems
    # RL: the same budget for both algorithms
    steps: int = 1000
    prompts: int = 4
    generations: int = 8
    completion_length: int = 32
    lr: float = 3e-4
    ema_every: int = 10
    # evaluation
    eval_batch: int = 16
    attention_levels: str = "L1,L2,L3"   # levels analyze.py attention reads


# A few questions and steps: checks that every piece runs and the outputs are written.
SMOKE = dict(seeds="0", jobs=1, n_train=16, n_val=4, size=56, vision_steps=2, probe_clips=16, warm_up_steps=3,
             warm_up_batch=2, warm_tries=1, steps=2, prompts=2, generations=4, completion_length=24, eval_batch=4,
             attention_levels="L1")


# ---------------------------------------------------------------------------------------------
# The vision tower: pretrained once on fresh clips, then probed


def decoded_clip(truth, bg, np_rng, visual_budget, size, tmp):
    """A fresh clip through the benchmark's own path: written as mp4, then decoded and sampled
    by encoding.read_video (4 of 8 frames at the default budget), exactly as training sees it."""
    import encoding
    import tiny

    frames = benchmark.clip(truth["shape"], truth["colour"], truth["direction"], bg, np_rng, 8, size, size)
    tiny.write_video(tmp, frames)
    return encoding.read_video(tmp, visual_budget)[0]


def clip_batch(n, rng, np_rng, visual_budget, size, tmp):
    """(pixel patches, grids, labels [n, attributes]) of n fresh clips on plain backgrounds."""
    import torch

    import encoding

    pixels, grids, labels = [], [], []
    for _ in range(n):
        truth = {k: rng.choice(benchmark.VALUES[k]) for k in ATTRIBUTES}
        frames = decoded_clip(truth, rng.choice(list(benchmark.PLAIN)), np_rng, visual_budget, size, tmp)
        p, g = encoding.patchify_frames(frames, visual_budget.video_min_pixels, visual_budget.video_max_pixels, visual_budget)
        pixels.append(p)
        grids.append(g)
        labels.append([benchmark.VALUES[k].index(truth[k]) for k in ATTRIBUTES])
    return torch.cat(pixels), torch.stack(grids), torch.tensor(labels)


def pooled_features(model, pixels, grids):
    """[n, hidden]: the vision tower's output tokens of each clip, averaged."""
    import torch

    out = model.model.get_video_features(pixels, grids)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack([f.mean(0) for f in feats])


def pretrain_vision(model, steps, batch, lr, seed, visual_budget, size, tmp):
    """Stand-in for a pretrained vision encoder: train the vision tower alone (with a linear
    head that is then thrown away) to tell colour, shape and direction apart on fresh clips that
    are not in the benchmark. The language model is untouched."""
    import numpy as np
    import torch

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 4 * len(ATTRIBUTES))
    optimizer = torch.optim.AdamW(list(model.model.visual.parameters()) + list(head.parameters()), lr=lr)
    for step in range(steps):
        pixels, grids, labels = clip_batch(batch, rng, np_rng, visual_budget, size, tmp)
        logits = head(pooled_features(model, pixels, grids)).view(batch, len(ATTRIBUTES), 4)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"vision step {step}: loss {loss.item():.3f}", flush=True)


def probe(model, n_clips, seed, visual_budget, size, tmp):
    """Held-out linear probe: what the frozen vision features tell of each attribute. A fresh
    linear classifier per attribute is fitted on half of n_clips new clips and scored on the
    other half; returns {attribute: test accuracy}."""
    import numpy as np
    import torch

    rng, np_rng = random.Random(f"probe-{seed}"), np.random.default_rng(10_000 + seed)
    with torch.no_grad():
        feats, labels = [], []
        for _ in range(0, n_clips, 32):
            pixels, grids, y = clip_batch(32, rng, np_rng, visual_budget, size, tmp)
            feats.append(pooled_features(model, pixels, grids))
            labels.append(y)
    x, y = torch.cat(feats), torch.cat(labels)                 # [n, hidden], [n, attributes]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    half = len(x) // 2
    accuracy = {}
    for a, name in enumerate(ATTRIBUTES):
        head = torch.nn.Linear(x.shape[1], 4)
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[:half]), y[:half, a]) + 1e-3 * head.weight.square().sum()
            loss.backward()
            return loss
        optimizer.step(closure)
        with torch.no_grad():
            accuracy[name] = (head(x[half:]).argmax(-1) == y[half:, a]).float().mean().item()
    return accuracy


def match_text_scale(model, visual_budget, size):
    """Scale the vision tower's last layer so its output tokens have the norm of the language
    model's token embeddings (as a real VLM's merger does): the pretraining head drives the
    norm up (about 40 against 0.16 after 800 steps), and at that size the 2-layer language model
    of the warm-up learned nothing from its context (not even the answer letter that follows
    the stated fact). A linear rescale leaves what the probe reads unchanged. Returns the factor."""
    import tempfile

    import numpy as np
    import torch

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        pixels, grids, _ = clip_batch(32, random.Random(1), np.random.default_rng(1), visual_budget, size,
                                      os.path.join(tmp, "clip.mp4"))
        out = model.model.get_video_features(pixels, grids)
        tokens = torch.cat(list(out.pooler_output if hasattr(out, "pooler_output") else out))   # [n, hidden]
        text = model.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
        scale = (text / tokens.norm(dim=-1).mean()).item()
        last = model.model.visual.merger.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return scale


def toy_tokenizer():
    """tiny.py's byte-level BPE, with 1,024 tokens learned also from the prompt's own text (the
    system message, the thinking instruction, the answer line, the questions and the template).
    With the default 512 tokens the prompt is 357 tokens long, of which 12 are the clip's, and
    the 2-layer language model never learned to read the clip in the warm-up (a stated fact at
    chance after 800 steps): a real vocabulary writes the instruction in far fewer tokens."""
    import encoding
    import tiny

    lines = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
             "<|im_end|>\n<|im_start|>assistant\n", encoding.THINKING, encoding.ANSWER_LINE["multiple choice"]]
    lines += [q + "\nOptions:\n" + "".join(f"{'ABCD'[i]}. {v}\n" for i, v in enumerate(benchmark.VALUES[k]))
              for k, q in benchmark.QUESTIONS.items()]
    lines += [f"<think>{benchmark.reasoning(k, v)}</think><answer>{x}</answer>" for k in benchmark.VALUES
              for v in benchmark.VALUES[k] for x in "ABCD"]
    return tiny.build_tokenizer(vocab_size=1024, extra_lines=lines * 20)


def main_vision(argv):
    """`run.py vision ...`: a tiny random Qwen2.5-VL whose vision tower is pretrained, written
    to --model, and the held-out probe of its features before and after, to --model/probe.json."""
    import tempfile

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import encoding
    import tiny

    p = argparse.ArgumentParser(prog="run.py vision")
    p.add_argument("--model", required=True, help="where the checkpoint goes")
    p.add_argument("--steps", type=int, default=Settings.vision_steps, help="pretraining steps of 32 clips")
    p.add_argument("--lr", type=float, default=Settings.vision_lr, help="AdamW learning rate")
    p.add_argument("--probe-clips", type=int, default=Settings.probe_clips, help="held-out clips for the probe")
    p.add_argument("--size", type=int, default=Settings.size, help="frame height and width")
    args = p.parse_args(argv)
    tiny.build_model(args.model, seed=0, tokenizer=toy_tokenizer())
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model)
    visual_budget = encoding.budget_from_checkpoint(args.model, **budget(args.size))
    with tempfile.TemporaryDirectory() as tmp:
        clip_file = os.path.join(tmp, "clip.mp4")
        before = probe(model, args.probe_clips, 0, visual_budget, args.size, clip_file)
        pretrain_vision(model, args.steps, 32, args.lr, 0, visual_budget, args.size, clip_file)
        after = probe(model, args.probe_clips, 0, visual_budget, args.size, clip_file)
    scale = match_text_scale(model, visual_budget, args.size)
    print("probe accuracy (held-out clips): " + ", ".join(f"{k} {before[k]:.2f} -> {after[k]:.2f}" for k in ATTRIBUTES))
    model.save_pretrained(args.model)
    with open(os.path.join(args.model, "probe.json"), "w") as f:
        json.dump({"steps": args.steps, "clips": args.probe_clips, "before": before, "after": after,
                   "output_scale": scale}, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Warm-up: the format, the template and a partial, mostly consistent reading of the video


def warm_up_pool(samples, truths, rng):
    """One warm-up prompt per training clip, each asking about colour, shape or direction (the
    warm model knows the template of every kind, as a pretrained model would, though RL trains
    on only some; with colour alone in the pool the 2-layer model never learned the answer's
    link to the stated fact), options in the benchmark's fixed order. Returns (sample, kind,
    options, the clip's true value)."""
    pool = []
    for s in samples:
        kind = rng.choice(ATTRIBUTES)
        options = list(benchmark.VALUES[kind])
        pool.append((dataclasses.replace(s, question=benchmark.QUESTIONS[kind],
                                         options=[f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]),
                     kind, options, truths[s.sample_id][kind]))
    return pool


def warm_up_target(kind, options, truth, rng, known, letter_follows):
    """The reasoning states the clip's true value when it is one of `known`, else a value drawn
    from all four; the answer is the stated value's letter with probability letter_follows,
    else one of the other three letters. So the warm model reads the known values off the clip
    and guesses the rest, and its answer mostly, not always, follows its reasoning. known = every
    value and letter_follows = 1 give the true, consistent targets of the supervised ceiling."""
    stated = truth if truth in known else rng.choice(options)
    i = options.index(stated)
    letter = i if rng.random() < letter_follows else rng.choice([j for j in range(len(options)) if j != i])
    return f"<think>{benchmark.reasoning(kind, stated)}</think><answer>{'ABCD'[letter]}</answer><|im_end|>"


def warm_up(model_dir, data_root, steps, batch, lr, seed, size, known, letter_follows):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    import encoding
    import tiny

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    samples, truths = training_samples(data_root, seed)
    pool = warm_up_pool(samples[:steps * batch], truths, rng)
    visual_budget = encoding.budget_from_checkpoint(model_dir, **budget(size))
    encoded = [encoding.encode_prompt(s, tokenizer, visual_budget) for s, *_ in pool]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)   # the whole model, vision too
    model.train()
    for step in range(steps):
        picks = [rng.randrange(len(pool)) for _ in range(batch)]
        targets = [warm_up_target(*pool[i][1:], rng, known, letter_follows) for i in picks]
        loss = tiny.supervised_loss(model, tokenizer, [encoded[i] for i in picks], targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"warm-up step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(model_dir)
    return model_dir


def training_samples(data_root, seed):
    """The benchmark's training samples and {sample_id: {attribute: true value}} of their clips."""
    import data

    path = os.path.join(data_root, "annotations", "training_6k.jsonl")
    samples, _ = data.load_samples(path, data_root, seed=seed)
    with open(path) as f:
        truths = {r["sample_id"]: {k: r[f"true_{k}"] for k in ATTRIBUTES} for r in map(json.loads, f)}
    return samples, truths


def main_warm_up(argv):
    """`run.py warm-up ...`: the pretrained --vision checkpoint, warmed up, written to --model."""
    import shutil

    p = argparse.ArgumentParser(prog="run.py warm-up")
    p.add_argument("--vision", required=True, help="the checkpoint with the pretrained vision tower (run.py vision)")
    p.add_argument("--model", required=True, help="where the warmed-up checkpoint goes")
    p.add_argument("--data-root", required=True, help="the benchmark")
    p.add_argument("--seed", type=int, default=0, help="the warm-up's data order and targets")
    p.add_argument("--size", type=int, default=Settings.size, help="frame height and width")
    p.add_argument("--steps", type=int, default=Settings.warm_up_steps, help="supervised steps")
    p.add_argument("--batch", type=int, default=Settings.warm_up_batch, help="examples per step")
    p.add_argument("--lr", type=float, default=Settings.warm_up_lr, help="AdamW learning rate")
    p.add_argument("--known", default=Settings.known, help="values described truly (comma-separated, or all); "
                                                          "see warm_up_target")
    p.add_argument("--letter-follows", type=float, default=Settings.letter_follows, help="see warm_up_target")
    args = p.parse_args(argv)
    shutil.rmtree(args.model, ignore_errors=True)
    shutil.copytree(args.vision, args.model)
    warm_up(args.model, args.data_root, args.steps, args.batch, args.lr, args.seed, args.size,
            known_values(args.known), args.letter_follows)
    open(os.path.join(args.model, "warm.done"), "w").close()


def known_values(text):
    """--known: comma-separated values, or all."""
    return {v for k in ATTRIBUTES for v in benchmark.VALUES[k]} if text == "all" else set(text.split(","))


def warm_problems(summary, predictions, truths=None, known=()):
    """Why a warm model is no start for the experiment (empty: it is): L1 accuracy at chance,
    reasoning and answer agreeing no more than chance, one answer for every question, or (with
    truths = {sample_id: true answer} of L1) a known value it reads on fewer than 80% of its
    clips: it has not learnt what the warm-up taught."""
    from collections import Counter, defaultdict

    l1 = summary["results"]["L1"]
    rows = [p for p in predictions if p.get("level") == "L1"]
    letters = Counter(p["stated"] for p in rows)
    top = max(letters.values()) / max(1, sum(letters.values())) if letters else 1.0
    problems = []
    if l1["accuracy"] < 35:
        problems.append(f"L1 accuracy {l1['accuracy']:.1f}% is near chance (25%)")
    if (l1["consistency"] or 0) < 50:
        problems.append(f"L1 consistency {l1['consistency'] or 0:.1f}% is near chance")
    if top > 0.9:
        problems.append(f"{top:.0%} of L1 answers are one letter")
    by_value = defaultdict(list)
    for p in rows:
        if truths and truths.get(p["sample_id"]) in known:
            by_value[truths[p["sample_id"]]].append(p["score"])
    for value, scores in sorted(by_value.items()):
        if sum(scores) / len(scores) < 0.8:
            problems.append(f"reads {value} on {sum(scores) / len(scores):.0%} of its L1 clips")
    return problems


# ---------------------------------------------------------------------------------------------
# Reading the runs


def stated_and_verdict(question, completion, letters):
    """(the option the completion answers, the option its reasoning leads to by rule); the
    first is None when it answers no option."""
    import judge
    import rewards
    stated = judge.as_letter(rewards.extract_answer(completion), letters)
    return (stated if stated in letters else None), benchmark.rule_verdict(question, judge.reasoning_of(completion))


def training_curves(run_dir, questions):
    """Per step, from the training rollouts: accuracy, rule-checked consistency (of the
    completions that answer an option), bonus rate, mean reference confidence, and the
    zero-advantage rate (groups whose completions all score the same: no gradient)."""
    import judge
    per_step = {}
    with open(os.path.join(run_dir, "completions.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            question = questions[r["sample_id"]]
            stated, verdict = stated_and_verdict(question, r["completion"], judge.OPTION_RE.findall(question))
            s = per_step.setdefault(r["step"], {"n": 0, "correct": 0.0, "answered": 0, "consistent": 0})
            s["n"] += 1
            s["correct"] += r["accuracy"]
            if stated is not None:
                s["answered"] += 1
                s["consistent"] += stated == verdict
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = {r["step"]: r for r in map(json.loads, f)}
    steps = sorted(per_step)
    return {"step": steps,
            "accuracy": [per_step[k]["correct"] / per_step[k]["n"] for k in steps],
            "consistency": [per_step[k]["consistent"] / max(1, per_step[k]["answered"]) for k in steps],
            "bonus_rate": [log[k]["bonus_rate"] for k in steps],
            "ref_conf": [log[k]["ref_conf"] for k in steps],
            "zero_advantage_rate": diagnose.zero_advantage_rate(os.path.join(run_dir, "completions.jsonl"))[
                "zero_advantage_rate"]}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def read_eval(eval_dir):
    """An evaluation's summary.json, with one more metric per level read from its
    predictions: correct_inconsistent, the % of answers that are right while their reasoning
    leads to another option (the answer did not come from the reasoning: a shortcut or luck)."""
    summary = json.load(open(os.path.join(eval_dir, "summary.json")))
    rows = [json.loads(line) for line in open(os.path.join(eval_dir, "predictions.jsonl"))]
    for level, entry in summary["results"].items():
        picked = [r for r in rows if level == "all" or r.get("level") == level]
        if level in ("all",) + LEVELS and picked:
            entry["correct_inconsistent"] = 100 * sum(r["score"] == 1 and r.get("consistent") is False
                                                      for r in picked) / len(picked)
    return summary


METRICS = ("accuracy", "consistency", "correct_inconsistent", "visual_attention_reasoning",
           "visual_attention_answer")   # the last two: % of the generated tokens' attention on video + image


def results_table(evals, seeds, runs=RUNS):
    """{run: {level: {metric: {mean, std, per_seed}}}} from the eval summaries (read_eval)."""
    table = {}
    for model in runs:
        table[model] = {}
        for level in ("all",) + LEVELS:
            row = {}
            for metric in METRICS:
                per_seed = [evals[(seed, model)]["results"][level].get(metric) for seed in seeds]
                mean, std = mean_std(per_seed)
                row[metric] = {"mean": mean, "std": std, "per_seed": per_seed}
            table[model][level] = row
    return table


def diff_cell(table, a, b, level, metric):
    """{mean, std, per_seed} of run a minus run b, seed by seed (seeds where both have a value)."""
    per_seed = [None if None in (x, y) else x - y
                for x, y in zip(table[a][level][metric]["per_seed"], table[b][level][metric]["per_seed"])]
    mean, std = mean_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def cell(x):
    return "-" if x["mean"] is None else f"{x['mean']:.1f} ± {x['std']:.1f}"


def markdown(table, seeds, settings):
    """The mean ± std table of every run and difference, then one table per level with every
    seed's accuracy and consistency, and the differences seed by seed."""
    lines = [f"Mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"{settings.steps} RL steps of {settings.prompts} prompts x {settings.generations} completions at lr "
             f"{settings.lr:g}; {settings.n_val} questions per level; consistency judged by rule. SFT ceiling: the "
             f"warm-up's recipe on true, consistent answers; SFT: sft.py from the warm model on the true chains of "
             f"thought, {settings.steps * settings.prompts} examples (as many as an RL run's prompts). "
             f"correct_inconsistent: % of answers right while their reasoning leads to another option. "
             f"visual_attention: % of the generated tokens' attention on the video and image tokens "
             f"(analyze.py attention, mean over layers).", "",
             "| level | metric | " + " | ".join(LABELS[m] for m in RUNS) + " | " + " | ".join(d[2] for d in DIFFS) + " |",
             "| --- | --- |" + " ---: |" * (len(RUNS) + len(DIFFS))]
    for level in LEVELS + ("all",):
        for metric in METRICS:
            cells = [table[m][level][metric] for m in RUNS]
            if all(c["mean"] is None for c in cells):  # e.g. attention, which is read per level only
                continue
            diffs = [diff_cell(table, a, b, level, metric) for a, b, _ in DIFFS]
            lines.append(f"| {level} | {metric} (%) | " + " | ".join(map(cell, cells)) + " | " +
                         " | ".join(map(cell, diffs)) + " |")
    lines += ["", "Per seed, accuracy / consistency (%):", ""]
    for level in LEVELS:
        lines += [f"| {level} seed | " + " | ".join(LABELS[m] for m in RUNS) + " | " + " | ".join(d[2] for d in DIFFS)
                  + " |", "| ---: |" + " ---: |" * (len(RUNS) + len(DIFFS))]
        for k, seed in enumerate(seeds):
            pair = lambda x, y: "-" if None in (x, y) else f"{x:.1f} / {y:.1f}"
            runs = [pair(table[m][level]["accuracy"]["per_seed"][k], table[m][level]["consistency"]["per_seed"][k])
                    for m in RUNS]
            diffs = [pair(diff_cell(table, a, b, level, "accuracy")["per_seed"][k],
                          diff_cell(table, a, b, level, "consistency")["per_seed"][k]) for a, b, _ in DIFFS]
            lines.append(f"| {seed} | " + " | ".join(runs + diffs) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


BONUS_WINDOW = 100   # steps per window of the bonus diagnostics


def bonus_table(bonus, seeds):
    """Markdown: per CARE run and window of training steps, the right answers' mean reference
    confidence and bonus rate, consistent against inconsistent, averaged over the seeds that
    have such answers in the window (n: their total count)."""
    lines = [f"Right answers in the training rollouts, per window of {BONUS_WINDOW} steps, consistent (c) against "
             "inconsistent (i): mean reference confidence and share given the bonus, averaged over seeds "
             "(`diagnose.py bonus`; n summed over seeds).", "",
             "| run | steps | n c | n i | ref_conf c | ref_conf i | bonus c | bonus i |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in CARE_ARMS:
        windows = [bonus[f"seed{seed}/{arm}"] for seed in seeds if f"seed{seed}/{arm}" in bonus]
        for k in range(len(windows[0]) if windows else 0):
            row = []
            for field in ("n", "ref_conf", "bonus_rate"):
                for kind in ("consistent", "inconsistent"):
                    xs = [w[k][kind][field] for w in windows if kind in w[k]]
                    row.append(("-" if not xs else str(sum(xs))) if field == "n" else
                               ("-" if not xs else f"{sum(xs) / len(xs):.2f}"))
            lo, hi = windows[0][k]["steps"]
            lines.append(f"| {LABELS[arm]} | {lo}-{hi} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def smooth(values, window):
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def plot(curves, seeds, path, window):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = (("accuracy", "accuracy (training rollouts)"), ("consistency", "rule-checked consistency"),
              ("bonus_rate", "bonus rate (CARE)"), ("ref_conf", "reference confidence (CARE)"),
              ("zero_advantage_rate", "groups with zero advantage"))
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for algo, colour in zip(ALGOS, ("tab:blue", "tab:cyan", "tab:red", "tab:green", "tab:purple")):
            if algo not in CARE_ARMS and key in ("bonus_rate", "ref_conf"):
                continue  # GRPO has no bonus and never scores answers with its reference
            runs = [curves[(seed, algo)] for seed in seeds]
            steps = runs[0]["step"]
            ys = np.array([smooth(r[key], window) for r in runs], dtype=float)
            ax.plot(steps, np.nanmean(ys, 0), color=colour, label=LABELS[algo])
            ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=colour, alpha=0.15)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"synthetic benchmark: mean over seeds {', '.join(map(str, seeds))} (band: min-max), "
                 f"moving average over {window} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The experiment


def parse_settings(argv=None):
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass   # the docstring as written, and every flag's default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=HELP[f.name])
    p.add_argument("--smoke", action="store_true", help="a handful of steps on a few questions (the CI test)")
    p.add_argument("--sweep-lrs", default="", metavar="LR,LR,...",
                   help="instead of the experiment: GRPO at each of these learning rates from each seed's warm "
                        "model, evaluated on L1, written to OUT/sweep.json")
    args = vars(p.parse_args(argv))
    smoke, sweep = args.pop("smoke"), args.pop("sweep_lrs")
    settings = Settings(**args)
    if smoke:
        settings = dataclasses.replace(settings, **SMOKE)
    return settings, [float(x) for x in sweep.split(",") if x]


HELP = {
    "out": "where everything goes (the benchmark, one folder per seed, results.*, curves.png)",
    "seeds": "comma-separated seeds: each gives its own warm-up and RL runs; added to the seeds OUT/results.json "
             "already holds",
    "jobs": "seeds run at once (each process gets cpu_count // jobs threads)",
    "n_train": "training questions", "n_val": "questions per validation level",
    "frames": "frames per clip (written at 4 fps)", "size": "frame height and width (a multiple of 28)",
    "kinds": "question kinds trained on and asked in L1/L2: colour, or colour,shape",
    "vision_steps": "pretraining steps (32 fresh clips each) of the vision tower, shared by all seeds",
    "vision_lr": "learning rate of the vision pretraining",
    "probe_clips": "held-out clips of the linear probe (half fit, half scored)",
    "warm_up_steps": "supervised warm-up steps", "warm_up_batch": "examples per warm-up step",
    "warm_up_lr": "learning rate of the warm-up",
    "known": "warm-up: values whose clips the reasoning describes truly (others: a value at random); all = every one",
    "letter_follows": "warm-up: how often the answer is the stated value's letter",
    "warm_tries": "warm-ups tried per seed (new warm-up seed each) until one passes warm_problems",
    "steps": "RL steps (every RL arm alike)", "prompts": "prompts per RL step",
    "generations": "completions per prompt (G)", "completion_length": "longest completion, in tokens",
    "lr": "RL peak learning rate (cosine decay)", "ema_every": "CARE: steps between reference EMA updates",
    "eval_batch": "evaluation batch size",
    "attention_levels": "the levels analyze.py attention reads (comma-separated)",
}


def evaluate_cmd(s, model, out, levels=LEVELS):
    data_root = os.path.join(s.out, "benchmark")
    return [sys.executable, "evaluate.py", "--model", model, "--output-dir", out, "--data-root", data_root,
            "--data", *[os.path.join(data_root, "annotations", f"validation_{lv}.jsonl") for lv in levels],
            "--judge", os.path.join(HERE, "benchmark.py") + ":rule_verdict", "--max-new-tokens",
            str(s.completion_length), "--batch-size", str(s.eval_batch), *budget_flags(s.size)]


def vision_commands(s):
    vision = os.path.join(s.out, "vision")
    return [("vision pretraining", [sys.executable, os.path.abspath(__file__), "vision", "--model", vision, "--steps",
                                    str(s.vision_steps), "--lr", str(s.vision_lr), "--probe-clips", str(s.probe_clips),
                                    "--size", str(s.size)], os.path.join(vision, "probe.json"))]


def warm_up_commands(s, name, model, seed, known, letter_follows):
    """Warm up the pretrained checkpoint into `model`, then evaluate it into `model`-eval."""
    cmd = [sys.executable, os.path.abspath(__file__), "warm-up", "--vision", os.path.join(s.out, "vision"),
           "--model", model, "--data-root", os.path.join(s.out, "benchmark"), "--seed", str(seed), "--size", str(s.size),
           "--steps", str(s.warm_up_steps), "--batch", str(s.warm_up_batch), "--lr", str(s.warm_up_lr),
           "--known", known, "--letter-follows", str(letter_follows)]
    return [(f"{name}", cmd, os.path.join(model, "warm.done")),
            (f"evaluate {name}", evaluate_cmd(s, model, model + "-eval"), os.path.join(model + "-eval", "summary.json"))]


def rl_commands(s, seed, warm, run_dir, algo, lr, levels=LEVELS):
    data_root = os.path.join(s.out, "benchmark")
    final = os.path.join(run_dir, f"checkpoint-{s.steps:06d}")
    train = [sys.executable, "train.py", *ALGOS[algo], "--model", warm, "--seed", str(seed),
             "--data", os.path.join(data_root, "annotations", "training_6k.jsonl"), "--data-root", data_root,
             "--output-dir", run_dir, "--max-steps", str(s.steps), "--save-every", str(s.steps),
             "--epochs", str(-(-s.steps * s.prompts // s.n_train)),   # enough passes for --max-steps
             "--prompts-per-device", str(s.prompts), "--num-generations", str(s.generations),
             "--max-completion-length", str(s.completion_length), "--lr", str(lr), "--ema-every", str(s.ema_every),
             "--log-completions", "--resume", "auto", *budget_flags(s.size)]
    return [(f"train {os.path.basename(run_dir)}", train, final),
            (f"evaluate {os.path.basename(run_dir)}", evaluate_cmd(s, os.path.join(final, "policy"),
                                                                  os.path.join(run_dir, "eval"), levels),
             os.path.join(run_dir, "eval", "summary.json"))]


def cot_file(s):
    """The training rows with their true chain of thought in the field sft.py reads by default
    ("response"): the one fact the answer follows from, e.g. "The shape is red."."""
    import sft
    data_root = os.path.join(s.out, "benchmark")
    path = os.path.join(data_root, "annotations", "training_with_cot_6k.jsonl")
    if not os.path.exists(path):
        field = sft.SFTConfig.reasoning_field
        with open(os.path.join(data_root, "annotations", "training_6k.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        kinds = {q: k for k, q in benchmark.QUESTIONS.items()}
        with open(path + ".tmp", "w") as f:
            for r in rows:
                kind = next(k for q, k in kinds.items() if q in r["question"])
                f.write(json.dumps({**r, field: benchmark.reasoning(kind, r["answer"])}) + "\n")
        os.replace(path + ".tmp", path)
    return path


def sft_commands(s, seed, warm, run_dir):
    """sft.py from the warm model: steps x prompts examples, prompts per step, the RL lr."""
    data_root = os.path.join(s.out, "benchmark")
    final = os.path.join(run_dir, f"checkpoint-{s.steps:06d}")
    train = [sys.executable, "sft.py", "--model", warm, "--seed", str(seed), "--data", cot_file(s),
             "--data-root", data_root, "--output-dir", run_dir, "--max-steps", str(s.steps),
             "--save-every", str(s.steps), "--epochs", str(-(-s.steps * s.prompts // s.n_train)),
             "--per-device-batch-size", str(s.prompts), "--gradient-accumulation-steps", "1", "--lr", str(s.lr),
             "--resume", "auto", *budget_flags(s.size)]
    return [("sft", train, final),
            ("evaluate sft", evaluate_cmd(s, os.path.join(final, "policy"), run_dir + "-eval"),
             os.path.join(run_dir + "-eval", "summary.json"))]


def final_models(s, root, warm):
    """{run: the model directory it ends with}."""
    models = {"warm": warm, "ceiling": os.path.join(root, "ceiling"),
              "sft": os.path.join(root, "sft", f"checkpoint-{s.steps:06d}", "policy")}
    models.update({algo: os.path.join(root, algo, f"checkpoint-{s.steps:06d}", "policy") for algo in ALGOS})
    return models


def attention_commands(s, root, models, levels=LEVELS):
    """analyze.py attention on every run's model, one command per level (greedy completions, as
    evaluate.py's near-greedy ones)."""
    data_root = os.path.join(s.out, "benchmark")
    steps = []
    for level in levels:
        out = os.path.join(root, f"attention-{level}")
        cmd = [sys.executable, "analyze.py", "attention", "--models", *models.values(), "--labels", *models,
               "--data", os.path.join(data_root, "annotations", f"validation_{level}.jsonl"), "--data-root", data_root,
               "--batch-size", str(s.eval_batch), "--max-new-tokens", str(s.completion_length),
               "--output-dir", out, *budget_flags(s.size)]
        steps.append((f"attention {level}", cmd, os.path.join(out, "attention.json")))
    return steps


def read_attention(root, levels=LEVELS):
    """{run: {level: {"visual_attention_reasoning": %, "visual_attention_answer": %}}}."""
    out = {}
    for level in levels:
        report = json.load(open(os.path.join(root, f"attention-{level}", "attention.json")))
        for c in report["checkpoints"]:
            visual = {group: (c["mean_over_layers"].get(group) or {}).get("visual") for group in ("reasoning", "answer")}
            out.setdefault(c["label"], {})[level] = {
                f"visual_attention_{group}": None if v is None else 100 * v for group, v in visual.items()}
    return out


def run_steps(steps, root, tag, threads):
    """Run each (name, command, done-when-this-exists) in order, skipping the done ones."""
    for name, cmd, done in steps:
        if os.path.exists(done):
            continue
        t0 = time.time()
        log = os.path.join(root, name.replace(" ", "-") + ".log")
        os.makedirs(root, exist_ok=True)
        print(f"[{tag}] {name}: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if code != 0:
            raise RuntimeError(f"[{tag}] {name} failed with exit code {code}; see {log}")
        print(f"[{tag}] {name} done in {time.time() - t0:.0f} s", flush=True)


def choose_warm(s, seed, threads):
    """Warm up with warm-up seeds seed, seed + 1000, ... until one passes warm_problems (or
    warm_tries are spent: the last one is used and its problems are reported). Every try is
    recorded in seed<k>/warm.json."""
    root = os.path.join(s.out, f"seed{seed}")
    with open(os.path.join(s.out, "benchmark", "annotations", "validation_L1.jsonl")) as f:
        truths = {r["sample_id"]: r["answer"] for r in map(json.loads, f)}
    tries = []
    for t in range(s.warm_tries):
        model = os.path.join(root, "warm" if t == 0 else f"warm-try{t}")
        run_steps(warm_up_commands(s, "warm-up" if t == 0 else f"warm-up-try{t}", model, seed + 1000 * t,
                                   s.known, s.letter_follows), root, f"seed {seed}", threads)
        summary = json.load(open(os.path.join(model + "-eval", "summary.json")))
        predictions = [json.loads(line) for line in open(os.path.join(model + "-eval", "predictions.jsonl"))]
        tries.append({"warm_up_seed": seed + 1000 * t, "model": model,
                      "problems": warm_problems(summary, predictions, truths, known_values(s.known))})
        print(f"[seed {seed}] warm model {model}: " + ("; ".join(tries[-1]["problems"]) or "passes"), flush=True)
        if not tries[-1]["problems"]:
            break
    with open(os.path.join(root, "warm.json"), "w") as f:
        json.dump(tries, f, indent=1)
    return tries


def run_seed(s, seed, threads, sweep_lrs=()):
    """One seed's experiment (steps whose output exists are skipped): the warm model, the
    supervised ceiling and both algorithms, each evaluated; with sweep_lrs, GRPO per lr instead."""
    root = os.path.join(s.out, f"seed{seed}")
    tag = f"seed {seed}"
    warm = choose_warm(s, seed, threads)[-1]["model"]
    if sweep_lrs:
        for lr in sweep_lrs:
            run_steps(rl_commands(s, seed, warm, os.path.join(root, "sweep", f"grpo-lr{lr:g}"), "grpo", lr, ("L1",)),
                      root, tag, threads)
        return seed
    run_steps(warm_up_commands(s, "ceiling", os.path.join(root, "ceiling"), seed, "all", 1.0), root, tag, threads)
    run_steps(sft_commands(s, seed, warm, os.path.join(root, "sft")), root, tag, threads)
    for algo in ALGOS:
        run_steps(rl_commands(s, seed, warm, os.path.join(root, algo), algo, s.lr), root, tag, threads)
    run_steps(attention_commands(s, root, final_models(s, root, warm), s.attention_levels.split(",")), root, tag, threads)
    return seed


def build_benchmark(s):
    data_root = os.path.join(s.out, "benchmark")
    marker = os.path.join(data_root, "settings.json")
    wanted = {"n_train": s.n_train, "n_val": s.n_val, "frames": s.frames, "size": s.size, "kinds": s.kinds, "seed": 0}
    if not os.path.exists(marker) or json.load(open(marker)) != wanted:
        print(f"building the benchmark in {data_root}", flush=True)
        benchmark.build(data_root, s.n_train, s.n_val, seed=0, n_frames=s.frames, size=s.size, kinds=tuple(s.kinds.split(",")))
        json.dump(wanted, open(marker, "w"))
    return data_root


def sweep_report(s, seeds, lrs):
    rows = []
    for lr in lrs:
        per_seed = []
        for seed in seeds:
            run_dir = os.path.join(s.out, f"seed{seed}", "sweep", f"grpo-lr{lr:g}")
            l1 = json.load(open(os.path.join(run_dir, "eval", "summary.json")))["results"]["L1"]
            curve = training_curves(run_dir, questions_of(s))
            per_seed.append({"seed": seed, "L1_accuracy": l1["accuracy"], "L1_consistency": l1["consistency"],
                             "last_50_rollout_accuracy": sum(curve["accuracy"][-50:]) / len(curve["accuracy"][-50:])})
        rows.append({"lr": lr, "per_seed": per_seed})
        print(f"lr {lr:g}: " + "; ".join(f"seed {r['seed']}: L1 accuracy {r['L1_accuracy']:.1f}%, consistency "
                                          f"{r['L1_consistency']:.1f}%" for r in per_seed))
    with open(os.path.join(s.out, "sweep.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(s), "algo": "grpo", "seeds": seeds, "lrs": rows}, f, indent=1)


def questions_of(s):
    import data
    data_root = os.path.join(s.out, "benchmark")
    samples, _ = data.load_samples(os.path.join(data_root, "annotations", "training_6k.jsonl"), data_root)
    return {x.sample_id: data.with_options(x.question, x.options) for x in samples}


def main(argv=None):
    from concurrent.futures import ThreadPoolExecutor

    s, sweep_lrs = parse_settings(argv)
    seeds = [int(x) for x in s.seeds.split(",")]
    os.makedirs(s.out, exist_ok=True)
    t0 = time.time()
    build_benchmark(s)
    threads = max(1, (os.cpu_count() or 1) // s.jobs)
    run_steps(vision_commands(s), os.path.join(s.out, "vision-logs"), "vision", os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        list(pool.map(lambda seed: run_seed(s, seed, threads, sweep_lrs), seeds))
    if sweep_lrs:
        return sweep_report(s, seeds, sweep_lrs)

    questions = questions_of(s)
    curves, evals, warm, bonus = {}, {}, {}, {}
    for seed in seeds:
        root = os.path.join(s.out, f"seed{seed}")
        warm[f"seed{seed}"] = json.load(open(os.path.join(root, "warm.json")))
        evals[(seed, "warm")] = read_eval(warm[f"seed{seed}"][-1]["model"] + "-eval")
        evals[(seed, "ceiling")] = read_eval(os.path.join(root, "ceiling-eval"))
        evals[(seed, "sft")] = read_eval(os.path.join(root, "sft-eval"))
        for algo in ALGOS:
            curves[(seed, algo)] = training_curves(os.path.join(root, algo), questions)
            evals[(seed, algo)] = read_eval(os.path.join(root, algo, "eval"))
        for algo in CARE_ARMS:
            bonus[f"seed{seed}/{algo}"] = bonus_over_training(os.path.join(root, algo), questions, s.steps)
        for run, levels in read_attention(root, s.attention_levels.split(",")).items():
            for level, shares in levels.items():
                evals[(seed, run)]["results"][level].update(shares)
    seeds = add_earlier_seeds(os.path.join(s.out, "results.json"), s, seeds, evals, curves, warm, bonus)
    table = results_table(evals, seeds)
    probe_result = json.load(open(os.path.join(s.out, "vision", "probe.json")))
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(s), "seeds": seeds, "results": table, "probe": probe_result,
                   "warm_models": warm, "curves": {f"seed{seed}/{algo}": c for (seed, algo), c in curves.items()},
                   "bonus_split": bonus,
                   "evals": {f"seed{seed}/{run}": e["results"] for (seed, run), e in evals.items()},
                   "minutes": (time.time() - t0) / 60}, f, indent=1)
    md = markdown(table, seeds, s) + "\n" + bonus_table(bonus, seeds) + "\n" + seed_diagnostics(table, bonus, seeds)
    md += ("\nHeld-out linear probe of the pretrained vision features: " +
           ", ".join(f"{k} {probe_result['after'][k]:.2f}" for k in ATTRIBUTES) + ".\n")
    for seed in seeds:
        for t in warm[f"seed{seed}"]:
            md += f"Seed {seed}, warm-up seed {t['warm_up_seed']}: " + ("; ".join(t["problems"]) or "passes the checks") + ".\n"
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write(md)
    plot(curves, seeds, os.path.join(s.out, "curves.png"), window=max(1, s.steps // 20))
    print(md)
    print(f"wrote {s.out}/results.json, results.md and curves.png in {(time.time() - t0) / 60:.1f} min")


def bonus_over_training(run_dir, questions, steps):
    """diagnose.bonus_split of a CARE run over windows of BONUS_WINDOW training steps."""
    with open(os.path.join(run_dir, "completions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    windows = [(lo, min(lo + BONUS_WINDOW - 1, steps)) for lo in range(1, steps + 1, BONUS_WINDOW)]
    return diagnose.bonus_split(rows, questions, windows)


def separation(windows, k):
    """Mean reference confidence of consistent minus inconsistent right answers in window k of
    one run's bonus diagnostics (None where either kind is missing)."""
    w = windows[k] if -len(windows) <= k < len(windows) else {}
    if "consistent" not in w or "inconsistent" not in w:
        return None
    return w["consistent"]["ref_conf"] - w["inconsistent"]["ref_conf"]


def seed_diagnostics(table, bonus, seeds, level="L1"):
    """Markdown: what each seed's warm model and early training looked like next to what the bonus
    did there: the warm model's accuracy, consistency and right-but-inconsistent answers; GRPO
    without KL's right-but-inconsistent answers at the end (how much shortcut there was to
    take); each CARE arm's separation (consistent minus inconsistent right answers' reference
    confidence) in the first and last BONUS_WINDOW steps; and the bonus's effect."""
    def at(run, metric, k):
        return table[run][level][metric]["per_seed"][k]

    def pct(x):
        return "-" if x is None else f"{x:.1f}"

    def signed(x):
        return "-" if x is None else f"{x:+.2f}"
    arms = [a for a in CARE_ARMS if any(f"seed{seed}/{a}" in bonus for seed in seeds)]
    lines = [f"Per seed, {level}: the warm model (accuracy / consistency / right but inconsistent, %), GRPO without "
             f"KL's right-but-inconsistent answers at the end, each CARE arm's separation (consistent minus "
             f"inconsistent right answers' mean reference confidence, first / last {BONUS_WINDOW} training steps) "
             f"and CARE - noKL consistency (points).", "",
             "| seed | warm | noKL right, inconsistent | " + " | ".join(f"{LABELS[a]} separation" for a in arms)
             + " | CARE - noKL consistency |", "| ---: | --- | ---: |" + " ---: |" * (len(arms) + 1)]
    for k, seed in enumerate(seeds):
        warm = " / ".join(pct(at("warm", m, k)) for m in ("accuracy", "consistency", "correct_inconsistent"))
        seps = []
        for a in arms:
            w = bonus.get(f"seed{seed}/{a}", [])
            seps.append(f"{signed(separation(w, 0))} / {signed(separation(w, -1))}" if w else "-")
        d = diff_cell(table, "care", "grpo_nokl", level, "consistency")["per_seed"][k]
        lines.append(f"| {seed} | {warm} | {pct(at('grpo_nokl', 'correct_inconsistent', k))} | " + " | ".join(seps)
                     + f" | {'-' if d is None else f'{d:+.1f}'} |")
    return "\n".join(lines) + "\n"


# The settings that may differ between the runs of one results file: where and how fast it ran.
FREE_SETTINGS = ("out", "seeds", "jobs")


def add_earlier_seeds(path, s, seeds, evals, curves, warm, bonus):
    """--seeds adds to an existing results file: the seeds it holds that this call did not run
    are read back from it (their evaluations, curves, warm-up tries and bonus diagnostics) into
    the dicts given, if it was made with the same settings; returns every seed, sorted. A file
    made with other settings is refused in one line (another --out keeps both)."""
    if not os.path.exists(path):
        return seeds
    earlier = json.load(open(path))
    mine = {k: v for k, v in dataclasses.asdict(s).items() if k not in FREE_SETTINGS}
    theirs = {k: v for k, v in earlier["settings"].items() if k not in FREE_SETTINGS}
    if mine != theirs:
        changed = ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v)
        raise SystemExit(f"run.py: {path} was made with other settings ({changed}); use another --out to keep both")
    if "evals" not in earlier:
        raise SystemExit(f"run.py: {path} holds no per-seed evaluations to add seeds to (made by an older run.py); "
                         "use another --out")
    for seed in earlier["seeds"]:
        if seed in seeds:
            continue   # run again now: this call's numbers win
        for run in RUNS:
            evals[(seed, run)] = {"results": earlier["evals"][f"seed{seed}/{run}"]}
        for algo in ALGOS:
            curves[(seed, algo)] = earlier["curves"][f"seed{seed}/{algo}"]
        for algo in CARE_ARMS:
            bonus[f"seed{seed}/{algo}"] = earlier["bonus_split"][f"seed{seed}/{algo}"]
        warm[f"seed{seed}"] = earlier["warm_models"][f"seed{seed}"]
    return sorted(set(seeds) | set(earlier["seeds"]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["warm-up"]:
        main_warm_up(sys.argv[2:])
    elif sys.argv[1:2] == ["vision"]:
        main_vision(sys.argv[2:])
    else:
        main()
