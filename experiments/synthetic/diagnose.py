"""Diagnostics for the synthetic experiment: where the policy gradient comes from, and how many
groups give none.

    python experiments/synthetic/diagnose.py grad-share --model out/synthetic/seed0/warm \\
        --data-root out/synthetic/benchmark --n 8 --generations 8 [--out share.json]
    python experiments/synthetic/diagnose.py zero-adv out/synthetic/seed0/grpo
    python experiments/synthetic/diagnose.py routes out/synthetic/seed0/grpo --data-root out/synthetic/benchmark
    python experiments/synthetic/diagnose.py bonus out/synthetic/seed0/care --data-root out/synthetic/benchmark
    python experiments/synthetic/diagnose.py link --model out/synthetic/seed0/warm \
        --data-root out/synthetic/benchmark --n 20

grad-share samples one rollout (G completions for each of n training prompts) from --model with
the project's own code (rollout.generate, temperature 1, top-p 1), scores it with plain GRPO's
reward (accuracy + format) and group advantages, and splits the policy-gradient loss (beta 0) by
token class: "fact" = the tokens of the value the reasoning states ("red" in "<think>The shape
is red.</think>"), "answer" = the tokens of the text inside <answer>...</answer>, "other" = the
rest of the completion. Each class keeps its tokens' weight in the full loss (1/|o| of its
completion), so the three class gradients add up to the full gradient. Per class it prints:
  tokens     how many completion tokens the class has;
  grad_norm  the L2 norm of its gradient over all trainable parameters;
  share      grad_norm / the sum of the three norms: how much of the push comes from the class;
  cos        cosine between its gradient and the full one: how much it sets the direction
             (sum over classes of grad_norm x cos = the full norm).
A small fact share next to a large answer share means RL moves the answer letter much more than
the fact the answer should follow from. It also prints the rate of zero-advantage groups (all G
rewards equal: the group adds nothing to the gradient) and the reward mean and std.

link reads, under teacher forcing, what a model puts after the reasoning template: for each of n
L1 questions, P(stated value | clip) after "<think>The shape is", and P(answer letter | stated
value) after "<think>The shape is V.</think><answer" for every value V. It prints how often the
most likely stated value is the clip's true one (grounding) and how often the most likely letter
is V's own (the link from reasoning to answer), and the largest change of the letter
distribution across V: about 0 means the answer ignores the reasoning altogether, and the
probability the four letters hold after "<answer" (near 1 for a model that answers in format).
With --reference-input text it reads the prompt without the clip and the image, as CARE's
text-only reference does: a model that never saw a prompt without visuals may put its mass
elsewhere, and then that reference finds every answer unlikely.

routes reads a train.py run's completions.jsonl with the benchmark's true values and prints, per
true value of the asked attribute, for the first and the last --window steps: rollout accuracy,
how often the reasoning states the true value, and how often the answer is right while the
reasoning states another value (the answer did not come from the reasoning: the shortcut, or a
lucky letter). Accuracy that rises for a value the reasoning still misnames is the shortcut.

bonus reads a CARE run's completions.jsonl and splits its right answers, per window of steps, into
those whose reasoning leads to the answer (by benchmark.rule_verdict) and those whose reasoning
leads elsewhere, with each one's mean reference confidence ref_conf and bonus rate: the bonus does
its job where the first get it and the second do not. Also for groups holding both kinds only.

zero-adv reads a train.py run's completions.jsonl (--log-completions) and prints, per step, the
fraction of groups whose logged rewards (accuracy + format + bonus) are all equal, then the mean.
Under plain GRPO it rises as groups become all right (or all wrong); CARE's bonus can split an
all-correct group, so its rate can stay lower.
"""

import argparse
import itertools
import json
import os
import random
import re
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402
import care  # noqa: E402
import data  # noqa: E402
import encoding  # noqa: E402
import reference  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402

CLASSES = ("fact", "answer", "other")
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


# -----------------------------------------------------------------------------
# token classes


def question_values(question):
    """The benchmark's values for the kind of question asked (VALUES), or None for another question."""
    kind = next((k for k, q in benchmark.QUESTIONS.items() if q in question), None)
    return benchmark.VALUES[kind] if kind else None


