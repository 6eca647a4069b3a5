"""Deliberate breakages, each run against the tests named for it: a test suite that cannot see a
breakage of the step, the rewards, the reference, LoRA, SFT, checkpoints or rollouts is missing a
test. Not part of the CI run (pytest collects test_*.py only); run it before changing any of
those files, and after, from the repository root:

    python tests/mutations.py              # all of them, ~30 minutes on 2 cores
    python tests/mutations.py --only seed  # those whose name contains "seed"
    python tests/mutations.py --list

Each breakage is applied to a scratch copy of the working tree (tracked and untracked files),
one at a time, and the named tests run there with -x. "killed" means a test failed on a value
(an assertion); "crash" that only an exception other than an assertion stopped it, which is
luck, not a test; "survived" that every test passed. The tiny models and data are built once
and shared by the runs (GRPO_CARE_TEST_CACHE). Exit status 0 iff every breakage is killed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Breakage:
    name: str
    file: str
    old: str      # must occur exactly once in file
    new: str
    tests: tuple  # pytest arguments: files, or file::test, or "-k" expressions after a file


BREAKAGES = [
    # --- the step (train.py) ---
    Breakage("ppo-old-logprobs-recomputed-each-iteration", "train.py",
             "    for _ in range(cfg.num_iterations):\n",
             "    for _ in range(cfg.num_iterations):\n        if cfg.num_iterations > 1:\n"
             "            with torch.no_grad(), accelerator.autocast():\n"
             "                old_logp = rollout.completion_logprobs(model, completions, chunk)\n",
             ("tests/test_wiring.py", "-k", "grpo_loss")),
    Breakage("grad-clip-after-the-optimizer-step", "train.py",
             "        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)\n"
             "        grad_norm = guards.finite_grad_norm(accelerator, grad_norm, batch.step, batch.sample_ids)\n"
             "        optimizer.step()\n",
             "        optimizer.step()\n"
             "        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)\n"
             "        grad_norm = guards.finite_grad_norm(accelerator, grad_norm, batch.step, batch.sample_ids)\n",
             ("tests/test_wiring.py", "-k", "optimizer_gets")),
    Breakage("rollout-seed-ignores-the-step", "train.py",
             'random.Random(f"{seed}/{step}/{sample_index}")', 'random.Random(f"{seed}/{sample_index}")',
             ("tests/test_wiring.py", "-k", "each_epoch")),
    Breakage("seeds-by-position-among-kept-samples", "train.py",
             "seeds = [rollout_seed(cfg.seed, step, indices[k]) for k in kept]",
             "seeds = [rollout_seed(cfg.seed, step, indices[j]) for j, _ in enumerate(kept)]",
             ("tests/test_train.py", "-k", "bad_video")),
    Breakage("advantages-without-the-bonus", "train.py",
             'care.group_advantages(scores["reward"])', "care.group_advantages(acc + weighted_fmt)",
             ("tests/test_wiring.py", "-k", "advantages or loss_gets")),
    Breakage("format-weight-ignored", "train.py", "weighted_fmt = cfg.format_weight * fmt", "weighted_fmt = fmt",
             ("tests/test_wiring.py", "-k", "format_weight")),
    Breakage("ema-every-step", "train.py", "batch.step % cfg.ema_every == 0", "True",
             ("tests/test_wiring.py", "-k", "ema_every")),
    Breakage("kl-clamp-not-passed", "train.py", "kl_clamp=cfg.kl_clamp", "kl_clamp=10.0",
             ("tests/test_wiring.py", "-k", "seed_bench_r1")),
    Breakage("reward-rules-not-passed", "train.py", "types, cfg.reward_rules)", "types)",
             ("tests/test_wiring.py", "-k", "reproduce_official")),
    Breakage("answer-span-not-passed", "train.py", "cfg.logprob_chunk_size,\n                                                         cfg.answer_span)",
             "cfg.logprob_chunk_size)", ("tests/test_wiring.py", "-k", "reproduce_official")),
    Breakage("text-reference-reads-the-full-prompt", "train.py", '        if cfg.reference_input == "text":\n',
             "        if False:\n", ("tests/test_reference.py", "-k", "text_reference")),
    Breakage("text-prompt-keeps-the-vision-start-tokens", "encoding.py",
             'VISION_MARKS = ("<|vision_start|>", "<|vision_end|>", VIDEO_PAD, IMAGE_PAD)',
             'VISION_MARKS = ("<|vision_end|>", VIDEO_PAD, IMAGE_PAD)', ("tests/test_reference.py", "-k", "text")),
    Breakage("prompt-template-not-passed", "train.py", "cfg.skip_bad_samples, template)", "cfg.skip_bad_samples)",
             ("tests/test_wiring.py", "-k", "reproduce_official")),
    Breakage("linear-schedule-ignored", "train.py", '"linear": get_linear_schedule_with_warmup',
             '"linear": get_cosine_schedule_with_warmup', ("tests/test_wiring.py", "-k", "seed_bench_r1")),
    # --- the maths (care.py) ---
    Breakage("bonus-not-scaled-by-accuracy", "care.py", "bonus = bonus_coef * acc * consistent.to(acc.dtype)",
             "bonus = bonus_coef * consistent.to(acc.dtype)", ("tests/test_care.py",)),
    Breakage("high-accuracy-set-without-the-group-mean", "care.py",
             "(acc > 0.1) & (acc >= _mean_within_range(acc)) & has_span", "(acc > 0.1) & has_span",
             ("tests/test_care.py",)),
    Breakage("advantage-std-biased", "care.py", "std = rewards.std(1, keepdim=True)",
             "std = rewards.std(1, keepdim=True, unbiased=False)", ("tests/test_care.py",)),
    Breakage("confidence-not-capped", "care.py", "p = torch.exp(answer_logp).clamp(max=conf_cap)",
             "p = torch.exp(answer_logp)", ("tests/test_care.py",)),
    Breakage("kl-clamp-ignored", "care.py", "    if clamp > 0:\n        d = d.clamp(-clamp, clamp)\n", "",
             ("tests/test_fidelity.py", "-k", "kl")),
    # --- rewards ---
    Breakage("first-answer-block", "rewards.py", "end = text.rfind(CLOSE)", "end = text.find(CLOSE)",
             ("tests/test_rewards.py",)),
    Breakage("answer-across-tags", "rewards.py",
             "return None if any(tag in text[start:end] for tag in TAGS) else (start, end)", "return (start, end)",
             ("tests/test_rewards.py",)),
    Breakage("format-not-stripped", "rewards.py", "FORMAT_RE.fullmatch(completion.strip())",
             "FORMAT_RE.fullmatch(completion)", ("tests/test_rewards.py",)),
    Breakage("spaces-inside-numbers-dropped", "rewards.py", 'x = float(text.strip().replace(",", ""))',
             'x = float(text.replace(" ", "").replace(",", ""))', ("tests/test_rewards.py",)),
    Breakage("official-decimal-rule-dropped", "rewards.py",
             '    if ("." in gt or "," in gt) != ("." in pred or "," in pred):\n        return 0.0\n', "",
             ("tests/test_fidelity.py",)),
    Breakage("official-regression-without-epsilon", "rewards.py", "(abs(p - g) + 1e-9) / (abs(g) + 1e-9)",
             "abs(p - g) / max(abs(g), 1e-9)", ("tests/test_fidelity.py",)),
    # --- the reference ---
    Breakage("answer-span-one-token-short", "reference.py", "bisect.bisect_left(ends, b) + 1)",
             "bisect.bisect_left(ends, b))", ("tests/test_reference.py", "tests/test_real_tokenizer.py")),
    Breakage("ema-lerps-the-wrong-way", "reference.py", "mine.lerp_(theirs.to(mine.dtype), 1.0 - decay)",
             "mine.lerp_(theirs.to(mine.dtype), decay)", ("tests/test_reference.py",)),
    Breakage("public-span-drops-two-not-three", "reference.py", "lo, hi = a + 1, max(a + 1, stop - 3)",
             "lo, hi = a + 1, max(a + 1, stop - 2)", ("tests/test_fidelity.py", "-k", "span")),
    # --- LoRA ---
    Breakage("lora-reference-left-in-train-mode", "lora.py", "        self.policy.eval()\n", "",
             ("tests/test_lora.py", "-k", "without_dropout")),
    Breakage("lora-grpo-reference-with-adapters-on", "lora.py",
             "with self.ema_swapped_in() if self.ema is not None else adapters_disabled(self.policy):",
             "with self.ema_swapped_in() if self.ema is not None else contextlib.nullcontext():",
             ("tests/test_lora.py", "-k", "grpo_reference")),
    # --- SFT ---
    Breakage("sft-loss-a-token-mean-per-micro-batch", "sft.py", "nll = -logp.sum() * weight",
             "nll = -logp.sum() / logp.ne(0).sum() * tokens * weight", ("tests/test_sft.py", "-k", "accumulating")),
    Breakage("sft-replies-paired-with-the-wrong-prompts", "sft.py",
             "ids = pad([e.target for e in examples], tokenizer.pad_token_id)",
             "ids = pad([e.target for e in examples[::-1]], tokenizer.pad_token_id)",
             ("tests/test_sft.py", "-k", "accumulating")),
    Breakage("sft-template-not-passed", "sft.py",
             "steps_per_epoch, template)", "steps_per_epoch)", ("tests/test_sft.py", "-k", "template")),
    # --- checkpoints ---
    Breakage("ema-reference-not-restored", "checkpoint.py", "fsdp.load_sharded(path, model, optimizer, ref_model, metadata)",
             "fsdp.load_sharded(path, model, optimizer, None, metadata)", ("tests/test_train.py", "-k", "resume_continues")),
    Breakage("data-order-not-compared-on-resume", "checkpoint.py", "    changes = data_changes(saved, record, checked_out)\n",
             "    changes = []\n", ("tests/test_checkpoint.py", "-k", "rewritten_in_place or check_data_added")),
    Breakage("scheduler-not-restored", "checkpoint.py", 'scheduler.load_state_dict(state.pop("scheduler"))',
             'state.pop("scheduler")', ("tests/test_train.py", "-k", "resume_continues")),
    # --- rollouts ---
    Breakage("every-group-sampled-from-prompt-0", "prefix_sharing.py", "one = select_prompt(prompts, i)",
             "one = select_prompt(prompts, 0)", ("tests/test_rollout.py", "-k", "own_prompt")),
    Breakage("the-rows-of-a-group-share-one-stream", "rollout.py", 'random.Random(f"{s}/{j}")', 'random.Random(f"{s}")',
             ("tests/test_rollout.py", "-k", "draws_are_its_own")),
    Breakage("sampling-ignores-top-p", "rollout.py",
             "([TopPLogitsWarper(gen_config.top_p)] if gen_config.top_p < 1.0 else [])", "[]",
             ("tests/test_rollout.py", "-k", "processed_distribution")),
    Breakage("one-rope-offset-for-every-row", "prefix_sharing.py",
             "model.model.rope_deltas = torch.cat(deltas).repeat_interleave(g, dim=0)",
             "model.model.rope_deltas = deltas[0]", ("tests/test_rollout.py", "-k", "four_prompts")),
    Breakage("merged-cache-padded-on-the-right", "prefix_sharing.py",
             "keys.append([F.pad(layer.keys, (0, 0, pad, 0)) for layer in cache.layers])",
             "keys.append([F.pad(layer.keys, (0, 0, 0, pad)) for layer in cache.layers])",
             ("tests/test_rollout.py", "-k", "four_prompts")),
    Breakage("every-step-reuses-the-first-draw", "rollout.py",
             "step = input_ids.shape[1] - self.prompt_width\n",
             "step = 0 * (input_ids.shape[1] - self.prompt_width)\n",
             ("tests/test_rollout.py", "-k", "draws_anew")),
    Breakage("evaluation-seeds-by-batch", "evaluate.py", "seeds = [sample_seed(args.seed, item[0]) for item in kept]",
             "seeds = [sample_seed(args.seed, k) for _ in kept]", ("tests/test_evaluate.py", "-k", "sample_by_sample")),
    Breakage("every-group-scored-under-prompt-0", "prefix_sharing.py",
             "pack_group(model, select_prompt(prompts, i),", "pack_group(model, select_prompt(prompts, 0),",
             ("tests/test_rollout.py", "-k", "own_prompt", "tests/test_reference.py")),
    Breakage("mask-stops-before-the-end-of-turn", "rollout.py", "(positions[None, :] <= first_eos[:, None])",
             "(positions[None, :] < first_eos[:, None])", ("tests/test_rollout.py",)),
    Breakage("only-im-end-stops", "rollout.py", "    ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])\n",
             "", ("tests/test_rollout.py", "-k", "stops")),
    Breakage("training-stops-at-im-end-only", "train.py", ", stop=rollout.stop_ids(tokenizer, policy))", ")",
             ("tests/test_wiring.py", "-k", "sampling_gets")),
    Breakage("the-judge-stops-at-its-eos-only", "judge.py", "{tokenizer.eos_token_id} | set(rollout.stop_ids(tokenizer, judge))",
             "{tokenizer.eos_token_id}", ("tests/test_wiring.py", "-k", "stop_where")),
    Breakage("the-analysis-stops-at-im-end-only", "analyze.py", "do_sample=False, stop=stop)", "do_sample=False)",
             ("tests/test_wiring.py", "-k", "stop_where")),
    # --- what the model sees ---
    Breakage("official-layout-without-the-blank-line", "encoding.py",
             'return f"{question}{block}\\n{THINKING} {answer_format}"',
             'return f"{question}{block}{THINKING} {answer_format}"', ("tests/test_data.py", "-k", "layout")),
    Breakage("resize-to-ignored", "encoding.py", "    if budget.resize_to:\n", "    if False:\n",
             ("tests/test_fidelity.py",)),
    Breakage("floor-frame-rounding-ignored", "encoding.py", 'if budget.frame_rounding == "floor":', "if False:",
             ("tests/test_fidelity.py",)),
    Breakage("official-bounds-not-in-the-switch", "config.py",
             '"video_min_pixels": 128 * 28 * 28, "video_max_pixels": int(128 * 28 * 28 * 1.05),\n            ', "",
             ("tests/test_fidelity.py",)),
    # --- evaluation ---
    Breakage("scoring-rules-not-passed", "evaluate.py", "**score(s, text, args.scoring)", "**score(s, text)",
             ("tests/test_evaluate.py", "-k", "public_evaluations")),
    Breakage("rows-zipped-to-the-wrong-completions", "evaluate.py", "for (key, s, bench, _), text in zip(kept, texts)]",
             "for (key, s, bench, _), text in zip(kept, texts[::-1])]", ("tests/test_evaluate.py", "-k", "sample_by_sample")),
    Breakage("compare-across-rules", "results.py", "    if scoring_of(a) != scoring_of(b):\n", "    if False:\n",
             ("tests/test_evaluate.py", "-k", "compare_refuses")),
]


def scratch_copy():
    """The working tree (tracked and untracked, not ignored) in a temporary directory."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    dest = tempfile.mkdtemp(prefix="mutations-")
    for f in filter(None, files):
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def verdict(rc, output):
    """killed (a test failed on an assertion), crash (only other exceptions) or survived."""
    if rc == 0:
        return "survived"
    errors = [line for line in output.splitlines() if line.startswith("E ")]
    if any(re.match(r"E\s+(AssertionError|assert |Failed: )", line) for line in errors):
        return "killed"
    return "crash" + (f" ({errors[-1][1:].strip()[:100]})" if errors else f" (rc {rc})")


