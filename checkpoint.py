"""A run directory: one run per directory, its logs, and its checkpoints.

    runs/care/
      .lock                  held (flock) by the run writing here: two runs never mix
      log.jsonl              one row per step; completions.jsonl with --log-completions
      checkpoint-000500/
        state/               sharded policy, AdamW state and reference (fsdp.save_sharded);
                             under LoRA the adapters, their AdamW state and their EMA alone
        policy/              a Hugging Face export of the policy, for evaluate.py (LoRA: merged)
        adapter/             LoRA only: the adapters in peft's format (PeftModel.from_pretrained)
        trainer_state.pt     step, skip counts, scheduler, the data's record (file digest, sample
                             ids in order): plain data, loaded with weights_only=True
        config.json          the settings really used (defaults resolved, process count)

A new run refuses a directory that already holds one (unless --overwrite); a resumed run
refuses a checkpoint made with other run-defining settings or other data (unless
--allow-config-change).
Everything is written to <dir>.tmp and renamed, so a crash never leaves a half checkpoint.

Loading runs no code from any checkpoint file: trainer_state.pt is read with weights_only=True,
and the sharded state's pickled parts (its .metadata, its non-tensor values) are read by
fsdp.read_metadata and fsdp.load_sharded, which build plain data and torch's metadata classes
alone. Anything else is refused in one line, so a checkpoint from elsewhere is safe to resume.
"""

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import shutil
from contextlib import contextmanager

import torch

import encoding
import fsdp
import models


class RunError(ValueError):
    """A run that cannot start as asked: the message says why and what to do instead."""


CHECKPOINT_RE = re.compile(r"checkpoint-\d{6}")
RUN_FILES = ("log.jsonl", "completions.jsonl")

# Settings that may change when a run is resumed: where and how often it writes, memory knobs
# that do not change the maths, and data checks. Every other setting defines the run; the
# prompts per process may change as long as the global batch does not.
FREE_ON_RESUME = {"output_dir", "resume", "overwrite", "allow_config_change", "save_every", "keep_last",
                  "log_completions", "check_data", "skip_bad_samples", "allow_outside_data_root",
                  "logprob_chunk_size", "gradient_checkpointing", "attn_implementation", "prompts_per_device",
                  "reproduce_official", "preset", "report_to"}


# ---------------------------------------------------------------------------------------------
# The run's inputs and settings, before anything loads


def check_inputs(cfg):
    """Name a missing --model, --data or --data-root before anything is loaded. A --model that
    looks like a hub id (org/name, no such local directory) must be in the local cache, and a
    model directory must be one (models.model_problem)."""
    first = cfg.model.split("/")[0]
    local = os.path.isabs(cfg.model) or cfg.model.startswith((".", "~")) or cfg.model.count("/") != 1 \
        or os.path.isdir(first)
    if local and not os.path.isdir(cfg.model):
        raise RunError(f"--model {cfg.model}: no such directory")
    if problem := models.model_problem(cfg.model):
        raise RunError(f"--model {cfg.model}: {problem}")
    if not os.path.isfile(cfg.data):
        raise RunError(f"--data {cfg.data}: no such file")
    if not os.path.isdir(cfg.data_root):
        raise RunError(f"--data-root {cfg.data_root}: no such directory")


def resolved(cfg):
    """The settings as this machine will really use them, as checkpoints record them: 'auto'
    choices made, paths absolute (a hub id stays as it is)."""
    local_path = lambda path: os.path.abspath(path) if os.path.exists(path) else path
    template = cfg.prompt_template if cfg.prompt_template in encoding.LAYOUTS else local_path(cfg.prompt_template)
    return dataclasses.replace(
        cfg, model=local_path(cfg.model), data=os.path.abspath(cfg.data), data_root=os.path.abspath(cfg.data_root),
        prompt_template=template,
        mixed_precision=(("bf16" if torch.cuda.is_available() else "no") if cfg.mixed_precision == "auto"
                         else cfg.mixed_precision),
        attn_implementation=models.pick_attn_implementation(cfg.attn_implementation))