def fact_char_span(text, values=None):
    """(start, end) of the fact stated in the last <think>...</think>, or None: the last of values
    it names (whole words, any case, as benchmark.rule_verdict reads it), or without values the
    last word before its final "." (before its end if it has no ".")."""
    matches = list(THINK_RE.finditer(text))
    if not matches:
        return None
    inner, base = matches[-1].group(1), matches[-1].start(1)
    if values:
        found = list(re.finditer(r"\b(" + "|".join(map(re.escape, values)) + r")\b", inner, re.IGNORECASE))
    else:
        stop = inner.rfind(".")
        found = list(re.finditer(r"\w+", inner[:stop] if stop >= 0 else inner))
    return (base + found[-1].start(), base + found[-1].end()) if found else None


def token_char_spans(tokenizer, ids):
    """(text, [(start, end)] per token) of a token list: token k covers the characters from
    len(decode(ids[:k])) to len(decode(ids[:k+1])). Decoding prefixes is exact for the sampled
    tokens, where re-tokenizing the text could give other tokens (see reference.py)."""
    def decode(k):
        return tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # running max: a prefix ending inside a multi-byte character may decode one char long
    ends = list(itertools.accumulate((len(decode(k + 1)) for k in range(len(ids))), max))
    return decode(len(ids)), list(zip([0] + ends[:-1], ends))


def token_classes(tokenizer, completion_ids, completion_mask, values=None):
    """{"fact", "answer", "other"}: [N, T] bool masks that split completion_mask by the character
    spans of the tokens (a token belongs to a span it overlaps; answer wins over fact).
    values[n]: the values completion n's fact is one of, or None (see fact_char_span)."""
    fact = torch.zeros(completion_ids.shape, dtype=torch.bool)  # [N, T]
    answer = torch.zeros_like(fact)  # [N, T]
    for n, (ids, m) in enumerate(zip(completion_ids.tolist(), completion_mask.tolist())):
        text, spans = token_char_spans(tokenizer, ids[:int(sum(m))])
        for target, span in ((answer, reference.answer_char_span(text)),
                             (fact, fact_char_span(text, values[n] if values else None))):
            if span is not None:
                target[n, :len(spans)] = torch.tensor([s < span[1] and e > span[0] for s, e in spans], dtype=torch.bool)
    fact &= ~answer
    valid = completion_mask.bool().cpu()  # [N, T]
    out = {"fact": fact & valid, "answer": answer & valid, "other": valid & ~fact & ~answer}
    return {k: v.to(completion_ids.device) for k, v in out.items()}


# -----------------------------------------------------------------------------
# rollouts


def encode_prompts(samples, tokenizer, budget, device="cpu"):
    """The collated prompt batch of samples (encoding.encode_prompt + collate_prompts) on device."""
    batch = encoding.collate_prompts([encoding.encode_prompt(s, tokenizer, budget) for s in samples], tokenizer)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def sample_rollout(model, tokenizer, prompts, num_generations=8, max_new_tokens=32, seed=0):
    """G completions per prompt as train.py samples them at step 0 of a run with this seed
    (one sampling seed per group), with temperature 1.0 and top-p 1.0."""
    import train  # for its seeding rule only (it pulls in accelerate)

    config = rollout.sampling_config(tokenizer, max_new_tokens, temperature=1.0, top_p=1.0)
    seeds = [train.rollout_seed(seed, 0, i) for i in range(prompts["input_ids"].shape[0])]
    return rollout.generate(model, prompts, tokenizer, num_generations, config, seeds)


