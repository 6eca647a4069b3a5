"""Runs that cannot mix or silently change: settings checked before anything loads, one run per
output directory, resume only into the same run, checkpoints that cannot run code."""

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from conftest import corrupt_one_video, read_log, train_argv

import checkpoint
import config
import data
import models
import train


def run(model_dir, root, out, *extra):
    return train.train(config.parse_config(train_argv(model_dir, root, out, *extra)))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets loaded: these refusals must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(models, "load_model", refuse)


def copy_checkpoint(care_run, out, step=1):
    name = f"checkpoint-{step:06d}"
    shutil.copytree(os.path.join(care_run, name), os.path.join(out, name))
    return os.path.join(out, name)


# --- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--prompts-per-device", "0"], "--prompts-per-device must be >= 1"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--ema-every", "0"], "--ema-every must be >= 1"),
    (["--ema-decay", "0"], "--ema-decay must be in (0, 1]"),
    (["--ema-decay", "1.5"], "--ema-decay must be in (0, 1]"),
    (["--bonus-coef", "-0.1"], "--bonus-coef must be >= 0"),
    (["--consistency-margin", "-0.01"], "--consistency-margin must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--logprob-chunk-size", "0"], "--logprob-chunk-size must be >= 1"),
    (["--max-frames", "2", "--min-frames", "4"], "need 1 <= --min-frames <= --max-frames"),
    (["--algo", "ppo"], "--algo must be care or grpo"),
    (["--frame-rounding", "up"], "--frame-rounding must be nearest or floor"),
    (["--resume", "auto", "--overwrite"], "--resume and --overwrite contradict"),
    (["--lr", "fast"], "invalid float value"),
])
def test_bad_settings_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        config.parse_config(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err
    assert err.strip().count("\n") == 0, err


def test_help_explains_every_setting_with_its_default():
    text = " ".join(config.build_parser().format_help().split())  # unwrapped
    for f in dataclasses.fields(config.Config):
        assert f.metadata.get("help"), f"{f.name} has no help line"
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default: ") == len(dataclasses.fields(config.Config))


def test_reproduce_official_sets_the_public_behaviour_and_explicit_flags_win():
    cfg = config.parse_config(["--reproduce-official"])
    assert (cfg.ema_decay, cfg.second_per_grid, cfg.top_k, cfg.frame_rounding) == (1.0, 1.0, 50, "floor")
    cfg = config.parse_config(["--reproduce-official", "--top-k", "0", "--ema-decay", "0.99"])
    assert (cfg.ema_decay, cfg.second_per_grid, cfg.top_k, cfg.frame_rounding) == (0.99, 1.0, 0, "floor")
    ours = config.parse_config([])
    assert (ours.ema_decay, ours.second_per_grid, ours.top_k, ours.frame_rounding) == (0.995, 0.0, 0, "nearest")


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "missing/dir/model", "--model missing/dir/model: no such directory"),
    ("--data", "missing.jsonl", "--data missing.jsonl: no such file"),
    ("--data-root", "/no/such/root", "--data-root /no/such/root: no such directory"),
    ("--resume", "/no/such/checkpoint-000001", "--resume /no/such/checkpoint-000001: no such checkpoint directory"),
])
def test_missing_inputs_are_named_before_anything_loads(warm_model_dir, seed_bench_root, tmp_path, no_model,
                                                        flag, value, message):
    argv = train_argv(warm_model_dir, seed_bench_root, tmp_path / "out")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(checkpoint.RunError, match=message):
        train.train(config.parse_config(argv))


