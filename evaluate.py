"""Evaluate a checkpoint: accuracy per benchmark, level, domain and question type, and the
consistency rate (how often the reasoning leads to the answer the model gives).

    # SEED-Bench-R1 validation, L1/L2/L3 (16 frames)
    python evaluate.py --model runs/care/checkpoint-001500/policy --data-root SEED-Bench-R1 \\
        --data SEED-Bench-R1/annotations/validation_L{1,2,3}.jsonl --output-dir runs/care/eval
    # general video benchmarks in Video-R1's eval format (32 frames), data-parallel on 4 GPUs
    torchrun --nproc_per_node 4 evaluate.py --model runs/care/checkpoint-001500/policy \\
        --data-root Video-R1-eval --data eval_mvbench.json eval_videomme.json --output-dir runs/care/eval-general
    # GRPO versus GRPO-CARE
    python evaluate.py compare runs/grpo/eval/summary.json runs/care/eval/summary.json

Decoding is near-greedy by default. Each answer is scored by its problem type: the
option letter, a number, OCR word error rate, ROUGE, and mean relative accuracy for
regression. Consistency: a judge model (--judge, by default the evaluated model) reads each
multiple-choice question, its options and the sample's reasoning with the final answer
removed, and names the option the reasoning leads to; the sample is consistent when that is
the option it answered. A judge reply we cannot parse is counted as undecided (and as not
consistent), never dropped.

The work list (every file's samples, in order) is cut into batches of --batch-size; batch k
goes to process k mod W, and each sample is sampled from its own random stream, seeded by
--seed and the sample's key, so W processes write what one writes, any --batch-size what any
other does, and a resumed run what an uninterrupted one writes. Each process appends its rows
to predictions.part<rank>.jsonl as it goes; a re-run skips the batches whose rows are all
written and evaluates a partly written one again, whole (after a change of --data or --limit
the batches shift, and finished rows are reused as they are). At the end the new rows are
gathered into predictions.jsonl, which keeps every finished row of the directory (also of
files, or beyond --limit, that only earlier runs asked for), and into summary.json and
summary.md, which count only this run's files and --limit.

An output directory holds the rows of one set of settings (results.py): every flag that
shapes a row is recorded in eval_settings.json and hashed into each row; a re-run with other
settings stops and names each change, and --overwrite starts over.
"""

import argparse
import json
import os
import random
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

import data
import encoding
import config
import judge
import models
import results
import rewards
import rollout

BUDGET = encoding.VisualBudget()  # the visual budget's defaults, as in training
GENERAL_MAX_FRAMES = 32  # the general video benchmarks' frame budget (Video-R1's evaluation)

# ---------------------------------------------------------------------------------------------
# Scoring


def score(sample, completion, rules="ours"):
    """Score one completion by `rules` (--scoring: rewards.eval_score). Under ours, as in the
    public evaluation, a completion with no <answer> block is compared as a whole (so a bare "B"
    still counts); format validity (our rule) is reported apart."""
    return {"answer": rewards.extract_answer(completion),
            "score": rewards.eval_score(completion, sample.solution, sample.problem_type, rules),
            "format_ok": bool(rewards.format_reward(completion))}


# --reproduce-official: the public GRPO-CARE evaluation (src/eval_bench.py): its scoring and prompt
# layout, and qwen_vl_utils' frame count and per-frame bounds. It passes the sampled fps to the
# model (--second-per-grid 0, ours too) and decodes at temperature 0.1, top-p 0.001, 1,024 new
# tokens, 16 frames for SEED-Bench-R1 and 32 for the general benchmarks (ours too).
OFFICIAL = {"scoring": "official", **{k: v for k, v in config.OFFICIAL.items()
                                       if k in ("prompt_template", "frame_rounding", "video_min_pixels",
                                                "video_max_pixels", "resize_rule")}}
# --preset seed-bench-r1: SEED-Bench-R1's infer.py: its scoring, prompt and visual pipeline
# (config.PRESETS), 256 new tokens, and the repetition penalty of 1.05 that its generate() call
# inherits from Qwen2-VL-7B-Instruct's generation_config (whose top-k 1 makes it greedy, as our
# near-greedy defaults are).
PRESETS = {"seed-bench-r1": {"scoring": "seed-bench-r1", "max_new_tokens": 256, "repetition_penalty": 1.05,
                             **{k: v for k, v in config.PRESETS["seed-bench-r1"].items()
                                if k in ("prompt_template", "max_frames", *encoding.BUDGET_FLAGS)}}}


def given_flags(parser, argv):
    """The destinations of the options that argv gives explicitly."""
    given = set()
    for action in parser._actions:  # internal: argparse has no public list of a parser's options
        if any(arg == opt or arg.startswith(opt + "=") for opt in action.option_strings for arg in argv):
            given.add(action.dest)
    return given