def rollout_from_texts(prompts, tokenizer, texts, num_generations):
    """A Rollout whose completions are the given texts (row n answers prompt n // G), each
    followed by <|im_end|>: to measure chosen completions instead of sampled ones."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in texts]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)  # [N, T]
    mask, truncated = rollout.completion_mask_from_ids(ids, eos)  # [N, T], [N]
    device = prompts["input_ids"].device
    texts = [tokenizer.decode(r[:int(m.sum())], skip_special_tokens=True) for r, m in zip(ids, mask)]
    return rollout.Rollout(prompts, ids.to(device), mask.to(device), truncated, texts, num_generations)


# -----------------------------------------------------------------------------
# gradient share


def _ratio(a, b):
    return a / b if b > 0 else float("nan")


def gradient_share_of(model, tokenizer, roll, samples, classes=token_classes):
    """The gradient-share measurement (module docstring) for one rollout of the given samples.

    Returns {"tokens", "grad_norm" (full gradient), "classes": {name: {"tokens", "grad_norm",
    "share", "cos"}}, "zero_advantage_rate", "reward_mean", "reward_std" (unbiased), "prompts",
    "generations"}. share and cos are NaN where the gradient is zero (every advantage 0)."""
    p, g = len(samples), roll.num_generations
    acc, fmt = rewards.score(roll.texts, [s.solution for s in samples for _ in range(g)],
                             [s.problem_type for s in samples for _ in range(g)])
    reward = care.grpo_rewards(torch.tensor(acc).view(p, g), torch.tensor(fmt).view(p, g))["reward"]  # [P, G]
    mask = roll.completion_mask  # [P*G, T]
    adv = care.group_advantages(reward).reshape(-1).to(mask.device)  # [P*G]
    masks = classes(tokenizer, roll.completion_ids, mask, [question_values(s.question) for s in samples for _ in range(g)])

    params = [q for q in model.parameters() if q.requires_grad]
    logp = rollout.completion_logprobs(model, roll)  # [P*G, T]
    seq_len = mask.sum(1).clamp(min=1)  # [P*G]

    def grad(m):
        # The class's part of the full loss: policy_loss averages over the tokens under m, so
        # scaling each advantage by |m_n| / |o_n| gives its tokens their weight 1/|o_n| back.
        m = m.to(mask.dtype)
        loss, _ = care.policy_loss(logp, adv * m.sum(1) / seq_len, m, beta=0.0)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(q) if x is None else x for q, x in zip(params, grads)]

    def dot(a, b):
        return sum((x.double() * y.double()).sum() for x, y in zip(a, b)).item()

    full = grad(mask)
    full_norm = dot(full, full) ** 0.5
    out = {name: {"tokens": int(masks[name].sum())} for name in CLASSES}
    for name in CLASSES:
        part = grad(masks[name])
        out[name]["grad_norm"] = dot(part, part) ** 0.5
        out[name]["cos"] = _ratio(dot(full, part), full_norm * out[name]["grad_norm"])
    total = sum(c["grad_norm"] for c in out.values())
    for c in out.values():
        c["share"] = _ratio(c["grad_norm"], total)
    flat = reward.flatten()  # [P*G]
    return {"tokens": int(mask.sum()), "grad_norm": full_norm, "classes": out,
            "zero_advantage_rate": (reward == reward[:, :1]).all(1).float().mean().item(),
            "reward_mean": flat.mean().item(), "reward_std": flat.std().item() if flat.numel() > 1 else 0.0,
            "prompts": p, "generations": g}


def gradient_share(model, tokenizer, samples, budget, num_generations=8, max_new_tokens=32, seed=0,
                   classes=token_classes):
    """Sample one rollout of the samples from model (sample_rollout) and measure it (gradient_share_of)."""
    prompts = encode_prompts(samples, tokenizer, budget, next(model.parameters()).device)
    roll = sample_rollout(model, tokenizer, prompts, num_generations, max_new_tokens, seed)
    return gradient_share_of(model, tokenizer, roll, samples, classes)


# -----------------------------------------------------------------------------
# zero-advantage rate of a training run


def zero_advantage_rate(completions_jsonl, tol=1e-6):
    """Per step, the fraction of groups (rows with the same step and sample_id) whose rewards,
    reward = accuracy + format + bonus as completion_rows logs them, are all equal (within tol).
    Returns {"step": [...], "zero_advantage_rate": [...]}, steps in order."""
    groups = defaultdict(list)  # (step, sample_id) -> rewards
    with open(completions_jsonl) as f:
        for row in map(json.loads, filter(str.strip, f)):
            r = row.get("reward", row["accuracy"] + row["format"] + row.get("bonus", 0.0))
            groups[row["step"], row["sample_id"]].append(r)
    per_step = defaultdict(list)  # step -> [group has zero advantage]
    for (step, _), rs in groups.items():
        per_step[step].append(max(rs) - min(rs) <= tol)
    steps = sorted(per_step)
    return {"step": steps, "zero_advantage_rate": [sum(per_step[s]) / len(per_step[s]) for s in steps]}


# -----------------------------------------------------------------------------
# teacher forcing: is the fact grounded, does the letter follow it?


def next_token_probs(model, tokenizer, prompt, prefix, candidates):
    """{candidate: P(candidate's first token | prompt + prefix)} for one encoded prompt."""
    batch = encoding.collate_prompts([prompt], tokenizer)
    batch.pop("sample_ids")
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tail = torch.tensor([ids])                                                  # [1, t]
    batch["input_ids"] = torch.cat([batch["input_ids"], tail], 1)              # [1, L + t]
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tail)], 1)
    with torch.no_grad():
        probs = model(**batch).logits[0, -1].softmax(-1)                       # [vocab]
    out = {}
    for c in candidates:
        first = tokenizer(prefix + c, add_special_tokens=False)["input_ids"][len(ids)]  # merges like ">A" kept
        out[c] = probs[first].item()
    return out