def test_a_model_that_is_not_one_or_not_cached_is_named_in_one_line(warm_model_dir, seed_bench_root, tmp_path,
                                                                    no_model, monkeypatch):
    """A directory without config.json, or naming another family, and a hub id that is not in
    the local cache (at once: nothing is downloaded, so no minute of retries); a cached one passes."""
    import time

    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    not_a_model = tmp_path / "videos"
    not_a_model.mkdir()
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    cases = [(str(not_a_model), "no config.json, not a model directory"),
             (str(llama), "model_type 'llama' is not a supported family (qwen2_5_vl, qwen2_vl)"),
             ("nobody/no-such-model", "no such directory, and not in the local Hugging Face cache (nothing is "
                                      "downloaded: download it first")]
    for model, problem in cases:
        argv = train_argv(warm_model_dir, seed_bench_root, tmp_path / "out")
        argv[argv.index("--model") + 1] = model
        start = time.time()
        with pytest.raises(checkpoint.RunError) as err:
            train.train(config.parse_config(argv))
        assert str(err.value).startswith(f"--model {model}: {problem}") and time.time() - start < 10
    snapshot = tmp_path / "hub" / "models--somebody--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(os.path.join(warm_model_dir, "config.json"), snapshot)
    (tmp_path / "hub" / "models--somebody--cached-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--somebody--cached-model" / "refs" / "main").write_text("abc123")
    assert models.model_problem("somebody/cached-model") is None


# --- one run per directory ---------------------------------------------------------------------

def test_a_new_run_refuses_a_directory_that_holds_one(care_run, warm_model_dir, seed_bench_root, tmp_path, no_model):
    copy_checkpoint(care_run, tmp_path)
    shutil.copy(os.path.join(care_run, "log.jsonl"), tmp_path / "log.jsonl")
    with pytest.raises(checkpoint.RunError, match="already holds a run .*--resume auto.*--overwrite"):
        run(warm_model_dir, seed_bench_root, tmp_path)
    assert len(read_log(tmp_path)) == 2  # nothing was touched


def test_overwrite_replaces_the_old_run(care_run, warm_model_dir, seed_bench_root, tmp_path):
    copy_checkpoint(care_run, tmp_path, step=2)
    shutil.copy(os.path.join(care_run, "log.jsonl"), tmp_path / "log.jsonl")
    run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "1", "--max-completion-length", "4", "--overwrite")
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-000001"]


def test_two_runs_cannot_write_one_directory(warm_model_dir, seed_bench_root, tmp_path, no_model):
    with checkpoint.locked(str(tmp_path), is_main=True):
        with pytest.raises(checkpoint.RunError, match=f"{tmp_path} is in use by another run \\(process {os.getpid()}\\)"):
            run(warm_model_dir, seed_bench_root, tmp_path)
    with checkpoint.locked(str(tmp_path), is_main=True):  # released when the holder is done
        pass


# --- resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, change", [
    (["--lr", "5e-4"], "lr: 0.001 -> 0.0005"),
    (["--algo", "grpo"], "algo: 'care' -> 'grpo'"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--max-steps", "3"], "max_steps: 2 -> 3"),
    (["--prompts-per-device", "1"], "global batch (processes x prompts per device): 1 x 2 -> 1 x 1"),
])
def test_resume_refuses_other_run_defining_settings(care_run, warm_model_dir, seed_bench_root, tmp_path, no_model,
                                                    flags, change):
    copy_checkpoint(care_run, tmp_path)
    with pytest.raises(checkpoint.RunError, match="pass --allow-config-change") as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto", *flags)
    assert change in str(err.value)


