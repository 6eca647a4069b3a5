"""--report-to: TensorBoard (and wandb, when installed) get log.jsonl's numbers under the same
names at the same steps, and the run's settings; a bad name or a missing package is a one-line
error before anything loads."""

import glob
import json
import os
import shutil
import struct
import sys

import pytest

import config
import sft
import train
from conftest import read_log, train_argv

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(out):
    """The scalars ({tag: {step: value}}) and texts ({tag: [text]}) of OUTPUT/tensorboard."""
    events = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"),
                                                size_guidance={event_accumulator.SCALARS: 0,
                                                               event_accumulator.TENSORS: 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
             for tag in events.Tags()["tensors"]}
    return scalars, texts


def test_tensorboard_gets_the_log_rows_and_the_config(warm_model_dir, seed_bench_root, tmp_path):
    out = tmp_path / "run"
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, out, "--max-steps", "2",
                                               "--report-to", "tensorboard")))
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    scalars, texts = read_events(out)
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    for row in log:
        for key in ("reward", "reward_acc", "loss", "kl", "lr", "grad_norm", "skipped", "step_time"):
            assert scalars[key][row["step"]] == pytest.approx(row[key], rel=1e-6), key
    assert "samples" not in scalars and "step" not in scalars
    # Every number of the log row, and nothing else.
    assert set(scalars) == {k for k, v in log[0].items() if k != "step" and isinstance(v, (int, float))}
    settings = json.loads(texts["config/text_summary"][0].strip("`\n"))
    assert settings["algo"] == "care" and settings["num_generations"] == 4 and settings["report_to"] == "tensorboard"


def test_a_resumed_run_replaces_the_steps_it_runs_again(warm_model_dir, seed_bench_root, tmp_path):
    """Killed after step 2 was logged but before its checkpoint: the resumed run logs step 2
    again, and TensorBoard shows it once (the old events from step 2 on are purged)."""
    out = tmp_path / "run"
    argv = train_argv(warm_model_dir, seed_bench_root, out, "--max-steps", "2", "--save-every", "1",
                      "--report-to", "tensorboard")
    train.train(config.parse_config(argv))
    shutil.rmtree(out / "checkpoint-000002")
    train.train(config.parse_config(argv + ["--resume", "auto"]))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2]
    assert events.Scalars("reward")[1].value == pytest.approx(read_log(out)[1]["reward"], rel=1e-6)

def test_sft_reports_its_rows_the_same_way(tiny_model_dir, seed_bench_root, tmp_path):
    out = tmp_path / "sft"
    sft.sft(sft.parse_config(["--model", tiny_model_dir, "--data", f"{seed_bench_root}/annotations/training_6k.jsonl",
                              "--data-root", seed_bench_root, "--output-dir", str(out), "--max-steps", "1",
                              "--gradient-accumulation-steps", "1", "--max-frames", "4", "--video-max-pixels", "3136",
                              "--image-max-pixels", "3136", "--report-to", "tensorboard"]))
    scalars, texts = read_events(out)
    row = read_log(out)[0]
    assert scalars["loss"][1] == pytest.approx(row["loss"], rel=1e-6) and scalars["tokens"][1] == row["tokens"]
    assert json.loads(texts["config/text_summary"][0].strip("`\n"))["reasoning_field"] == "response"


def test_without_report_to_nothing_is_written(care_run):
    assert not os.path.exists(os.path.join(care_run, "tensorboard")) and not os.path.exists(os.path.join(care_run, "wandb"))


@pytest.mark.parametrize("flag, message", [
    ("nosuch", "--report-to must name tensorboard or wandb (comma-separated), got 'nosuch'"),
    ("tensorboard,,nosuch", "got 'nosuch'"),
])
def test_an_unknown_reporter_is_one_line(flag, message, capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--report-to", flag])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("parse", [config.parse_config, sft.parse_config])
def test_a_missing_package_is_named_before_the_run(parse, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(SystemExit):
        parse(["--report-to", "tensorboard"])
    err = capsys.readouterr().err
    assert "--report-to tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert err.count("\n") == 1


def read_wandb_run(path):
    """The settings and the logged rows ({step: {name: value}}) of an offline run's .wandb file:
    wandb's record log (leveldb's log format: 32 KiB blocks, records with a 7-byte header,
    split across blocks as first/middle/last) of its protobuf Records. wandb has no offline
    reader of its own."""
    from wandb.proto import wandb_internal_pb2
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    settings, rows, pos, data = {}, {}, 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = data + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            data = b""
            if record.WhichOneof("record_type") == "run":
                settings.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            if record.WhichOneof("record_type") == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[items["_step"]] = items
    return settings, rows


def test_wandb_offline_run_records_the_numbers_and_config(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, out, "--max-steps", "2",
                                               "--report-to", "wandb")))
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    settings, rows = read_wandb_run(path)
    assert settings["num_generations"] == 4 and settings["report_to"] == "wandb" and settings["start_step"] == 0
    for row in read_log(out):
        for key in ("reward", "reward_acc", "loss", "kl", "lr", "step_time"):
            assert rows[row["step"]][key] == pytest.approx(row[key], rel=1e-6), key