def text_only_prompt(prompt, tokenizer):
    """One encoded prompt with its visuals taken out, as CARE's text-only reference sees it
    (encoding.without_visuals)."""
    text = encoding.without_visuals(encoding.collate_prompts([prompt], tokenizer), tokenizer)
    n = int(text["attention_mask"][0].sum())
    return {"input_ids": text["input_ids"][0, -n:], "sample_id": prompt["sample_id"]}


def link(model, tokenizer, samples, truths, budget, reference_input="full"):
    """Grounding and reasoning-to-answer link under teacher forcing (see the module docstring).
    truths: the clip's true value per sample (the benchmark's true_<kind>). reference_input
    "text" reads the model without the clip and the image, as --reference-input text scores."""
    grounded, follows, spread, mass = [], [], [], []
    for sample, truth in zip(samples, truths):
        kind = next(k for k, q in benchmark.QUESTIONS.items() if q in sample.question)
        values = benchmark.VALUES[kind]
        prompt = encoding.encode_prompt(sample, tokenizer, budget)
        if reference_input == "text":
            prompt = text_only_prompt(prompt, tokenizer)
        stem = benchmark.reasoning(kind, "@").split("@")[0].rstrip()          # "The shape is" / "... a"
        fact = next_token_probs(model, tokenizer, prompt, "<think>" + stem, [" " + v for v in values])
        grounded.append(max(fact, key=fact.get) == " " + truth)
        letters = []
        for i, v in enumerate(values):
            p = next_token_probs(model, tokenizer, prompt, f"<think>{benchmark.reasoning(kind, v)}</think><answer",
                                 [">" + x for x in "ABCD"])
            letters.append([p[">" + x] for x in "ABCD"])
            mass.append(sum(letters[-1]))
            follows.append(max(range(4), key=lambda j: p[">" + "ABCD"[j]]) == i)
        letters = torch.tensor(letters)                                         # [values, 4]
        spread.append((letters - letters.mean(0)).abs().max().item())
    n = len(samples)
    return {"n": n, "fact_is_true": sum(grounded) / n, "letter_follows_fact": sum(follows) / len(follows),
            "letter_spread": sum(spread) / n, "letter_mass": sum(mass) / len(mass)}


# -----------------------------------------------------------------------------
# routes: does the right answer come from the reasoning?


def routes(completions, truths, window=50):
    """completions: completions.jsonl rows (step, sample_id, completion, accuracy); truths:
    {sample_id: (kind, true value)}. Returns {"first"|"last": {value: {"n", "accuracy",
    "states_truth", "right_elsewhere"}}} over the first and last `window` steps."""
    last = max(r["step"] for r in completions)
    spans = {"first": (1, window), "last": (last - window + 1, last)}
    out = {}
    for name, (lo, hi) in spans.items():
        per = defaultdict(lambda: {"n": 0, "accuracy": 0.0, "states_truth": 0.0, "right_elsewhere": 0.0})
        for r in completions:
            if not lo <= r["step"] <= hi:
                continue
            kind, truth = truths[r["sample_id"]]
            think = THINK_RE.search(r["completion"])
            named = re.findall(r"\b(" + "|".join(benchmark.VALUES[kind]) + r")\b", think.group(1).lower()) if think else []
            stated = named[-1] if named else None
            v = per[truth]
            v["n"] += 1
            v["accuracy"] += r["accuracy"]
            v["states_truth"] += stated == truth
            v["right_elsewhere"] += r["accuracy"] == 1 and stated != truth
        out[name] = {k: {"n": v["n"], **{m: v[m] / v["n"] for m in ("accuracy", "states_truth", "right_elsewhere")}}
                     for k, v in sorted(per.items())}
    return out