def test_a_template_file_edited_in_place_is_a_change_of_settings(tmp_path, monkeypatch):
    """config.json keeps the sha256 of a --prompt-template file's text: the same path with other
    text is a run-defining change, named; the same text (also from another working directory)
    is none."""
    template = tmp_path / "t.txt"
    template.write_text("{question}\n{options}Think first.\n{answer_format}\n")
    paths = ["--data", str(tmp_path / "d.jsonl"), "--data-root", str(tmp_path)]   # absolute: the cwd changes below
    cfg = checkpoint.resolved(config.parse_config([*paths, "--prompt-template", str(template)]))
    saved = checkpoint.saved_config(cfg, 1)
    assert saved["prompt_template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()
    assert checkpoint.config_changes(saved, cfg, 1) == []
    monkeypatch.chdir(tmp_path)
    assert checkpoint.config_changes(saved, checkpoint.resolved(config.parse_config([*paths, "--prompt-template",
                                                                                     "t.txt"])), 1) == []
    template.write_text("{question}\n{options}Answer at once.\n")
    changes = checkpoint.config_changes(saved, cfg, 1)
    assert len(changes) == 1 and changes[0].startswith(f"prompt_template: the text of {template} changed (sha256 ")
    assert checkpoint.saved_config(checkpoint.resolved(config.parse_config([])), 1)["prompt_template_sha256"] is None


def test_resume_with_allowed_changes_records_what_was_used(care_run, warm_model_dir, seed_bench_root, tmp_path):
    copy_checkpoint(care_run, tmp_path)
    shutil.copy(os.path.join(care_run, "log.jsonl"), tmp_path / "log.jsonl")
    # Bookkeeping may change freely; the lr only with the override.
    run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto", "--save-every", "7",
        "--lr", "5e-4", "--allow-config-change", "--max-completion-length", "20")
    saved = json.load(open(tmp_path / "checkpoint-000002" / "config.json"))
    assert saved["lr"] == 5e-4 and saved["save_every"] == 7 and saved["num_processes"] == 1
    assert saved["data"] == os.path.abspath(f"{seed_bench_root}/annotations/training_6k.jsonl")


def test_resume_auto_takes_only_complete_checkpoints(care_run, tmp_path):
    copy_checkpoint(care_run, tmp_path, step=1)
    shutil.copytree(os.path.join(care_run, "checkpoint-000002"), tmp_path / "checkpoint-best")
    shutil.copytree(os.path.join(care_run, "checkpoint-000002"), tmp_path / "checkpoint-000003.tmp")
    os.makedirs(tmp_path / "checkpoint-000004" / "state")  # cut short: no trainer_state.pt
    assert checkpoint.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-000001")
    with pytest.raises(checkpoint.RunError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-000004"), str(tmp_path))
    assert checkpoint.resolve_resume("auto", str(tmp_path / "empty")) is None


def cut_in_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, lacks", [
    (lambda c: os.remove(c / "config.json"), "config.json"),
    (lambda c: (c / "config.json").write_text('{"lr": 0.'), "config.json (not JSON)"),
    (lambda c: os.remove(c / "trainer_state.pt"), "trainer_state.pt"),
    (lambda c: cut_in_half(c / "trainer_state.pt"), "trainer_state.pt (unreadable)"),
    (lambda c: os.remove(c / "state" / ".metadata"), "state/.metadata"),
    (lambda c: cut_in_half(c / "state" / ".metadata"), "state/.metadata (unreadable)"),
    (lambda c: os.remove(c / "state" / "__0_0.distcp"), "state/__0_0.distcp"),
    (lambda c: cut_in_half(c / "state" / "__0_0.distcp"), "state/__0_0.distcp (cut short: "),
])
def test_resume_auto_passes_over_a_checkpoint_that_lacks_a_file_a_load_reads(care_run, tmp_path, damage, lacks):
    for step in (1, 2):
        copy_checkpoint(care_run, tmp_path, step)
    newest = tmp_path / "checkpoint-000002"
    damage(newest)
    said = []
    assert checkpoint.resolve_resume("auto", str(tmp_path), said.append) == str(tmp_path / "checkpoint-000001")
    assert len(said) == 1 and said[0].startswith(f"--resume auto: passed over {newest}, which lacks {lacks}"), said
    with pytest.raises(checkpoint.RunError, match=f"--resume {newest}: not a complete checkpoint \\(it lacks "
                                                  f"{re.escape(lacks)}"):
        checkpoint.resolve_resume(str(newest), str(tmp_path))


