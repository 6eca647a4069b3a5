"""What a run writes while it trains: log.jsonl (one row per step, averaged over processes),
completions.jsonl (--log-completions: every completion and how it was scored), and the
progress bar, which shows the numbers that tell whether a run is healthy.

A log row: reward and its parts (reward_acc, reward_fmt, reward_bonus), bonus_rate (share of
completions given the CARE bonus), ref_conf (mean reference confidence over completions with an
answer span), adv_std, zero_adv_groups (groups whose G rewards are all equal: no gradient from
them), completion_len, truncation_rate, loss, grad_norm, lr, kl, clip_frac, skipped, step_time
and the sample ids of every process.

--report-to tensorboard,wandb also sends every number of each log row, under the same name and
at the same step, to TensorBoard (OUTPUT/tensorboard) and/or Weights & Biases (OUTPUT/wandb),
with the run's settings recorded once (Reporters). Both are optional installs.
"""

import dataclasses
import importlib.util
import json
import os

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

import checkpoint

# On the progress bar: (label, log key, format). The policy loss is not among them: with one
# update per rollout it is zero by construction (the ratio is 1 and the advantages centred).
BAR = (("reward", "reward", ".2f"), ("acc", "reward_acc", ".2f"), ("fmt", "reward_fmt", ".2f"),
       ("bonus", "bonus_rate", ".2f"), ("ref_conf", "ref_conf", ".2f"), ("kl", "kl", ".4f"),
       ("len", "completion_len", ".0f"))


def step_metrics(scores, completions, update):
    """One process's numbers for one step; scores are score_rollout's [P, G] fields."""
    has_span = scores["has_span"]                                               # [P, G]
    advantages = scores["advantages"]                                           # [P, G]
    return {
        "reward": scores["reward"].mean().item(),
        "reward_acc": scores["acc"].mean().item(),
        "reward_fmt": scores["fmt"].mean().item(),
        "reward_bonus": scores["bonus"].mean().item(),
        "bonus_rate": (scores["bonus"] > 0).float().mean().item(),
        "ref_conf": scores["ref_conf"][has_span].mean().item() if has_span.any() else float("nan"),
        "adv_std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "zero_adv_groups": (scores["reward"].amax(1) == scores["reward"].amin(1)).float().mean().item(),
        "completion_len": completions.completion_mask.sum(1).mean().item(),
        "truncation_rate": completions.truncated.float().mean().item(),
        **update,
    }


def completion_rows(step, samples, completions, scores):
    """One completions.jsonl row per sampled completion: what was said and how it was scored.
    ref_conf is the reference's confidence in the stated answer (CARE; null without an answer span)."""
    g = completions.num_generations
    return [{"step": step, "sample_id": s.sample_id, "completion": completions.texts[i * g + j],
             **{name: scores[key][i, j].item() for name, key in (("accuracy", "acc"), ("format", "fmt"),
                                                                   ("bonus", "bonus"), ("advantage", "advantages"))},
             "ref_conf": scores["ref_conf"][i, j].item() if scores["has_span"][i, j] else None}
            for i, s in enumerate(samples) for j in range(g)]


# --report-to: each backend and the pip package it needs.
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def reporter_names(report_to):
    """--report-to's names: "" -> [], "tensorboard,wandb" -> ["tensorboard", "wandb"]."""
    return [name.strip() for name in report_to.split(",") if name.strip()]


def check_reporters(report_to):
    """config.check_settings' (condition, message) pairs for --report-to: each name known, its
    package installed. Checked with find_spec, before anything loads (importing is slow)."""
    checks = []
    for name in reporter_names(report_to):
        known = name in REPORTERS
        checks.append((known, f"--report-to must name {' or '.join(REPORTERS)} (comma-separated), got {name!r}"))
        if known:
            checks.append((importlib.util.find_spec(REPORTERS[name]) is not None,
                           f"--report-to {name} needs the {REPORTERS[name]} package: pip install {REPORTERS[name]}"))
    return checks


def numbers(row):
    """The numeric fields of a log row (not step, not the sample ids, not booleans)."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Scalars in OUTPUT/tensorboard; the settings as a JSON text ("config"). On resume, the
    events of the steps after the checkpoint are purged: those steps run again."""

    def __init__(self, cfg, start_step, settings):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```\n" + json.dumps(settings, indent=1, default=str) + "\n```", start_step)

    def log(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run in OUTPUT/wandb with the settings as its config; WANDB_MODE
    (offline, disabled), WANDB_PROJECT etc. come from the environment as usual. A resumed run
    is a new wandb run in the same group (wandb cannot take back the steps it already has)."""

    def __init__(self, cfg, start_step, settings):
        import wandb
        out = os.path.abspath(cfg.output_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo-care"), dir=out,
                              group=os.path.basename(out), config={**settings, "start_step": start_step})

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class Reporters:
    """The --report-to backends of one run (none on the other processes); log(row) sends a log
    row's numbers, under the log's names, at its step. train.py (RunLog) and sft.py share it."""

    def __init__(self, cfg, is_main_process, start_step):
        settings = dataclasses.asdict(cfg)
        kinds = {"tensorboard": TensorBoard, "wandb": WandB}
        self.backends = [kinds[name](cfg, start_step, settings)
                         for name in reporter_names(cfg.report_to)] if is_main_process else []

    def log(self, row):
        values = numbers(row)
        for backend in self.backends:
            backend.log(row["step"], values)

    def close(self):
        for backend in self.backends:
            backend.close()


class RunLog:
    """log.jsonl, completions.jsonl and the progress bar of one run (written by the main process).
    On resume, the rows after the checkpoint's step are dropped: those steps run again; the
    checkpoint's step gets its rows from the checkpoint (rows: write's, as it kept them)."""

    def __init__(self, cfg, accelerator, start_step, total_steps, rows=None):
        self.cfg, self.accelerator = cfg, accelerator
        self.log_path = os.path.join(cfg.output_dir, "log.jsonl")
        self.completions_path = os.path.join(cfg.output_dir, "completions.jsonl")
        if accelerator.is_main_process:
            for path in (self.log_path, self.completions_path):
                checkpoint.trim_jsonl(path, start_step, (rows or {}).get(os.path.basename(path)))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process,
                        desc=cfg.algo)
        self.reporters = Reporters(cfg, accelerator.is_main_process, start_step)

    def write(self, step, batch, completions, scores, update, skipped_total, seconds):
        """Average this step's metrics over the processes, append the log row (and the
        completions), move the bar, and print the samples skipped at this step. Returns the
        rows written, by file name (None for a file not written), for the step's checkpoint."""
        accelerator = self.accelerator
        metrics = step_metrics(scores, completions, update)
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, reduction="mean")  # the whole global batch
        row = {"step": step, **dict(zip(keys, values.tolist())), "skipped": skipped_total,
               "step_time": seconds, "samples": batch.ids_per_process}
        rows = None
        if self.cfg.log_completions:
            rows = completion_rows(step, batch.samples, completions, scores)
            rows = gather_object(rows) if accelerator.num_processes > 1 else rows
        if accelerator.is_main_process:
            checkpoint.append_jsonl(self.log_path, [row])
            self.reporters.log(row)
            if self.cfg.log_completions:
                checkpoint.append_jsonl(self.completions_path, rows)
            self.bar.set_postfix({label: format(row[key], fmt) for label, key, fmt in BAR})
            self.bar.update(1)
        for message in batch.skipped:
            accelerator.print(f"skipped: {message}")
        return {"log.jsonl": [row], "completions.jsonl": rows}

    def close(self):
        self.bar.close()
        self.reporters.close()
