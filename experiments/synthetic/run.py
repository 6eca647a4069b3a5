"""GRPO versus GRPO-CARE at toy scale, on a CPU: does the consistency bonus keep a model's
reasoning and answers in agreement while it learns, as the paper reports at 7B?

    python experiments/synthetic/run.py                 # the default run, about 20 min on 2 cores
    python experiments/synthetic/run.py --smoke         # a handful of steps (the CI test)

Per seed:
  1. warm-up: a tiny random Qwen2.5-VL (tiny.py). Its vision tower alone is first trained to
     tell colour, shape and direction apart on fresh clips (a stand-in for a pretrained vision
     encoder: the language model learns nothing there). Then supervised examples teach only the
     output format and the reasoning template of benchmark.py, "<think>The shape is
     red.</think><answer>A</answer>", where A is the option of the stated value, and the value
     is drawn at random, never read from the video. So the warm model is consistent by
     construction and at chance accuracy, for all three question kinds;
  2. train.py --algo grpo and --algo care from it: same data, steps, seed and sampling seeds;
  3. evaluate.py on L1/L2/L3 for the warm model and both final policies, with benchmark.py's
     rule_verdict as the consistency judge (exact, no judge model).
Then OUT/results.json and results.md (mean and spread over seeds) and OUT/curves.png
(accuracy, rule-checked consistency, bonus rate and reference confidence of the training
rollouts against step). A step whose output exists is skipped, so an interrupted run picks up
where it stopped; each command is printed and logged under OUT/seed<k>/.
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

ALGOS = ("grpo", "care")
LEVELS = ("L1", "L2", "L3")


@dataclass
class Settings:
    out: str = "out/synthetic"
    seeds: str = "0,1,2"
    jobs: int = 1                 # seeds run at once; each process gets cpu_count // jobs threads
    # benchmark
    n_train: int = 3000
    n_val: int = 300
    frames: int = 8
    size: int = 56                # frame height and width
    # warm-up (supervised): the vision tower alone on fresh clips, then format and template only
    vision_steps: int = 150
    warm_up_steps: int = 400
    warm_up_batch: int = 8
    warm_up_lr: float = 2e-3
    # RL: the same budget for both algorithms
    steps: int = 300
    prompts: int = 4
    generations: int = 8
    completion_length: int = 32
    lr: float = 1e-3
    ema_every: int = 10
    # evaluation
    eval_batch: int = 16


# A few questions and steps: checks that every piece runs and the outputs are written.
SMOKE = dict(seeds="0", jobs=1, n_train=16, n_val=4, size=56, vision_steps=2, warm_up_steps=3, warm_up_batch=2,
             steps=2, prompts=2, generations=4, completion_length=24, eval_batch=4)


def budget(size):
    """Frames and images at the benchmark's size, never resized."""
    return dict(max_frames=8, video_max_pixels=size * size, image_max_pixels=size * size,
                video_min_pixels=28 * 28, image_min_pixels=28 * 28)


def budget_flags(size):
    return [f"--{k.replace('_', '-')}={v}" for k, v in budget(size).items()]


# ---------------------------------------------------------------------------------------------
# Warm-up: the format and the template, never the answer


def warm_up_pool(samples, rng):
    """One warm-up prompt per training clip, each asking about a kind drawn from all three
    (direction included: the warm model knows the template for L3's question, as a pretrained
    model would, though RL never trains on it), options in the benchmark's fixed order."""
    import data

    pool = []
    for s in samples:
        kind = rng.choice(list(benchmark.QUESTIONS))
        options = list(benchmark.VALUES[kind])
        question = data.with_options(benchmark.QUESTIONS[kind] + "\n", [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)])
        pool.append((dataclasses.replace(s, question=question), kind, options))
    return pool


def warm_up_target(kind, options, rng):
    """A stated value drawn at random (not from the video) and the letter it has: consistent,
    ungrounded."""
    i = rng.randrange(len(options))
    return f"<think>{benchmark.reasoning(kind, options[i])}</think><answer>{'ABCD'[i]}</answer><|im_end|>"