def bonus_split(completions, questions, windows):
    """completions: a CARE run's completions.jsonl rows; questions: {sample_id: question with its
    lettered options}; windows: [(first step, last step)]. Per window, for right answers with a
    reference confidence: {"consistent"|"inconsistent"|"mixed consistent"|"mixed inconsistent":
    {"n", "ref_conf", "bonus_rate"}}, "mixed" counting only groups that hold both kinds."""
    out = []
    for lo, hi in windows:
        groups = defaultdict(list)
        for r in completions:
            if lo <= r["step"] <= hi and r["accuracy"] == 1 and r.get("ref_conf") is not None:
                think = THINK_RE.search(r["completion"])
                verdict = benchmark.rule_verdict(questions[r["sample_id"]], think.group(1) if think else "")
                stated = rewards.extract_answer(r["completion"])
                groups[(r["step"], r["sample_id"])].append((verdict == (stated or "").strip(), r["ref_conf"], r["bonus"] > 0))
        split = defaultdict(list)
        for rows in groups.values():
            mixed = len({c for c, _, _ in rows}) == 2
            for consistent, p, got in rows:
                name = "consistent" if consistent else "inconsistent"
                split[name].append((p, got))
                if mixed:
                    split["mixed " + name].append((p, got))
        out.append({"steps": [lo, hi], **{k: {"n": len(v), "ref_conf": sum(p for p, _ in v) / len(v),
                                               "bonus_rate": sum(g for _, g in v) / len(v)} for k, v in split.items()}})
    return out


# -----------------------------------------------------------------------------
# command line


def budget_of(args):
    """The visual budget of --model under the budget flags (add_budget_flags)."""
    return encoding.budget_from_checkpoint(args.model, **{k: getattr(args, k) for k in benchmark.budget()})


def add_budget_flags(parser):
    for key, value in benchmark.budget().items():   # the experiment's visual budget, as run.py passes it
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value, help=f"visual budget: {key}")


def main_grad_share(args):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    budget = budget_of(args)
    path = args.data or os.path.join(args.data_root, "annotations", "training_6k.jsonl")
    samples, _ = data.load_samples(path, args.data_root, seed=args.seed)
    samples = random.Random(args.seed).sample(samples, min(args.n, len(samples)))
    res = gradient_share(model, tokenizer, samples, budget, args.generations, args.max_new_tokens, args.seed)
    print(f"{'class':8} {'tokens':>7} {'grad_norm':>10} {'share':>6} {'cos':>6}")
    for name, c in res["classes"].items():
        print(f"{name:8} {c['tokens']:7d} {c['grad_norm']:10.3e} {c['share']:6.3f} {c['cos']:6.3f}")
    print(f"{'all':8} {res['tokens']:7d} {res['grad_norm']:10.3e}")
    zero = round(res["zero_advantage_rate"] * res["prompts"])
    print(f"zero-advantage groups: {zero} of {res['prompts']} ({res['zero_advantage_rate']:.3f}); "
          f"reward mean {res['reward_mean']:.3f}, std {res['reward_std']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), **res}, f, indent=1)
        print("wrote", args.out)


def main_zero_adv(args):
    path = os.path.join(args.run, "completions.jsonl") if os.path.isdir(args.run) else args.run
    res = zero_advantage_rate(path)
    for step, rate in zip(res["step"], res["zero_advantage_rate"]):
        print(f"step {step:5d}  {rate:.3f}")
    rates = res["zero_advantage_rate"]
    print(f"mean over {len(rates)} steps: {sum(rates) / max(1, len(rates)):.3f}")


def main_link(args):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    budget = budget_of(args)
    path = args.data or os.path.join(args.data_root, "annotations", "validation_L1.jsonl")
    samples, _ = data.load_samples(path, args.data_root)
    with open(path) as f:
        rows = {r["sample_id"]: r for r in map(json.loads, f)}
    samples = samples[:args.n]
    truths = [rows[s.sample_id]["true_" + rows[s.sample_id]["kind"]] for s in samples]
    res = link(model, tokenizer, samples, truths, budget, args.reference_input)
    print(f"{res['n']} questions ({args.reference_input} prompt): most likely stated value is the true one "
          f"{res['fact_is_true']:.2f}; most likely letter is the stated value's {res['letter_follows_fact']:.2f}; "
          f"letter distribution moves by {res['letter_spread']:.3f} across stated values; the four letters hold "
          f"{res['letter_mass']:.3f} of the probability after <answer")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), **res}, f, indent=1)
        print("wrote", args.out)