# ---------------------------------------------------------------------------------------------
# The directory: one run at a time


@contextmanager
def locked(output_dir, is_main):
    """Hold output_dir/.lock for the block (main process), or say which process holds it.
    The lock dies with the process, so a killed run never leaves the directory locked."""
    if not is_main:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    f = open(os.path.join(output_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RunError(f"{output_dir} is in use by another run (process {holder}); wait for it to finish "
                       f"or pick another --output-dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        f.close()  # releases the lock


def run_files(output_dir):
    """What an earlier run left in output_dir: logs and checkpoints (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in RUN_FILES or n.startswith("checkpoint-"))


def claim(output_dir, resume, overwrite, is_main):
    """Refuse to start a new run where one already is, unless told to resume or overwrite it."""
    found = run_files(output_dir)
    if not found or resume:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunError(f"{output_dir} already holds a run ({shown}): pass --resume auto to continue it, "
                       f"--overwrite to replace it, or another --output-dir")
    if is_main:
        for name in found:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# ---------------------------------------------------------------------------------------------
# Logs


def jsonl_line(row):
    """One log line: NaN (e.g. no answer span in the batch) -> null."""
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}) + "\n"


def append_jsonl(path, rows):
    with open(path, "a") as f:
        f.writelines(jsonl_line(row) for row in rows)


def trim_jsonl(path, step, rows_of_step=None):
    """Drop the rows of steps after `step` (a resumed run logs them again), and a last line cut
    short by a kill. A bad line anywhere else is an error: the log is not ours to guess at.
    rows_of_step: the rows of `step` as its checkpoint keeps them, written in place of the
    file's, so a cut row of a step that has a checkpoint is written again, whole."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"{path}:{i + 1}: dropped a last line cut short (the run was killed while writing it)"
                      + (f"; step {step}'s rows are written again from its checkpoint" if rows_of_step else ""))
                continue
            raise RunError(f"{path}:{i + 1}: not a JSON row; move the file away to resume") from None
        if row["step"] < step or (row["step"] == step and rows_of_step is None):
            kept.append(line + "\n")
    kept += [jsonl_line(row) for row in rows_of_step or []]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Checkpoints


# What a resume reads (fsdp.load_sharded also reads every shard file .metadata names; policy/
# and adapter/ are exports, not read back).
NEEDED = ("config.json", "trainer_state.pt", "state/.metadata")


def missing(path):
    """What a resume from the checkpoint at path needs and it lacks ([]: complete): the NEEDED
    files, and every shard file its metadata names, at full length."""
    lacks = [name for name in NEEDED if not os.path.isfile(os.path.join(path, name))]
    if "config.json" not in lacks:
        try:
            with open(os.path.join(path, "config.json")) as f:
                json.load(f)
        except ValueError:
            lacks.append("config.json (not JSON)")
    if "trainer_state.pt" not in lacks and read_trainer_state(path) is None:
        lacks.append("trainer_state.pt (unreadable)")
    if "state/.metadata" in lacks:
        return lacks
    metadata = sharded_metadata(path)
    if metadata is None:
        return lacks + ["state/.metadata (unreadable)"]
    for name, size in sorted(fsdp.shard_sizes(metadata).items()):
        file = os.path.join(path, "state", name)
        if not os.path.isfile(file):
            lacks.append(f"state/{name}")
        elif os.path.getsize(file) < size:
            lacks.append(f"state/{name} (cut short: {os.path.getsize(file)} of {size} bytes)")
    return lacks


def checkpoints(output_dir):
    """The checkpoint-NNNNNN directories in output_dir, oldest first, complete or not. Anything
    else (a .tmp left by a crash, a checkpoint-best copied in by hand) is not a candidate."""
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, n) for n in sorted(os.listdir(output_dir)) if CHECKPOINT_RE.fullmatch(n)]