def test_a_deleted_shard_of_the_newest_checkpoint_resumes_exactly_from_the_one_before(
        care_run, warm_model_dir, seed_bench_root, tmp_path, capsys):
    for step in (1, 2):
        copy_checkpoint(care_run, tmp_path, step)
    shutil.copy(os.path.join(care_run, "log.jsonl"), tmp_path / "log.jsonl")
    os.remove(tmp_path / "checkpoint-000002" / "state" / "__0_0.distcp")
    state = run(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care", "--max-steps", "2", "--save-every", "1",
                "--resume", "auto")
    out = capsys.readouterr().out
    assert f"passed over {tmp_path}/checkpoint-000002, which lacks state/__0_0.distcp" in out
    assert f"resumed from {tmp_path}/checkpoint-000001 at step 1" in out
    assert state["step"] == 2
    resumed, full = read_log(tmp_path), read_log(care_run)
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("loss", "reward", "grad_norm", "completion_len"):
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key
    assert not checkpoint.missing(str(tmp_path / "checkpoint-000002"))  # written again, whole


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_checkpoint_cannot_run_code(care_run, warm_model_dir, seed_bench_root, tmp_path):
    ckpt = copy_checkpoint(care_run, tmp_path)
    marker = str(tmp_path / "ran.txt")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, os.path.join(ckpt, "trainer_state.pt"))
    with pytest.raises(checkpoint.RunError, match="holds more than plain data and was not loaded"):
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto")
    assert not os.path.exists(marker)


def test_the_trainer_state_refusal_is_one_clean_line(care_run, warm_model_dir, seed_bench_root, tmp_path):
    ckpt = copy_checkpoint(care_run, tmp_path)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    torch.save({**state, "payload": RunsCode(str(tmp_path / "ran.txt"))}, os.path.join(ckpt, "trainer_state.pt"))
    with pytest.raises(checkpoint.RunError) as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto")
    assert str(err.value) == (f"{ckpt}/trainer_state.pt holds more than plain data and was not loaded "
                              f"(it holds exec)")


def plant_in_metadata(ckpt, edit):
    """Rewrite ckpt's state/.metadata after edit(metadata) (read here with plain pickle: the
    file is ours)."""
    import pickle
    path = os.path.join(ckpt, "state", ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    edit(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def test_the_sharded_metadata_cannot_run_code(care_run, warm_model_dir, seed_bench_root, tmp_path, no_model):
    """torch.distributed.checkpoint unpickles .metadata with pickle: a payload planted in it is
    refused in one line naming the file, and never runs."""
    ckpt = copy_checkpoint(care_run, tmp_path)
    marker = str(tmp_path / "ran.txt")
    plant_in_metadata(ckpt, lambda metadata: setattr(metadata, "planner_data", RunsCode(marker)))
    with pytest.raises(checkpoint.RunError) as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto")
    assert str(err.value) == (f"{ckpt}/state/.metadata holds builtins.exec, which torch's checkpoint metadata "
                              f"never does: refused, nothing in it was run")
    assert not os.path.exists(marker)


def test_a_sharded_value_cannot_run_code(care_run, warm_model_dir, seed_bench_root, tmp_path):
    """The state's non-tensor values (AdamW's hyperparameters) are pickles that torch loads with
    weights_only=False: one pointed at a payload (in metadata that is itself clean) is refused."""
    import io
    ckpt = copy_checkpoint(care_run, tmp_path)
    marker = str(tmp_path / "ran.txt")
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    with open(os.path.join(ckpt, "state", "payload.distcp"), "wb") as f:
        f.write(payload.getvalue())

    def point_lr_at_payload(metadata):
        index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path="payload.distcp",
                                                           offset=0, length=len(payload.getvalue()))
    plant_in_metadata(ckpt, point_lr_at_payload)
    with pytest.raises(checkpoint.RunError) as err:
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "2", "--resume", "auto")
    assert str(err.value) == (f"{ckpt}/state: the value of optimizer.param_groups.0.lr holds exec: "
                              f"refused, nothing in it was run")
    assert not os.path.exists(marker)


def test_keep_last_keeps_the_newest_checkpoints(warm_model_dir, seed_bench_root, tmp_path):
    run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "3", "--save-every", "1", "--keep-last", "2",
        "--max-completion-length", "4", "--prompts-per-device", "1")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == \
        ["checkpoint-000002", "checkpoint-000003"]