# ---------------------------------------------------------------------------------------------
# The command line, and the work: which samples, in which batches, on which process


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends each option's help with its default, unless
    the help names it already (required options, defaults that depend on the file)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return action.help + (" (default: off)" if action.nargs == 0 else " (default: %(default)s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the checkpoint: a local Hugging Face directory (required)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="annotation files, SEED-Bench-R1 JSONL or Video-R1-style JSON, one benchmark each (required)")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="the directory the files' video and image paths are relative to (required)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the predictions and summaries go; a re-run resumes there (required)")
    p.add_argument("--judge", default="self",
                   help='"self" (the evaluated model), "none", a local chat model directory, '
                        'or FILE.py:FUNCTION (a rule)')
    p.add_argument("--judge-max-new-tokens", type=int, default=512, metavar="N",
                   help="room for a judge that reasons before it answers (its last <answer> counts)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="samples per generate call; it fixes the batches and so the sampled tokens")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="longest completion, in tokens")
    p.add_argument("--temperature", type=float, default=0.1, metavar="T", help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.001, metavar="P",
                   help="nucleus sampling: the probability mass kept")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1.0 = off")
    p.add_argument("--decode", choices=rollout.DECODES, default="static",
                   help="static (a preallocated KV cache), dynamic (transformers' growing one) or compiled (the static "
                        "cache, the language model's decode step compiled)")
    p.add_argument("--scoring", choices=rewards.RULES, default="ours",
                   help="the rules that score each answer: ours, official (the public GRPO-CARE evaluation: the "
                        "first <answer>, exact letters, OCR and free-form 0) or seed-bench-r1 (its first-letter "
                        "match); recorded, and compare refuses summaries scored by different rules")
    p.add_argument("--prompt-template", default="ours", metavar="NAME|FILE", help=encoding.TEMPLATE_HELP)
    p.add_argument("--reproduce-official", action="store_true",
                   help="score and prompt as the public GRPO-CARE evaluation does (flags given explicitly win): "
                        + config.flags(OFFICIAL))
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="evaluate as a published recipe's inference script does (flags given explicitly win): "
                        + "; ".join(f"{k}: {config.flags(v)}" for k, v in PRESETS.items()) + " (default: none)")
    encoding.add_budget_arguments(p, max_frames_help=f"most frames per video (default: {BUDGET.max_frames} for "
                                                      f"SEED-Bench-R1 files, {GENERAL_MAX_FRAMES} for Video-R1-style files)")
    p.add_argument("--allow-outside-data-root", action="store_true",
                   help="allow media paths that resolve outside --data-root")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="evaluate only the first N samples of each file; 0: all")
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "no"), default="auto",
                   help="the model's weights and compute: bf16, or no (fp32); auto: bf16 on GPU, no on CPU. "
                        "Recorded resolved, so auto on a CPU and no share their rows")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds each sample's sampling (with its key) and the option order of training files")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip and count samples whose row, video or image cannot be read, instead of stopping")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results in --output-dir first (needed when the settings changed)")
    args = p.parse_args(argv)
    explicit = given_flags(p, argv or [])
    for wanted, values in ((args.preset, PRESETS.get(args.preset, {})), (args.reproduce_official, OFFICIAL)):
        for name, value in values.items() if wanted else ():
            if name not in explicit:
                setattr(args, name, value)
    check_args(p, args)
    return args


def check_args(parser, args):
    """Stop on a bad setting with one line naming it, before anything is loaded."""
    at_least_one = ["batch_size", "max_new_tokens", "judge_max_new_tokens"]
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be above 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if problem := encoding.budget_problem(args):
        parser.error(problem)
    if not args.repetition_penalty > 0:
        parser.error(f"--repetition-penalty must be above 0, got {args.repetition_penalty}")
    try:
        encoding.prompt_template(args.prompt_template)
    except ValueError as e:
        parser.error(str(e))
    if args.limit < 0:
        parser.error(f"--limit must be 0 (all) or more, got {args.limit}")
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such directory (evaluation takes a local checkpoint)")
    missing = [path for path in args.data if not os.path.isfile(path)]
    if missing:
        parser.error(f"--data: no such file: {', '.join(missing)}")
    if not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root}: no such directory")
    if judge.is_rule(args.judge) and not os.path.isfile(args.judge.rsplit(":", 1)[0]):
        parser.error(f"--judge {args.judge}: no such file")
    if args.judge not in ("self", "none") and not judge.is_rule(args.judge) and not os.path.isdir(args.judge):
        parser.error(f"--judge {args.judge}: no such directory (a judge model is a local checkpoint)")
    if problem := models.model_problem(args.model):
        parser.error(f"--model {args.model}: {problem}")


def flag(name):
    return "--" + name.replace("_", "-")