def main_routes(args):
    path = os.path.join(args.run, "completions.jsonl") if os.path.isdir(args.run) else args.run
    with open(path) as f:
        completions = [json.loads(line) for line in f]
    with open(os.path.join(args.data_root, "annotations", "training_6k.jsonl")) as f:
        truths = {r["sample_id"]: (r["kind"], r["true_" + r["kind"]]) for r in map(json.loads, f)}
    res = routes(completions, truths, args.window)
    for name, per in res.items():
        print(f"{name} {args.window} steps\n  {'value':10} {'n':>6} {'accuracy':>9} {'states truth':>13} {'right elsewhere':>16}")
        for value, v in per.items():
            print(f"  {value:10} {v['n']:6d} {v['accuracy']:9.2f} {v['states_truth']:13.2f} {v['right_elsewhere']:16.2f}")


def main_bonus(args):
    path = os.path.join(args.run, "completions.jsonl") if os.path.isdir(args.run) else args.run
    with open(path) as f:
        completions = [json.loads(line) for line in f]
    samples, _ = data.load_samples(os.path.join(args.data_root, "annotations", "training_6k.jsonl"), args.data_root)
    questions = {s.sample_id: data.with_options(s.question, s.options) for s in samples}
    last = max(r["step"] for r in completions)
    windows = [(lo, min(lo + args.window - 1, last)) for lo in range(1, last + 1, args.window)]
    for w in bonus_split(completions, questions, windows):
        print(f"steps {w['steps'][0]}-{w['steps'][1]}: " + "; ".join(
            f"{k} n={v['n']} ref_conf={v['ref_conf']:.2f} bonus={v['bonus_rate']:.2f}" for k, v in w.items() if k != "steps"))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gs = sub.add_parser("grad-share", help="gradient share of fact, answer and other tokens in one rollout")
    gs.add_argument("--model", required=True, help="policy checkpoint directory (e.g. SEED/warm or a checkpoint's policy/)")
    gs.add_argument("--data-root", required=True, help="the benchmark directory the media paths are relative to")
    gs.add_argument("--data", default=None, help="annotations file (default: DATA_ROOT/annotations/training_6k.jsonl)")
    gs.add_argument("--n", type=int, default=8, help="prompts, drawn at random (seeded) from --data")
    gs.add_argument("--generations", type=int, default=8, help="G: completions sampled per prompt")
    gs.add_argument("--seed", type=int, default=0, help="seeds the choice of prompts and the sampling")
    gs.add_argument("--max-new-tokens", type=int, default=32, help="longest completion, in tokens")
    gs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    gs.add_argument("--out", default=None, help="also write the result as JSON here")
    add_budget_flags(gs)
    ln = sub.add_parser("link", help="teacher-forced grounding of the stated fact and its link to the letter")
    ln.add_argument("--model", required=True, help="checkpoint directory")
    ln.add_argument("--data-root", required=True, help="the benchmark directory")
    ln.add_argument("--data", default=None, help="annotations (default: DATA_ROOT/annotations/validation_L1.jsonl)")
    ln.add_argument("--n", type=int, default=20, help="the first n questions")
    ln.add_argument("--reference-input", choices=("full", "text"), default="full",
                    help="full: the prompt with its clip and image; text: without them, as CARE's text-only "
                         "reference (train.py --reference-input text) scores the answer")
    ln.add_argument("--out", default=None, help="also write the result as JSON here")
    add_budget_flags(ln)
    ro = sub.add_parser("routes", help="per true value: accuracy, true reasoning, right answers without it")
    ro.add_argument("run", help="a train.py output directory run with --log-completions, or its completions.jsonl")
    ro.add_argument("--data-root", required=True, help="the benchmark directory (its training_6k.jsonl has the truths)")
    ro.add_argument("--window", type=int, default=50, help="steps at the start and at the end")
    bo = sub.add_parser("bonus", help="reference confidence and bonus of right answers, consistent or not")
    bo.add_argument("run", help="a train.py --algo care output directory run with --log-completions")
    bo.add_argument("--data-root", required=True, help="the benchmark directory")
    bo.add_argument("--window", type=int, default=100, help="steps per window")
    za = sub.add_parser("zero-adv", help="per-step zero-advantage group rate of a training run")
    za.add_argument("run", help="a train.py output directory run with --log-completions, or its completions.jsonl")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    {"grad-share": main_grad_share, "link": main_link, "routes": main_routes, "bonus": main_bonus, "zero-adv": main_zero_adv}[args.command](args)


if __name__ == "__main__":
    main()