def complete_checkpoints(output_dir):
    """checkpoints() that hold everything a resume reads (missing), oldest first."""
    return [path for path in checkpoints(output_dir) if not missing(path)]


def resolve_resume(resume, output_dir, say=print):
    """The checkpoint to resume from: --resume auto picks the newest complete one in output_dir
    (none: a fresh start) and says which newer ones it passed over and what they lack; a named
    directory must be a complete checkpoint."""
    if resume == "auto":
        for path in reversed(checkpoints(output_dir)):
            lacks = missing(path)
            if not lacks:
                return path
            say(f"--resume auto: passed over {path}, which lacks {', '.join(lacks)}")
        return None
    if not resume:
        return None
    if not os.path.isdir(resume):
        raise RunError(f"--resume {resume}: no such checkpoint directory")
    if lacks := missing(resume):
        raise RunError(f"--resume {resume}: not a complete checkpoint (it lacks {', '.join(lacks)})")
    return resume


def saved_config(cfg, num_processes):
    """The settings as really used: the Config (defaults already resolved), the process count and,
    for a --prompt-template FILE, the sha256 of its text (a file edited in place changes every
    prompt under the same path)."""
    return {**dataclasses.asdict(cfg), "num_processes": num_processes,
            "prompt_template_sha256": template_digest(cfg.prompt_template)}


def template_digest(spec):
    """sha256 of a --prompt-template file's text; None for a built-in layout (or no such file)."""
    if spec in encoding.LAYOUTS or not os.path.isfile(spec):
        return None
    with open(spec, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def config_changes(saved, cfg, num_processes, batch_fields=("prompts_per_device",)):
    """['name: old -> new', ...] for every run-defining setting that differs from the checkpoint's.
    batch_fields: the settings whose product is the samples per process per step (train.py:
    the prompts per device; sft.py: micro-batch x accumulation steps); each may change as long
    as processes x their product, the global batch, does not."""
    changes = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k not in FREE_ON_RESUME and k not in batch_fields and k in saved and saved[k] != v]
    digest = template_digest(cfg.prompt_template)
    if saved.get("prompt_template_sha256") and saved.get("prompt_template") == cfg.prompt_template \
            and saved["prompt_template_sha256"] != digest:
        changes.append(f"prompt_template: the text of {cfg.prompt_template} changed (sha256 "
                       f"{saved['prompt_template_sha256'][:12]} -> {(digest or 'none')[:12]})")
    old = (saved.get("num_processes", 1), *(saved.get(k, getattr(cfg, k)) for k in batch_fields))
    new = (num_processes, *(getattr(cfg, k) for k in batch_fields))
    if math.prod(old) != math.prod(new):
        what = " x ".join(["processes"] + [k.replace("_", " ") for k in batch_fields])
        changes.append(f"global batch ({what}): {' x '.join(map(str, old))} -> {' x '.join(map(str, new))}")
    return changes


def program_of(settings):
    """Which program a run's settings (or a checkpoint's config.json) are for: only train.py's
    have an algorithm."""
    return "train.py" if "algo" in settings else "sft.py"


def check_resume_config(path, cfg, num_processes, allow_change, batch_fields=("prompts_per_device",)):
    """Refuse to continue a checkpoint with other run-defining settings, naming each change;
    with allow_change, say what changed and go on (the data position follows the step count,
    so a changed global batch repeats or skips samples). A checkpoint of the other program
    (sft.py's for train.py, or the reverse) is refused whatever allow_change says."""
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    ours, theirs = program_of(dataclasses.asdict(cfg)), program_of(saved)
    if ours != theirs:
        raise RunError(f"--resume {path}: a checkpoint of {theirs}, which {ours} cannot continue (to start a "
                       f"{ours} run from its weights, pass --model {os.path.join(path, 'policy')} instead)")
    changes = config_changes(saved, cfg, num_processes, batch_fields)
    if changes and not allow_change:
        raise RunError(f"resuming {path} with other settings than it was made with: {'; '.join(changes)} "
                       f"(pass --allow-config-change to resume anyway)")
    return changes