def load_work(args):
    """[(key, sample, benchmark, max_frames)] over all files, in file order. The key is
    benchmark/sample_id (#2, #3, ... on repeats within a file: some files reuse ids)."""
    work, skipped = [], []
    for path in args.data:
        samples, skips = data.load_samples(path, args.data_root, seed=args.seed, skip_bad=args.skip_bad_samples,
                                          allow_outside_root=args.allow_outside_data_root)
        skipped += skips
        samples = samples[: args.limit] if args.limit else samples
        seed_bench = bool(samples) and samples[0].level is not None
        bench = samples[0].level if seed_bench else os.path.splitext(os.path.basename(path))[0]
        frames = args.max_frames or (BUDGET.max_frames if seed_bench else GENERAL_MAX_FRAMES)
        seen = defaultdict(int)
        for s in samples:
            seen[s.sample_id] += 1
            key = f"{bench}/{s.sample_id}" + (f"#{seen[s.sample_id]}" if seen[s.sample_id] > 1 else "")
            work.append((key, s, bench, frames))
    return work, skipped


NOT_SETTINGS = ("output_dir", "data", "limit", "skip_bad_samples", "overwrite", "allow_outside_data_root")  # which rows, not what they hold


def compute_dtype(mixed_precision):
    """--mixed-precision as the dtype the model is loaded and run in: auto is bf16 on a GPU,
    fp32 on a CPU (as in training: checkpoint.resolved)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def row_settings(args):
    """Every flag that shapes a row: all but NOT_SETTINGS, so that a new flag counts unless it
    is listed there. Paths are made absolute: the same checkpoint through another path or a
    symlink is the same setting; --mixed-precision is recorded as resolved (auto: bf16 or no)."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    if args.prompt_template not in encoding.LAYOUTS:  # a file: where it is, and what it says
        settings["prompt_template"] = encoding.prompt_template(args.prompt_template).record()
    settings.update(model=os.path.realpath(args.model), data_root=os.path.realpath(args.data_root),
                    mixed_precision="bf16" if compute_dtype(args.mixed_precision) == torch.bfloat16 else "no")
    if judge.is_rule(args.judge):
        file, function = args.judge.rsplit(":", 1)
        settings["judge"] = f"{os.path.realpath(file)}:{function}"
    elif args.judge not in ("self", "none"):
        settings["judge"] = os.path.realpath(args.judge)
    return settings