def pretrain_vision(model, steps, batch, lr, seed, budget, size):
    """Stand-in for a pretrained vision encoder: train the vision tower alone (with a linear
    head that is then thrown away) to tell colour, shape and direction apart on fresh clips that
    are not in the benchmark. The language model is untouched: it still knows nothing of what
    the questions ask, only the vision tower's features now carry the facts."""
    import numpy as np
    import torch

    import data

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    kinds = list(benchmark.VALUES)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 4 * len(kinds))
    params = list(model.model.visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        pixels, grids, labels = [], [], []
        for _ in range(batch):
            truth = {k: rng.choice(benchmark.VALUES[k]) for k in kinds}
            frames = benchmark.clip(truth["shape"], truth["colour"], truth["direction"], rng.choice(list(benchmark.PLAIN)),
                                    np_rng, budget.max_frames, size, size)
            p, g = data.patchify_frames(frames, budget.video_min_pixels, budget.video_max_pixels, budget)
            pixels.append(p)
            grids.append(g)
            labels.append([benchmark.VALUES[k].index(truth[k]) for k in kinds])
        out = model.model.get_video_features(torch.cat(pixels), torch.stack(grids))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        pooled = torch.stack([f.mean(0) for f in feats])
        logits = head(pooled).view(batch, len(kinds), 4)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(labels).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == torch.tensor(labels)).float().mean(0).tolist()
            print(f"vision step {step}: loss {loss.item():.3f}, accuracy " +
                  ", ".join(f"{k} {a:.2f}" for k, a in zip(kinds, acc)), flush=True)