def data_record(data_file, samples):
    """What fixes a run's data: the annotation file's content (sha256) and the sample ids in the
    order loaded, after --check-data (every step's samples are picked by position in it)."""
    digest = hashlib.sha256()
    with open(data_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": data_file, "sha256": digest.hexdigest(), "sample_ids": [s.sample_id for s in samples]}


def listed(ids, most=5):
    return ", ".join(ids[:most]) + (", ..." if len(ids) > most else "")


def data_changes(saved, record, checked_out=()):
    """['what: old -> new', ...] between a checkpoint's data record and this run's; checked_out:
    the ids --check-data left out in this run."""
    changes = []
    if saved["sha256"] != record["sha256"]:
        changes.append(f"{record['file']}: its content changed (sha256 {saved['sha256'][:12]} -> "
                       f"{record['sha256'][:12]})")
    old, new = saved["sample_ids"], record["sample_ids"]
    if old != new:
        old_ids, new_ids, checked_out = set(old), set(new), set(checked_out)
        gone = [i for i in old if i not in new_ids]
        by_check = [i for i in gone if i in checked_out]
        other = [i for i in gone if i not in checked_out]
        came = [i for i in new if i not in old_ids]
        parts = [f"samples: {len(old)} -> {len(new)}"]
        parts += [f"{len(by_check)} left out by --check-data ({listed(by_check)})"] if by_check else []
        parts += [f"{len(other)} gone ({listed(other)})"] if other else []
        parts += [f"{len(came)} new ({listed(came)})"] if came else []
        parts += [] if gone or came else ["the same ones in another order"]
        changes.append(", ".join(parts))
    return changes


def check_resume_data(path, record, checked_out, allow_change, say=print):
    """Refuse to continue a checkpoint on other data than its own, naming what differs: every
    later step would train on other samples (some twice, some never). With allow_change, say
    what changed and go on."""
    saved = (read_trainer_state(path) or {}).get("data")
    if saved is None:
        say(f"{path} keeps no record of its data (made before records were kept): the data is not checked")
        return
    changes = data_changes(saved, record, checked_out)
    if changes and not allow_change:
        hint = ("resume without --check-data, and with --skip-bad-samples the run skips those samples at their "
                "steps, as it would have; or " if set(checked_out) & set(saved["sample_ids"]) else "")
        raise RunError(f"resuming {path} on other data than it was made with: {'; '.join(changes)} (every later "
                       f"step would get other samples; {hint}pass --allow-config-change to resume anyway)")
    for change in changes:
        say(f"changed on resume (--allow-config-change): {change}")


@contextmanager
def opened_run(cfg, batch_fields=("prompts_per_device",)):
    """What train.py and sft.py do before they load anything: name a missing input, find the
    checkpoint to resume from, resolve the settings, make the accelerator (FSDP2 with more than
    one process), refuse a resume with other run-defining settings, then hold the run directory
    (lock, claim) for the block. Yields (resolved cfg, accelerator, checkpoint to resume or None)."""
    check_inputs(cfg)
    cfg = resolved(cfg)
    accelerator = fsdp.make_accelerator(cfg.mixed_precision)
    resume = resolve_resume(cfg.resume, cfg.output_dir, accelerator.print)
    if resume:
        for change in check_resume_config(resume, cfg, accelerator.num_processes, cfg.allow_config_change,
                                          batch_fields):
            accelerator.print(f"changed on resume (--allow-config-change): {change}")
    with locked(cfg.output_dir, accelerator.is_main_process):
        claim(cfg.output_dir, bool(cfg.resume), cfg.overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        yield cfg, accelerator, resume


def save(cfg, accelerator, model, ref_model, optimizer, scheduler, tokenizer, state):
    """Write checkpoint-<step> atomically; a full disk is named as such and leaves no .tmp."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{state['step']:06d}")
    tmp, commit = fsdp.atomic_dir(final, accelerator)
    try:
        fsdp.save_sharded(tmp, model, optimizer, ref_model)
        lora_run = getattr(cfg, "lora_rank", 0) > 0
        if lora_run:  # the adapters alone, in peft's format; policy/ below gets them merged in
            import lora
            lora.export_adapters(os.path.join(tmp, "adapter"), model, accelerator.is_main_process, cfg.model)
        policy_dir = fsdp.export_policy(os.path.join(tmp, "policy"), model, accelerator.is_main_process,
                                        dtype=models.checkpoint_dtype(cfg.model),  # bf16 for Qwen's own
                                        edit=lora.merger(model) if lora_run else None)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(policy_dir)
            preproc = os.path.join(cfg.model, "preprocessor_config.json")
            if os.path.exists(preproc):
                shutil.copy(preproc, policy_dir)
            # The step fixes the data position and every sampling seed, so with the shards and the
            # scheduler it is all a resume needs. Plain data only: it loads with weights_only=True.
            torch.save({"scheduler": scheduler.state_dict(), **state}, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(saved_config(cfg, accelerator.num_processes), f, indent=2)
    except Exception as e:
        if not out_of_space(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"no space left on device while writing the checkpoint {final} "
                                    f"(free some space, or keep fewer with --keep-last)") from e
    path = commit()
    if accelerator.is_main_process and cfg.keep_last > 0:
        for old in complete_checkpoints(cfg.output_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    return path


def out_of_space(error):
    """A full disk, however deep the writer wrapped it (torch.distributed.checkpoint collects
    the processes' exceptions into one)."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)


def read_trainer_state(path):
    """path/trainer_state.pt, read with weights_only=True, or None where it cannot be read (cut
    short, not torch's format). A file that holds anything but plain data (code, in a pickle)
    is refused in one line, never run."""
    file = os.path.join(path, "trainer_state.pt")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a broken pickle, not a refused one
            return None
        raise RunError(f"{file} holds more than plain data and was not loaded (it {fsdp.plain_data_refusal(e)})") \
            from None
    except Exception:  # a broken file fails in many ways (a cut zip: RuntimeError); none runs code
        return None


def sharded_metadata(path):
    """path/state/.metadata as fsdp.read_metadata builds it (torch's metadata classes alone), or
    None where it cannot be read (cut short, not a pickle). One that holds anything else, as a
    crafted file would, is refused in one line, never run."""
    file = os.path.join(path, "state", ".metadata")
    try:
        return fsdp.read_metadata(os.path.dirname(file))
    except fsdp.NotPlainData as e:
        raise RunError(f"{file} {e}: refused, nothing in it was run") from None
    except Exception:  # a broken pickle fails in many ways; none of them runs code
        return None


def load(path, model, ref_model, optimizer, scheduler, start):
    """Restore the shards and the trainer state, running no code from any file: trainer_state.pt
    and the shards' non-tensor values are read as plain data, .metadata by sharded_metadata.
    start: the state a fresh run would begin with; its skips before step 1 (at load, by
    --check-data) that the checkpoint does not count yet are added, and its data record kept."""
    state, metadata = read_trainer_state(path), sharded_metadata(path)
    if state is None or metadata is None:  # missing() said otherwise a moment ago
        raise RunError(f"{path}: {'trainer_state.pt' if state is None else 'state/.metadata'} cannot be read")
    try:
        fsdp.load_sharded(path, model, optimizer, ref_model, metadata)
    except fsdp.NotPlainData as e:
        raise RunError(f"{path}/state: {e}: refused, nothing in it was run") from None
    scheduler.load_state_dict(state.pop("scheduler"))
    new = [m for m in start["skipped_messages"] if m not in state["skipped_messages"]]
    state.update(skipped=state["skipped"] + len(new), skipped_messages=state["skipped_messages"] + new,
                 data=start["data"])
    return state