def compare_main(argv):
    p = argparse.ArgumentParser(prog="evaluate.py compare",
                                description="Accuracy and consistency of two evaluations side by side, with B - A.")
    p.add_argument("a", metavar="A/summary.json", help="the baseline's summary.json (e.g. GRPO)")
    p.add_argument("b", metavar="B/summary.json", help="the summary.json compared with it (e.g. GRPO-CARE)")
    args = p.parse_args(argv)
    table = results.compare(args.a, args.b)
    print(table)
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import AutoTokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu: torchrun forms a gloo group
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    settings = row_settings(args)
    tag = results.settings_hash(settings)
    if not args.overwrite:
        results.check_output_dir(args.output_dir, settings)  # on every process: all of them stop
    if accelerator.is_main_process:
        results.start_output_dir(args.output_dir, settings, args.overwrite)
    accelerator.wait_for_everyone()
    # bf16 weights and compute, or fp32 (--mixed-precision). Loaded in that dtype, and nothing
    # casts it back: the forward runs in the weights' dtype (no autocast here).
    dtype = compute_dtype(args.mixed_precision)
    # The checkpoint's own family (models.FAMILIES), as train.py loads it; sdpa attention.
    model = models.load_model(args.model, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    judge_model, judge_tokenizer = judge.load_judge(args.judge, model, tokenizer, device, dtype)
    gen_config = rollout.sampling_config(tokenizer, args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, top_k=0, repetition_penalty=args.repetition_penalty,
                                         stop=rollout.stop_ids(tokenizer, model))
    template = encoding.prompt_template(args.prompt_template)
    budgets = {}

    def budget(frames):
        if frames not in budgets:
            budgets[frames] = encoding.budget_from_checkpoint(
                args.model, fps=args.fps, min_frames=min(args.min_frames, frames), max_frames=frames,
                video_min_pixels=args.video_min_pixels, video_max_pixels=args.video_max_pixels,
                image_min_pixels=args.image_min_pixels, image_max_pixels=args.image_max_pixels,
                second_per_grid=args.second_per_grid, frame_rounding=args.frame_rounding,
                resize_rule=args.resize_rule, resize_to=args.resize_to)
        return budgets[frames]

    work, load_skips = load_work(args)  # the same on every process: printed and counted once
    if problem := rewards.check_rules_cover(args.scoring, {w[1].problem_type for w in work}):
        raise data.DataError(f"--scoring {args.scoring}: {problem}")
    for message in load_skips if accelerator.is_main_process else []:
        print(f"skipped while loading: {one_line(message)}", file=sys.stderr)
    order = {w[0]: i for i, w in enumerate(work)}
    done, other = results.finished_rows(args.output_dir, tag)
    if other:
        accelerator.print(f"{other} rows made under other settings left out (their samples are evaluated again)")
    accelerator.wait_for_everyone()  # everyone has read the rows: fold the part files in before anyone appends
    if accelerator.is_main_process and (other or results.part_files(args.output_dir)):
        results.save_rows(args.output_dir, done, order)
    accelerator.wait_for_everyone()
    batches = [work[i:i + args.batch_size] for i in range(0, len(work), args.batch_size)]
    todo = [k for k, batch in enumerate(batches) if any(item[0] not in done for item in batch)]
    accelerator.print(f"{len(work)} samples in {len(batches)} batches: {len(batches) - len(todo)} done, "
                      f"{len(todo)} to evaluate on {world} process(es)")

    new_rows, skips = [], []
    with open(os.path.join(args.output_dir, f"predictions.part{rank}.jsonl"), "a") as part:
        for k in tqdm([k for k in todo if k % world == rank], desc="eval", disable=not accelerator.is_main_process):
            batch = batches[k]
            kept, encoded, skipped_here = encoding.encode_batch([item[1] for item in batch], tokenizer,
                                                                [budget(item[3]) for item in batch],
                                                                skip_bad=args.skip_bad_samples, template=template)
            left_out = [item for i, item in enumerate(batch) if i not in kept]
            for item, message in zip(left_out, skipped_here):  # printed by the process it happens on
                tqdm.write(f"process {rank}: skipped {item[0]}: {one_line(message)}", file=sys.stderr)
            skips += skipped_here
            kept = [batch[i] for i in kept]
            if all(item[0] in done for item in kept):  # all but the skipped samples are done
                continue
            prompts = {key: (v.to(device) if torch.is_tensor(v) else v)
                       for key, v in encoding.collate_prompts(encoded, tokenizer).items()}
            seeds = [sample_seed(args.seed, item[0]) for item in kept]   # whatever the batch or process
            texts = rollout.generate(model, prompts, tokenizer, 1, gen_config, seeds, decode=args.decode).texts
            rows = [{"key": key, "sample_id": s.sample_id, "benchmark": bench, "level": s.level,
                     "domain": s.domain, "problem_type": s.problem_type, "solution": s.solution,
                     "completion": text, **score(s, text, args.scoring), "settings": tag}
                    for (key, s, bench, _), text in zip(kept, texts)]
            judge.judge_rows(judge_model, judge_tokenizer, [item[1] for item in kept], rows, args.judge_max_new_tokens)
            for row in rows:
                part.write(json.dumps(row) + "\n")
            part.flush()
            new_rows += rows

    gathered = gather_object(new_rows) if world > 1 else new_rows
    skipped = load_skips + sorted(gather_object(skips) if world > 1 else skips)  # each encoded on one process
    summary = None
    if accelerator.is_main_process:
        by_key = {**done, **{row["key"]: row for row in gathered}}  # a re-run batch's rows replace its old ones
        results.save_rows(args.output_dir, by_key, order)
        rows = [by_key[w[0]] for w in work if w[0] in by_key]  # this run's files and --limit only
        summary = write_summary(args, settings, rows, skipped)
    accelerator.wait_for_everyone()
    return summary


def sample_seed(seed, key):
    """The sampling seed of one sample of the work list, fixed by --seed and its key."""
    return random.Random(f"{seed}/{key}").getrandbits(63)


def one_line(message):
    return " ".join(str(message).split())


def write_summary(args, settings, rows, skipped):
    summary = results.summarize(rows, judged=args.judge != "none")
    results.write_atomic(os.path.join(args.output_dir, "summary.json"), json.dumps(
        {"model": args.model, "judge": args.judge, "data": args.data, "samples": len(rows), "skipped": len(skipped),
         "skipped_messages": skipped, "settings": settings, "results": summary}, indent=2))
    results.write_atomic(os.path.join(args.output_dir, "summary.md"),
                         f"{args.model} (judge: {args.judge})\n\n{results.format_table(summary)}\n")
    print(results.format_table(summary))
    if skipped:
        print(f"{len(skipped)} samples skipped (--skip-bad-samples); see summary.json")
    return summary


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # a bad row, file or video: the message names it
        sys.exit(f"evaluate.py: {e}")
    if torch.distributed.is_initialized():
        # Every process has written its rows and passed the last barrier. Tearing gloo down
        # (destroy_process_group, or the interpreter's exit) can abort a process whose peer
        # closed its sockets first ("terminate called without an active exception", about one
        # 2-process run in eight here): leave without running the C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