def warm_up(model_dir, data_root, steps, batch, lr, seed, vision_steps, size):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    import data
    import tiny

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    samples, _ = data.load_samples(os.path.join(data_root, "annotations", "training_6k.jsonl"), data_root, seed=seed)
    pool = warm_up_pool(samples[:steps * batch], rng)
    visual_budget = data.budget_from_checkpoint(model_dir, **budget(size))
    pretrain_vision(model, vision_steps, 32, lr, seed, visual_budget, size)
    encoded = [data.encode_prompt(s, tokenizer, visual_budget) for s, _, _ in pool]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        picks = [rng.randrange(len(pool)) for _ in range(batch)]
        targets = [warm_up_target(pool[i][1], pool[i][2], rng) for i in picks]
        loss = tiny.supervised_loss(model, tokenizer, [encoded[i] for i in picks], targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"warm-up step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(model_dir)
    return model_dir


def main_warm_up(argv):
    """`run.py warm-up ...`: a tiny random Qwen2.5-VL (tiny.py), warmed up, written to --model."""
    import tiny

    p = argparse.ArgumentParser(prog="run.py warm-up")
    p.add_argument("--model", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=Settings.size)
    p.add_argument("--vision-steps", type=int, default=Settings.vision_steps)
    p.add_argument("--steps", type=int, default=Settings.warm_up_steps)
    p.add_argument("--batch", type=int, default=Settings.warm_up_batch)
    p.add_argument("--lr", type=float, default=Settings.warm_up_lr)
    args = p.parse_args(argv)
    tiny.build_model(args.model, seed=args.seed)
    warm_up(args.model, args.data_root, args.steps, args.batch, args.lr, args.seed, args.vision_steps, args.size)
    open(os.path.join(args.model, "warm.done"), "w").close()


# ---------------------------------------------------------------------------------------------
# Reading the runs


def stated_and_verdict(question, completion, letters):
    """(the option the completion answers, the option its reasoning leads to by rule); the
    first is None when it answers no option."""
    import evaluate
    import rewards
    stated = evaluate.as_letter(rewards.extract_answer(completion), letters)
    return (stated if stated in letters else None), benchmark.rule_verdict(question, evaluate.reasoning_of(completion))


def training_curves(run_dir, questions):
    """Per step, from the training rollouts: accuracy, rule-checked consistency (of the
    completions that answer an option), bonus rate and mean reference confidence."""
    import evaluate
    per_step = {}
    with open(os.path.join(run_dir, "completions.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            question = questions[r["sample_id"]]
            stated, verdict = stated_and_verdict(question, r["completion"], evaluate.OPTION_RE.findall(question))
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
            "ref_confidence": [log[k]["ref_confidence"] for k in steps]}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def results_table(evals, seeds):
    """{model: {level: {accuracy|consistency: {mean, std, per_seed}}}} from the eval summaries."""
    table = {}
    for model in ("warm",) + ALGOS:
        table[model] = {}
        for level in ("all",) + LEVELS:
            row = {}
            for metric in ("accuracy", "consistency"):
                per_seed = [evals[(seed, model)]["results"][level][metric] for seed in seeds]
                mean, std = mean_std(per_seed)
                row[metric] = {"mean": mean, "std": std, "per_seed": per_seed}
            table[model][level] = row
    return table


def markdown(table, seeds, settings):
    def cell(x):
        return "-" if x["mean"] is None else f"{x['mean']:.1f} ± {x['std']:.1f}"
    lines = [f"Mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"{settings.steps} RL steps of {settings.prompts} prompts x {settings.generations} completions; "
             f"{settings.n_val} questions per level; consistency judged by rule.", "",
             "| level | metric | warm-up | GRPO | GRPO-CARE | CARE - GRPO |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for level in LEVELS + ("all",):
        for metric in ("accuracy", "consistency"):
            cells = [table[m][level][metric] for m in ("warm",) + ALGOS]
            diffs = [c - g for c, g in zip(cells[2]["per_seed"], cells[1]["per_seed"]) if None not in (c, g)]
            d_mean, d_std = mean_std(diffs)
            lines.append(f"| {level} | {metric} (%) | " + " | ".join(cell(c) for c in cells) +
                         f" | {cell({'mean': d_mean, 'std': d_std})} |")
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
              ("bonus_rate", "bonus rate (CARE)"), ("ref_confidence", "reference confidence (CARE)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for algo, colour in zip(ALGOS, ("tab:blue", "tab:red")):
            if algo == "grpo" and key in ("bonus_rate", "ref_confidence"):
                continue  # GRPO has no bonus and never scores answers with its reference
            runs = [curves[(seed, algo)] for seed in seeds]
            steps = runs[0]["step"]
            ys = np.array([smooth(r[key], window) for r in runs], dtype=float)
            ax.plot(steps, np.nanmean(ys, 0), color=colour, label="GRPO-CARE" if algo == "care" else "GRPO")
            ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=colour, alpha=0.15)
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend()
    fig.suptitle(f"synthetic benchmark: mean over seeds {', '.join(map(str, seeds))} (band: min-max), "
                 f"moving average over {window} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The experiment


def parse_settings(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--smoke", action="store_true", help="a handful of steps on a few questions (the CI test)")
    args = vars(p.parse_args(argv))
    smoke = args.pop("smoke")
    settings = Settings(**args)
    if smoke:
        settings = dataclasses.replace(settings, **SMOKE)
    return settings


def commands(s, seed, root):
    """The experiment for one seed, as (name, command, done-when-this-exists) in order."""
    py = sys.executable
    data_root = os.path.join(s.out, "benchmark")
    warm = os.path.join(root, "warm")
    evaluate_flags = ["--data-root", data_root, "--data", *[os.path.join(data_root, "annotations", f"validation_{lv}.jsonl")
                                                            for lv in LEVELS],
                      "--judge", os.path.join(HERE, "benchmark.py") + ":rule_verdict", "--max-new-tokens",
                      str(s.completion_length), "--batch-size", str(s.eval_batch), *budget_flags(s.size)]
    out = [("warm-up", [py, os.path.abspath(__file__), "warm-up", "--model", warm, "--data-root", data_root, "--seed", str(seed),
                        "--steps", str(s.warm_up_steps), "--batch", str(s.warm_up_batch), "--lr", str(s.warm_up_lr),
                        "--vision-steps", str(s.vision_steps), "--size", str(s.size)], os.path.join(warm, "warm.done")),
           ("evaluate warm", [py, "evaluate.py", "--model", warm, "--output-dir", os.path.join(root, "warm-eval"), *evaluate_flags],
            os.path.join(root, "warm-eval", "summary.json"))]
    for algo in ALGOS:
        run_dir = os.path.join(root, algo)
        out.append((f"train {algo}", [py, "train.py", "--algo", algo, "--model", warm, "--seed", str(seed),
                                      "--data", os.path.join(data_root, "annotations", "training_6k.jsonl"),
                                      "--data-root", data_root, "--output-dir", run_dir, "--max-steps", str(s.steps),
                                      "--save-every", str(s.steps), "--prompts-per-device", str(s.prompts),
                                      "--num-generations", str(s.generations), "--max-completion-length",
                                      str(s.completion_length), "--lr", str(s.lr), "--ema-every", str(s.ema_every),
                                      "--log-completions", "--resume", "auto", *budget_flags(s.size)],
                    os.path.join(run_dir, f"checkpoint-{s.steps:06d}")))
        out.append((f"evaluate {algo}", [py, "evaluate.py", "--model", os.path.join(run_dir, f"checkpoint-{s.steps:06d}", "policy"),
                                         "--output-dir", os.path.join(run_dir, "eval"), *evaluate_flags],
                    os.path.join(run_dir, "eval", "summary.json")))
    return out


def run_seed(s, seed, threads):
    """Run (or, where its output already exists, skip) each step of one seed's experiment."""
    root = os.path.join(s.out, f"seed{seed}")
    os.makedirs(root, exist_ok=True)
    for name, cmd, done in commands(s, seed, root):
        if os.path.exists(done):
            continue
        t0 = time.time()
        log = os.path.join(root, name.replace(" ", "-") + ".log")
        print(f"[seed {seed}] {name}: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if code != 0:
            raise RuntimeError(f"[seed {seed}] {name} failed with exit code {code}; see {log}")
        print(f"[seed {seed}] {name} done in {time.time() - t0:.0f} s", flush=True)
    return seed


def main(argv=None):
    from concurrent.futures import ThreadPoolExecutor

    import data

    s = parse_settings(argv)
    seeds = [int(x) for x in s.seeds.split(",")]
    os.makedirs(s.out, exist_ok=True)
    t0 = time.time()
    data_root = os.path.join(s.out, "benchmark")
    marker = os.path.join(data_root, "settings.json")
    wanted = {"n_train": s.n_train, "n_val": s.n_val, "frames": s.frames, "size": s.size, "seed": 0}
    if not os.path.exists(marker) or json.load(open(marker)) != wanted:
        print(f"building the benchmark in {data_root}", flush=True)
        benchmark.build(data_root, s.n_train, s.n_val, seed=0, n_frames=s.frames, size=s.size)
        json.dump(wanted, open(marker, "w"))
    threads = max(1, (os.cpu_count() or 1) // s.jobs)
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        list(pool.map(lambda seed: run_seed(s, seed, threads), seeds))

    samples, _ = data.load_samples(os.path.join(data_root, "annotations", "training_6k.jsonl"), data_root)
    questions = {x.sample_id: x.question for x in samples}
    curves, evals = {}, {}
    for seed in seeds:
        root = os.path.join(s.out, f"seed{seed}")
        evals[(seed, "warm")] = json.load(open(os.path.join(root, "warm-eval", "summary.json")))
        for algo in ALGOS:
            curves[(seed, algo)] = training_curves(os.path.join(root, algo), questions)
            evals[(seed, algo)] = json.load(open(os.path.join(root, algo, "eval", "summary.json")))
    table = results_table(evals, seeds)
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(s), "seeds": seeds, "results": table,
                   "curves": {f"seed{seed}/{algo}": c for (seed, algo), c in curves.items()},
                   "minutes": (time.time() - t0) / 60}, f, indent=1)
    md = markdown(table, seeds, s)
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write(md)
    plot(curves, seeds, os.path.join(s.out, "curves.png"), window=max(1, s.steps // 20))
    print(md)
    print(f"wrote {s.out}/results.json, results.md and curves.png in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    if sys.argv[1:2] == ["warm-up"]:
        main_warm_up(sys.argv[2:])
    else:
        main()