def run(breakage, copy, env):
    path = os.path.join(copy, breakage.file)
    with open(path) as f:
        original = f.read()
    if original.count(breakage.old) != 1:
        return f"not applied: the text occurs {original.count(breakage.old)} times in {breakage.file}", 0.0
    with open(path, "w") as f:
        f.write(original.replace(breakage.old, breakage.new))
    start = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
                               *breakage.tests], cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        return verdict(done.returncode, done.stdout + done.stderr), time.time() - start
    finally:
        with open(path, "w") as f:
            f.write(original)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run only the breakages whose name contains this")
    p.add_argument("--list", action="store_true", help="list the breakages and their tests, run nothing")
    args = p.parse_args(argv)
    chosen = [b for b in BREAKAGES if args.only in b.name]
    if args.list:
        for b in chosen:
            print(f"{b.name:48s} {b.file:18s} {' '.join(b.tests)}")
        return 0
    copy = scratch_copy()
    env = {**os.environ, "GRPO_CARE_TEST_CACHE": os.path.join(copy, ".fixture-cache"), "COLUMNS": "200"}
    results = []
    try:
        for b in chosen:
            result, seconds = run(b, copy, env)
            results.append((b, result))
            print(f"{result.split(' (')[0]:9s} {seconds:5.0f} s  {b.name}  [{b.file}]" +
                  (f"  {result}" if not result.startswith(("killed", "survived")) else ""), flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    killed = sum(r == "killed" for _, r in results)
    print(f"\n{killed} of {len(results)} breakages killed by a value")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