def test_a_full_disk_is_named_with_the_checkpoint(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.fsdp, "save_sharded", full)
    with pytest.raises(OSError, match=f"no space left on device while writing the checkpoint {tmp_path}/checkpoint-000001"):
        run(warm_model_dir, seed_bench_root, tmp_path, "--max-steps", "1", "--max-completion-length", "4")
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    checkpoint.trim_jsonl(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(checkpoint.RunError, match="log.jsonl:2: not a JSON row"):
        checkpoint.trim_jsonl(str(path), 2)


def test_a_cut_log_line_of_a_step_with_a_checkpoint_is_written_again(care_run, warm_model_dir, seed_bench_root,
                                                                     tmp_path, capsys):
    """The last rows of both logs cut short, for step 2, whose checkpoint exists: resuming there
    writes them again, whole, from the checkpoint (before, they were dropped for good)."""
    copy_checkpoint(care_run, tmp_path, step=2)
    for name in ("log.jsonl", "completions.jsonl"):
        text = open(os.path.join(care_run, name)).read()
        (tmp_path / name).write_text(text[:-len(text.splitlines()[-1]) // 2 - 1])  # half the last line
    run(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care", "--max-steps", "2", "--save-every", "1",
        "--resume", "auto", "--log-completions")
    assert "dropped a last line cut short (the run was killed while writing it); step 2's rows are written " \
           "again from its checkpoint" in capsys.readouterr().out
    for name in ("log.jsonl", "completions.jsonl"):
        assert (tmp_path / name).read_text() == open(os.path.join(care_run, name)).read(), name


# --- data checked up front -------------------------------------------------------------------

def test_check_data_finds_a_corrupt_video_before_step_1(warm_model_dir, seed_bench_root, tmp_path, no_model):
    root, bad = corrupt_one_video(seed_bench_root, tmp_path)
    with pytest.raises(data.DataError, match=f"--check-data: 1 of 8 samples cannot be read .*{bad}"):
        run(warm_model_dir, root, tmp_path / "out", "--check-data")


def test_check_data_with_skipping_counts_the_skip(warm_model_dir, seed_bench_root, tmp_path):
    root, bad = corrupt_one_video(seed_bench_root, tmp_path)
    state = run(warm_model_dir, root, tmp_path / "out", "--check-data", "--skip-bad-samples", "--max-steps", "1",
                "--max-completion-length", "4")
    assert state["skipped"] == 1 and bad in state["skipped_messages"][0]
    assert read_log(tmp_path / "out")[0]["skipped"] == 1


def first_video(root):
    """The path of the video corrupt_one_video corrupts (the first training row's), and its id."""
    rows = [json.loads(line) for line in open(os.path.join(root, "annotations", "training_6k.jsonl"))]
    row = next(r for r in rows if r["task_progress_metadata"])
    return os.path.join(root, "videos", row["video_source"], row["video_basename"]), row["sample_id"]


def test_check_data_added_on_resume_is_refused_naming_what_it_leaves_out(warm_model_dir, seed_bench_root, tmp_path,
                                                                         capsys):
    """A video goes bad after step 1's checkpoint. --check-data on resume would leave its sample
    out, so every later step would get other samples: refused, naming it and the exact way on;
    with --allow-config-change it goes on, and the skip count covers the sample left out."""
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    out = tmp_path / "out"
    resume = [warm_model_dir, str(root), out, "--max-steps", "2", "--max-completion-length", "4", "--resume", "auto",
              "--skip-bad-samples"]
    run(warm_model_dir, str(root), out, "--max-steps", "2", "--save-every", "1", "--max-completion-length", "4")
    shutil.rmtree(out / "checkpoint-000002")
    video, bad = first_video(root)
    with open(video, "wb") as f:
        f.write(b"not a video")
    with pytest.raises(checkpoint.RunError) as err:
        run(*resume, "--check-data")
    assert str(err.value).startswith(
        f"resuming {out}/checkpoint-000001 on other data than it was made with: samples: 8 -> 7, 1 left out by "
        f"--check-data ({bad}) (every later step would get other samples; resume without --check-data, and with "
        f"--skip-bad-samples the run skips those samples at their steps")
    assert len(read_log(out)) == 2  # nothing was touched
    capsys.readouterr()
    state = run(*resume, "--check-data", "--allow-config-change")
    assert f"changed on resume (--allow-config-change): samples: 8 -> 7, 1 left out by --check-data ({bad})" in \
        capsys.readouterr().out
    log = read_log(out)
    assert state["skipped"] == 1 and log[1]["skipped"] == 1 and bad in state["skipped_messages"][0]
    assert all(bad not in ids for ids in log[1]["samples"])


@pytest.mark.parametrize("rewrite, changes", [
    (lambda rows: rows[::-1], "samples: 8 -> 8, the same ones in another order"),
    (lambda rows: rows[:-1], "samples: 8 -> 7, 1 gone (train_00007)"),
    (lambda rows: [{**rows[0], "question": rows[0]["question"] + " Really?"}] + rows[1:], None),
])
def test_a_data_file_rewritten_in_place_is_refused_on_resume(care_run, warm_model_dir, seed_bench_root, tmp_path,
                                                             no_model, rewrite, changes):
    """Same path, other content: the order (every step's samples) or the samples themselves may
    differ, and the path alone does not say so."""
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    out = tmp_path / "out"
    ann = root / "annotations" / "training_6k.jsonl"
    shutil.copytree(os.path.join(care_run, "checkpoint-000001"), out / "checkpoint-000001")
    saved = json.load(open(out / "checkpoint-000001" / "config.json"))
    saved.update(data=str(ann), data_root=str(root))  # as if care_run had trained on this copy
    json.dump(saved, open(out / "checkpoint-000001" / "config.json", "w"))
    state = torch.load(out / "checkpoint-000001" / "trainer_state.pt", weights_only=True)
    state["data"]["file"] = str(ann)
    torch.save(state, out / "checkpoint-000001" / "trainer_state.pt")
    before = hashlib.sha256(ann.read_bytes()).hexdigest()[:12]
    ann.write_text("".join(json.dumps(r) + "\n" for r in rewrite([json.loads(line) for line in open(ann)])))
    after = hashlib.sha256(ann.read_bytes()).hexdigest()[:12]
    with pytest.raises(checkpoint.RunError) as err:
        run(warm_model_dir, str(root), out, "--max-steps", "2", "--resume", "auto")
    expected = f"{ann}: its content changed (sha256 {before} -> {after})" + (f"; {changes}" if changes else "")
    assert str(err.value) == (f"resuming {out}/checkpoint-000001 on other data than it was made with: {expected} "
                              f"(every later step would get other samples; pass --allow-config-change to resume "
                              f"anyway)")


def test_media_outside_the_data_root_are_refused_unless_allowed(warm_model_dir, seed_bench_root, tmp_path):
    """A training row whose video_source climbs out of the data root (its video and image
    then live in tmp/elsewhere)."""
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    ann = root / "annotations" / "training_6k.jsonl"
    rows = [json.loads(line) for line in open(ann)]
    row = next(r for r in rows if r["task_progress_metadata"])
    outside = tmp_path / "elsewhere"
    shutil.copytree(root / "videos" / row["video_source"], outside)
    shutil.copy(root / "images" / row["video_source"] / row["current_observation_basename"], outside)
    row["video_source"] = os.path.relpath(outside, root / "videos")
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError, match=f"sample {row['sample_id']}.*--allow-outside-data-root allows it"):
        run(warm_model_dir, str(root), tmp_path / "strict", "--max-steps", "1")
    state = run(warm_model_dir, str(root), tmp_path / "strict", "--max-steps", "1", "--max-completion-length", "4",
                "--allow-outside-data-root")
    assert state["step"] == 1
