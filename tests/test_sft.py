"""sft.py on the tiny models: the published defaults, the reply and what is scored, gradient
accumulation, a run that learns and saves a checkpoint train.py and evaluate.py take, answer-only
rows, exact resume, too long samples, and 2 processes against 1."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL_BUDGET, multiprocess_env, read_log, train_argv
from safetensors.torch import load_file
from transformers import AutoTokenizer

import checkpoint
import config
import data
import encoding
import evaluate
import fsdp
import models
import rewards
import rollout
import sft
import tiny
import train

PUBLISHED = {"lr": 2e-5, "warmup_ratio": 0.1, "epochs": 1, "per_device_batch_size": 1,
             "gradient_accumulation_steps": 16, "mixed_precision": "auto", "gradient_checkpointing": True,
             "max_length": 8192, "seed": 42, "model": "Qwen/Qwen2-VL-7B-Instruct",
             "data": "SEED-Bench-R1/annotations/training_with_cot_6k.jsonl"}


def cot_file(root):
    return f"{root}/annotations/training_with_cot_6k.jsonl"


def sft_argv(model_dir, root, out, *extra):
    """sft.py flags for the tiny runs: 1 sample x 2 accumulation steps, a large lr, seed 0, fp32
    (on a GPU too: test_two_processes_match_one compares with 2 CPU processes)."""
    budget = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_BUDGET.items()]
    return ["--model", model_dir, "--data", cot_file(root), "--data-root", root, "--output-dir", str(out),
            "--gradient-accumulation-steps", "2", "--lr", "3e-3", "--seed", "0", "--mixed-precision", "no",
            *budget, *extra]


def run(model_dir, root, out, *extra):
    return sft.sft(sft.parse_config(sft_argv(model_dir, root, out, *extra)))


def setup(model_dir, root, *extra):
    """(cfg, tokenizer, visual budget, samples) as sft.run has them."""
    cfg = sft.parse_config(sft_argv(model_dir, root, "unused", *extra))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    budget = encoding.budget_from_checkpoint(model_dir, **SMALL_BUDGET)
    samples, _ = data.load_samples(cot_file(root), root, seed=cfg.seed, reasoning_field=cfg.reasoning_field)
    return cfg, tokenizer, budget, samples


# --- settings ----------------------------------------------------------------------------------


def test_help_shows_the_published_recipe():
    """Every flag with its help line and default, the defaults SEED-Bench-R1's SFT recipe's."""
    assert {k: getattr(sft.SFTConfig(), k) for k in PUBLISHED} == PUBLISHED
    text = subprocess.run([sys.executable, "sft.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, "COLUMNS": "1000"}).stdout  # no line breaks in a path
    assert "cosine" in text and "bf16 on GPU" in text
    blocks = {block.split()[0].rstrip(","): " ".join(block.split()) for block in text.split("\n  --")[1:]}
    for f in dataclasses.fields(sft.SFTConfig):
        flag = f.name.replace("_", "-")
        assert flag in blocks, flag
        shown = blocks[flag].replace(f"no-{flag}", "")
        assert f.metadata["help"].split()[0] in shown, flag
        assert f"(default: {f.default})" in shown, (flag, shown)


@pytest.mark.parametrize("flags, message", [
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1"),
    (["--per-device-batch-size", "0"], "--per-device-batch-size must be >= 1"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),                                    # train.py's check
    (["--max-frames", "2", "--min-frames", "4"], "need 1 <= --min-frames <= --max-frames"),
])
def test_bad_settings_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        sft.parse_config(flags)
    assert message in capsys.readouterr().err


# --- data and the reply ------------------------------------------------------------------------


def test_reasoning_is_read_from_the_named_field(seed_bench_root, tmp_path):
    """Plain text as it is, a whole reply's <think> part, and nothing for a missing, null or
    blank field (tiny.cot_fields); another field name reads nothing."""
    assert tiny.COT_FIELD == sft.SFTConfig().reasoning_field
    samples, _ = data.load_samples(cot_file(seed_bench_root), seed_bench_root, reasoning_field="response")
    rows = [json.loads(line) for line in open(cot_file(seed_bench_root))]
    for i, (s, row) in enumerate(zip(samples, rows)):
        expected = [f"Looking at the video, the square that moves is {row['answer']}.",
                    f"Let me think: the moving square is {row['answer']}.", None][i % 3]
        assert s.reasoning == expected, i
    for field in ("cot", None):
        samples, _ = data.load_samples(cot_file(seed_bench_root), seed_bench_root, reasoning_field=field)
        assert all(s.reasoning is None for s in samples)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**row, "response": ["not", "text"]} if i == 3 else row) + "\n"
                           for i, row in enumerate(rows)))
    with pytest.raises(data.DataError, match=rf"bad.jsonl:4 \(sample {rows[3]['sample_id']}\): "
                                            r"response \(the reasoning\) must be text, got list"):
        data.load_samples(str(bad), seed_bench_root, reasoning_field="response")


def test_the_reply_is_the_rewarded_template_and_only_it_is_scored(tiny_model_dir, seed_bench_root):
    """By hand: the reply's text and tokens; the scored tokens are exactly the reply's, after a
    prompt that ends with the assistant header; the loss equals a plain forward's cross-entropy
    with every prompt label masked."""
    cfg, tokenizer, budget, samples = setup(tiny_model_dir, seed_bench_root)
    sample = dataclasses.replace(samples[0], reasoning="the square is red", solution="B")
    assert sft.target_text(sample) == "<think>the square is red</think><answer>B</answer><|im_end|>"
    assert sft.target_text(dataclasses.replace(sample, reasoning=None)) == "<think></think><answer>B</answer><|im_end|>"
    for s in (sample, dataclasses.replace(sample, reasoning=None)):
        assert rewards.format_reward(sft.target_text(s).removesuffix("<|im_end|>")) == 1.0
    [example], _ = sft.encode_examples(cfg, [sample], tokenizer, budget)
    assert tokenizer.decode(example.target) == sft.target_text(sample)
    assert example.target[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(example.prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    batch = sft.as_rollout([example], tokenizer, "cpu")
    assert batch.completion_mask.sum() == len(example.target)
    model = models.load_model(tiny_model_dir)
    with torch.no_grad():
        logp = rollout.completion_logprobs(model, batch, chunk_size=3)       # chunked as in training
        reference = tiny.supervised_loss(model, tokenizer, [example.prompt], [sft.target_text(sample)])
    assert (-logp.sum() / len(example.target)).item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "sensitive_model_dir"])
def test_accumulating_micro_batches_gives_the_gradient_of_one_batch(model_fixture, seed_bench_root, request):
    """2 micro-batches of 1 = 1 batch of 2, for replies of different lengths (a token mean per
    micro-batch would weigh the short reply's tokens more); a weight-0 stand-in adds nothing.
    Under the prompt-sensitive model a batch that paired a reply with the other sample's prompt
    or video would give another gradient."""
    cfg, tokenizer, budget, samples = setup(request.getfixturevalue(model_fixture), seed_bench_root)
    long_one = next(s for s in samples if s.reasoning and s.video)
    short_one = next(s for s in samples if s.reasoning is None)
    examples, _ = sft.encode_examples(cfg, [long_one, short_one], tokenizer, budget)
    a, b = examples
    assert len(a.target) > 2 * len(b.target)
    tokens = len(a.target) + len(b.target)
    accelerator = fsdp.make_accelerator("no")
    model = models.load_policy(cfg).to(accelerator.device)

    def gradient(micro_batches):
        model.zero_grad(set_to_none=True)
        nll = sft.accumulate(cfg, accelerator, model, tokenizer, micro_batches, tokens)
        return nll, {n: p.grad.clone() for n, p in model.named_parameters()}

    nll_1, one_batch = gradient([([a, b], 1.0)])
    nll_2, two_micro = gradient([([a], 1.0), ([b], 1.0)])
    nll_3, stand_in = gradient([([a], 1.0), ([b], 1.0), ([a], 0.0)])
    assert nll_1 == pytest.approx(nll_2, rel=1e-5) and nll_3 == nll_2
    for name in one_batch:
        # The sensitive model's gradients are larger, and padding's float32 noise with them.
        atol = 1e-7 if model_fixture == "tiny_model_dir" else 1e-4 * one_batch[name].abs().max().item()
        torch.testing.assert_close(two_micro[name], one_batch[name], rtol=1e-4, atol=atol)
        torch.testing.assert_close(stand_in[name], two_micro[name], rtol=0, atol=0)
    assert sum(g.abs().sum() for g in one_batch.values()) > 0


# --- runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, seed_bench_root, tmp_path_factory):
    """3 epochs of the 8 tiny rows, 2 samples a step (12 steps), a checkpoint every 4; what it printed."""
    out = tmp_path_factory.mktemp("sft")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        state = run(tiny_model_dir, seed_bench_root, out, "--epochs", "3", "--save-every", "4")
    return out, state, printed.getvalue()


def test_sft_steps_on_every_model_family(family, family_tiny_dir, seed_bench_root, tmp_path):
    """Two SFT steps on each family: finite losses, and the export loads back as that family."""
    state = run(family_tiny_dir, seed_bench_root, tmp_path / "out", "--max-steps", "2", "--save-every", "2")
    log = read_log(tmp_path / "out")
    assert state["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    policy = models.load_model(str(tmp_path / "out" / "checkpoint-000002" / "policy"))
    assert type(policy).__name__ == models.FAMILIES[family].class_name


def test_sft_lowers_the_loss_on_its_data_and_saves(sft_run):
    out, state, _ = sft_run
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 13)) and state["step"] == 12
    # Warmup over ceil(0.1 x 12) = 2 steps, then cosine down to 0.
    assert log[0]["lr"] == pytest.approx(1.5e-3) and log[1]["lr"] == pytest.approx(3e-3)
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    for r in log:
        assert set(r) >= {"loss", "lr", "grad_norm", "tokens", "samples", "skipped", "step_time"}
    # Each epoch (4 steps) sees all 8 rows: the same data, a lower loss.
    epoch_loss = [sum(r["loss"] * r["tokens"] for r in log[e:e + 4]) / sum(r["tokens"] for r in log[e:e + 4])
                  for e in (0, 4, 8)]
    assert epoch_loss[2] < epoch_loss[1] < epoch_loss[0] - 0.5, epoch_loss
    assert sorted({s for r in log[:4] for s in r["samples"][0]}) == [f"train_{i:05d}" for i in range(8)]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == \
        ["checkpoint-000004", "checkpoint-000008", "checkpoint-000012"]
    ckpt = os.path.join(out, "checkpoint-000012")
    assert sorted(os.listdir(ckpt)) == ["config.json", "policy", "state", "trainer_state.pt"]
    saved = json.load(open(os.path.join(ckpt, "config.json")))
    assert saved["gradient_accumulation_steps"] == 2 and saved["reasoning_field"] == "response"


def test_rows_without_reasoning_are_counted_and_train_on_the_answer_alone(sft_run, tiny_model_dir,
                                                                          seed_bench_root):
    out, _, printed = sft_run
    cfg, tokenizer, budget, samples = setup(tiny_model_dir, seed_bench_root)
    answer_only = [s for s in samples if s.reasoning is None]
    assert len(answer_only) == 2  # tiny.cot_fields: rows 2 (no field) and 5 (null) of 8
    assert "2 of 8 samples have no reasoning in 'response': they train on the answer alone" in printed
    examples, _ = sft.encode_examples(cfg, answer_only, tokenizer, budget)
    for e in examples:
        assert tokenizer.decode(e.target) == f"<think></think><answer>{e.sample.solution}</answer><|im_end|>"
    trained = {s for r in read_log(out) for s in r["samples"][0]}
    assert {s.sample_id for s in answer_only} <= trained


def test_an_sft_checkpoint_is_a_model_for_train_and_evaluate(sft_run, seed_bench_root, tmp_path):
    out, _, _ = sft_run
    policy = os.path.join(out, "checkpoint-000012", "policy")
    state = train.train(config.parse_config(train_argv(policy, seed_bench_root, tmp_path / "grpo", "--algo", "grpo",
                                                       "--max-steps", "1")))
    assert state["step"] == 1 and read_log(tmp_path / "grpo")[0]["step"] == 1
    summary = evaluate.main(["--model", policy, "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl",
                             "--data-root", seed_bench_root, "--output-dir", str(tmp_path / "eval"),
                             "--max-new-tokens", "20", "--max-frames", "4", "--video-max-pixels", "3136",
                             "--image-max-pixels", "3136", "--judge", "none"])
    assert summary["all"]["n"] == 4


def test_resume_continues_the_same_run(sft_run, tiny_model_dir, seed_bench_root, tmp_path):
    """8 steps, a kill while step 9 was logged, resume: steps 9-12 (the third epoch, its data
    order and the cosine's tail) match the uninterrupted 12, in the log and in the weights."""
    out, _, _ = sft_run
    shutil.copytree(os.path.join(out, "checkpoint-000008"), tmp_path / "checkpoint-000008")
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines(line for line in open(os.path.join(out, "log.jsonl")) if json.loads(line)["step"] <= 9)
        f.write('{"step": 10, "loss": 0.')
    state = run(tiny_model_dir, seed_bench_root, tmp_path, "--epochs", "3", "--save-every", "4", "--resume", "auto")
    assert state["step"] == 12
    full, resumed = read_log(out), read_log(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(full[8:], resumed[8:]):
        assert a["samples"] == b["samples"] and a["tokens"] == b["tokens"]
        for key in ("loss", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    a = load_file(os.path.join(out, "checkpoint-000012", "policy", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "checkpoint-000012", "policy", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_global_batch_but_not_another_cut_of_it(sft_run, tiny_model_dir, seed_bench_root,
                                                                       tmp_path):
    out, _, _ = sft_run
    shutil.copytree(os.path.join(out, "checkpoint-000008"), tmp_path / "checkpoint-000008")
    with pytest.raises(Exception, match=r"global batch \(processes x per device batch size x gradient "
                                        r"accumulation steps\): 1 x 1 x 2 -> 1 x 1 x 4"):
        run(tiny_model_dir, seed_bench_root, tmp_path, "--epochs", "3", "--save-every", "4", "--resume", "auto",
            "--gradient-accumulation-steps", "4")
    state = run(tiny_model_dir, seed_bench_root, tmp_path, "--epochs", "3", "--save-every", "4", "--resume", "auto",
                "--gradient-accumulation-steps", "1", "--per-device-batch-size", "2")
    assert state["step"] == 12


def test_a_too_long_sample_is_named_or_skipped(tiny_model_dir, seed_bench_root, tmp_path):
    cfg, tokenizer, budget, samples = setup(tiny_model_dir, seed_bench_root)
    examples, _ = sft.encode_examples(cfg, samples, tokenizer, budget)
    lengths = {e.sample.sample_id: len(e.prompt["input_ids"]) + len(e.target) for e in examples}
    limit = max(lengths.values()) - 1
    too_long = {sid for sid, n in lengths.items() if n > limit}
    assert 0 < len(too_long) < 4
    with pytest.raises(data.DataError, match=rf"sample ({'|'.join(too_long)}): {limit + 1} tokens \(prompt \d+ \+ "
                                             rf"reply \d+\), more than --max-length {limit}"):
        run(tiny_model_dir, seed_bench_root, tmp_path / "strict", "--max-length", str(limit))
    state = run(tiny_model_dir, seed_bench_root, tmp_path / "skip", "--max-length", str(limit), "--skip-bad-samples")
    assert state["skipped"] == len(too_long)
    assert {m.split(":")[0] for m in state["skipped_messages"]} == {f"sample {sid}" for sid in too_long}
    trained = {s for r in read_log(tmp_path / "skip") for s in r["samples"][0]}
    assert trained == set(lengths) - too_long
    # Still 2 forwards and backwards per step (under FSDP every process runs the same
    # collectives): a step that lost a sample reruns a kept one with weight 0.
    cfg = sft.parse_config(sft_argv(tiny_model_dir, seed_bench_root, "unused", "--max-length", str(limit),
                                    "--skip-bad-samples"))
    accelerator = fsdp.make_accelerator("no")
    steps = [sft.next_step(cfg, accelerator, samples, tokenizer, budget, k, 4) for k in range(4)]
    for step in steps:
        weights = [w for _, w in step.micro_batches]
        assert weights == ([1.0, 0.0] if step.skipped else [1.0, 1.0])
        assert step.tokens == sum(len(e.target) for examples, w in step.micro_batches if w for e in examples)
        assert set(step.sample_ids).isdisjoint(too_long)
    assert sum(len(step.skipped) for step in steps) == len(too_long)


def test_two_processes_match_one(sft_run, tiny_model_dir, seed_bench_root, tmp_path):
    """2 processes x 1 sample (FSDP2 over gloo) against 1 process x 2 micro-batches: the same
    global batch, so the same losses, token counts, gradient norms and weights (float rounding)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
           *sft_argv(tiny_model_dir, seed_bench_root, tmp_path, "--epochs", "3", "--save-every", "12",
                     "--gradient-accumulation-steps", "1")]
    done = subprocess.run(cmd, cwd=ROOT, env=multiprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    out, _, _ = sft_run
    one, two = read_log(out), read_log(tmp_path)
    assert [r["step"] for r in two] == list(range(1, 13))
    for a, b in zip(one, two):
        assert sorted(a["samples"][0]) == sorted(b["samples"][0] + b["samples"][1]) and a["tokens"] == b["tokens"]
        for key in ("loss", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), key
    a = load_file(os.path.join(out, "checkpoint-000012", "policy", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "checkpoint-000012", "policy", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-4)


def test_the_prompt_template_reaches_the_sft_prompts(tiny_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """--prompt-template: a one-step SFT run encodes every prompt with it (here a file written by
    the test), and what is trained on is its text."""
    path = tmp_path / "template.txt"
    path.write_text("{question}{options}zebra {answer_format}")
    seen = []
    real = encoding.encode_batch
    monkeypatch.setattr(encoding, "encode_batch", lambda *a, **k: seen.append(k["template"]) or real(*a, **k))
    run(tiny_model_dir, seed_bench_root, tmp_path / "out", "--max-steps", "1", "--prompt-template", str(path))
    assert seen and all(t.text == "{question}{options}zebra {answer_format}" for t in seen)
    cfg, tokenizer, budget, samples = setup(tiny_model_dir, seed_bench_root)
    [example], _ = sft.encode_examples(cfg, samples[:1], tokenizer, budget, seen[0])
    assert "zebra" in tokenizer.decode(example.prompt["input_ids"])


def test_resume_refuses_a_data_file_rewritten_in_place(tiny_model_dir, seed_bench_root, tmp_path):
    """sft.py resumes through train.load_data and checkpoint.py as train.py does: the same rows
    in another order at the same path would give every later step other samples."""
    root = tmp_path / "data"
    shutil.copytree(seed_bench_root, root)
    out = tmp_path / "out"
    run(tiny_model_dir, str(root), out, "--max-steps", "2", "--save-every", "1")
    shutil.rmtree(out / "checkpoint-000002")
    path = cot_file(str(root))
    lines = open(path).readlines()
    open(path, "w").writelines(lines[::-1])
    with pytest.raises(checkpoint.RunError, match=f"resuming {out}/checkpoint-000001 on other data than it was made "
                                                  f"with: {path}: its content changed .*; samples: 8 -> 8, the same "
                                                  f"ones in another order"):
        run(tiny_model_dir, str(root), out, "--max-steps", "2", "--save-every", "1", "--resume", "auto")
    open(path, "w").writelines(lines)  # put back as it was: the run goes on
    assert run(tiny_model_dir, str(root), out, "--max-steps", "2", "--save-every", "1", "--resume", "auto")["step"] == 2


def test_a_checkpoint_of_the_other_program_is_refused_before_anything_loads(care_run, tiny_model_dir,
                                                                            seed_bench_root, tmp_path, monkeypatch):
    """train.py's checkpoints hold a reference and rollout settings, sft.py's neither: each
    program resumes only its own, and says how to start from the other's weights."""
    run(tiny_model_dir, seed_bench_root, tmp_path / "sft", "--max-steps", "1")
    shutil.copytree(os.path.join(care_run, "checkpoint-000001"), tmp_path / "rl" / "checkpoint-000001")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))
    ckpt = tmp_path / "sft" / "checkpoint-000001"
    with pytest.raises(checkpoint.RunError) as err:
        train.train(config.parse_config(train_argv(tiny_model_dir, seed_bench_root, tmp_path / "sft", "--resume",
                                                   "auto", "--max-steps", "1")))
    assert str(err.value) == (f"--resume {ckpt}: a checkpoint of sft.py, which train.py cannot continue (to start a "
                              f"train.py run from its weights, pass --model {ckpt}/policy instead)")
    ckpt = tmp_path / "rl" / "checkpoint-000001"
    with pytest.raises(checkpoint.RunError, match=f"--resume {ckpt}: a checkpoint of train.py, which sft.py cannot "
                                                  f"continue"):
        run(tiny_model_dir, seed_bench_root, tmp_path / "rl", "--resume", "auto", "--max-steps", "1")


def test_a_cut_log_line_of_a_step_with_a_checkpoint_is_written_again(tiny_model_dir, seed_bench_root, tmp_path):
    run(tiny_model_dir, seed_bench_root, tmp_path, "--max-steps", "1")
    whole = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text(whole[:len(whole) // 2])
    run(tiny_model_dir, seed_bench_root, tmp_path, "--max-steps", "1", "--resume", "auto")
    assert (tmp_path / "log.jsonl").read_text() == whole
