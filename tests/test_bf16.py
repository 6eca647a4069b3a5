"""bf16 on a CPU: a CARE and a GRPO step, an SFT step and an evaluation pass with
--mixed-precision bf16 on the tiny models, and one 2-process CARE step (FSDP2's
MixedPrecisionPolicy instead of accelerate's autocast).

What bf16 means here (models.py): bf16 compute, fp32 master weights. So in training the
layers' matmuls must run in bf16 (a spy on a linear layer's output dtype), while the policy's
parameters, its AdamW state and the EMA reference stay fp32 (reference.ema_update in fp32,
checked against its closed form at every call). Evaluation with bf16 loads the weights in bf16
and must compute in bf16 (nothing may cast the model back to fp32 on the way).

Tolerances against fp32, measured on the warm tiny model (2 prompts x 4 completions of 20
tokens, the same completions scored both ways): per-token log-probs differ by at most 0.012
(mean 3.5e-4) at log-probs of -0.9 to -2.7. That is bf16's rounding of the logits: the LM head
runs in bf16 under autocast (rollout._chunk_logprobs takes the softmax in fp32, but of bf16
logits), and a logit of about 4 has a bf16 spacing of 1/64. The gradient of the policy loss
differs by 0.36% of its norm (cosine 0.99999); GRPO's loss with its KL term (to a perturbed
reference) by 0.45%; one SFT step's logged cross-entropy (6.65, no sampling, so the same tokens
in both runs) by 0.0017. The asserts allow about 4x to 11x of what was measured, so that another CPU's bf16 kernels pass while a real
bug (an fp32/bf16 mix-up in a whole layer, a lost autocast) does not.
"""

import copy
import json
import math
import os

import pytest
import torch
from conftest import SMALL_BUDGET, read_log, read_state, train_argv
from safetensors.torch import load_file
from transformers import AutoTokenizer

import care
import config
import data
import encoding
import evaluate
import models
import reference
import rollout
import sft
import train
from test_distributed import argv_per_process, torchrun
from test_sft import sft_argv

LOGPROB_MAX, LOGPROB_MEAN = 0.05, 2e-3   # measured 0.012 and 3.5e-4
GRAD_REL = 0.03                          # measured 0.0036 of the gradient's norm
KL_LOSS_REL = 0.05                       # GRPO's loss (its KL term): measured 0.0045 relative
SFT_LOSS_ABS = 0.01                      # SFT's cross-entropy, about 6.65: measured 0.0017


# --- spies ---------------------------------------------------------------------------------------


def watch_compute(model, seen):
    """Record the output dtype of a language-model and a vision-tower linear layer in seen (a set):
    the dtype the matmuls really ran in, whatever the parameters' dtype."""
    layers = (model.model.language_model.layers[0].self_attn.q_proj, model.model.visual.blocks[0].attn.qkv)
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    return model


@pytest.fixture
def spies(monkeypatch):
    """The policy and the reference of a train.py/sft.py run in this process, with the dtypes
    their linear layers computed in, and each EMA update checked against its fp32 closed form."""
    got = {"policy_compute": set(), "ref_compute": set(), "ema_calls": 0}
    load_policy, make_reference, ema_update = models.load_policy, reference.make_reference, reference.ema_update

    def spied_policy(cfg):
        got["policy"] = watch_compute(load_policy(cfg), got["policy_compute"])
        return got["policy"]

    def spied_reference(model):
        got["reference"] = watch_compute(make_reference(model), got["ref_compute"])
        return got["reference"]

    def checked_ema(ref, policy, decay):
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        target = dict(policy.named_parameters())
        ema_update(ref, policy, decay)
        for name, p in ref.named_parameters():
            expected = before[name] + (1 - decay) * (target[name].detach().float() - before[name])
            assert p.dtype == torch.float32, f"EMA reference {name} is {p.dtype}"
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=f"EMA step of {name}")
        got["ema_calls"] += 1

    monkeypatch.setattr(models, "load_policy", spied_policy)
    monkeypatch.setattr(reference, "make_reference", spied_reference)
    monkeypatch.setattr(reference, "ema_update", checked_ema)
    return got


def assert_all_fp32(named, what):
    wrong = {name: t.dtype for name, t in named if t.is_floating_point() and t.dtype != torch.float32}
    assert not wrong, f"{what} not fp32: {dict(list(wrong.items())[:5])}"


def assert_fp32_state(ckpt, parts):
    """The checkpoint's sharded state: master weights, AdamW moments (and the reference) in fp32."""
    for part in parts:
        state = read_state(ckpt, part)
        if part == "optimizer":
            state = {f"{k}.{m}": v for k, s in state["state"].items() for m, v in s.items() if torch.is_tensor(v)}
        assert_all_fp32(state.items(), f"checkpoint {part}")


def assert_finite_log(rows, keys):
    for row in rows:
        for key in keys:
            value = row[key]
            assert value is not None and math.isfinite(value), (row["step"], key, value)


# --- the same completions scored in fp32 and bf16 -------------------------------------------------


@pytest.fixture(scope="module")
def scored(warm_model_dir, seed_bench_root):
    """The warm model and a rollout it sampled in fp32: 2 prompts (with and without a video) x 4."""
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    model = models.load_model(warm_model_dir, "sdpa").eval()
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(warm_model_dir, **SMALL_BUDGET)
    chosen = (next(s for s in samples if s.video), next(s for s in samples if not s.video))
    batch = encoding.collate_prompts([encoding.encode_prompt(s, tokenizer, budget) for s in chosen], tokenizer)
    completions = rollout.generate(model, batch, tokenizer, 4, rollout.sampling_config(tokenizer, 20), seeds=[1, 2])
    return model, tokenizer, completions


def autocast(bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def test_bf16_scores_within_tolerance_of_fp32(scored):
    """Policy log-probs, CARE's answer confidence, GRPO's loss with its KL term and the policy
    gradient, each under autocast bf16 against fp32, on the same completions."""
    model, tokenizer, completions = scored
    mask = completions.completion_mask.bool()
    with torch.no_grad():
        fp32 = rollout.completion_logprobs(model, completions)
        with autocast(True):
            bf16 = rollout.completion_logprobs(model, completions)
    assert bf16.dtype == torch.float32  # the log-softmax is taken in fp32
    diff = (fp32 - bf16)[mask].abs()
    assert 0 < diff.max() <= LOGPROB_MAX and diff.mean() <= LOGPROB_MEAN, (diff.max(), diff.mean())

    with torch.no_grad():
        conf32, span = reference.answer_logprob(model, completions, tokenizer)
        with autocast(True):
            conf16, _ = reference.answer_logprob(model, completions, tokenizer)
    assert span.any() and (conf32 - conf16)[span].abs().max() <= LOGPROB_MAX

    # GRPO's loss: the ratio term is 0 at ratio 1 whatever the precision; the KL term is not.
    ref, noise = copy.deepcopy(model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, 0.3, -0.3])
    results = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.no_grad(), autocast(bf16):
            ref_logp = rollout.completion_logprobs(ref, completions)
        with autocast(bf16):
            logp = rollout.completion_logprobs(model, completions)
        loss, _ = care.policy_loss(logp, adv, completions.completion_mask, ref_logp=ref_logp, beta=0.04)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert grads.dtype == torch.float32 and torch.isfinite(loss)
        results.append((loss.item(), grads))
    model.zero_grad()
    (loss32, grad32), (loss16, grad16) = results
    assert loss32 > 0 and abs(loss32 - loss16) <= KL_LOSS_REL * loss32, (loss32, loss16)
    assert (grad32 - grad16).norm() <= GRAD_REL * grad32.norm(), (grad32 - grad16).norm() / grad32.norm()


# --- train.py, sft.py, evaluate.py with --mixed-precision bf16 ------------------------------------


@pytest.mark.parametrize("algo", ["care", "grpo"])
def test_train_steps_in_bf16(algo, spies, warm_model_dir, seed_bench_root, tmp_path):
    """Two steps: finite log; every forward of policy and reference computed in bf16 (generation,
    CARE's scoring or GRPO's KL, the update); fp32 master weights, AdamW state and reference,
    the EMA an exact fp32 step; the export in the initial checkpoint's dtype."""
    out = tmp_path / algo
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, out, "--algo", algo,
                                               "--max-steps", "2", "--mixed-precision", "bf16")))
    rows = read_log(out)
    assert_finite_log(rows, ["loss", "reward", "grad_norm", "kl", "adv_std"] + (["ref_conf"] if algo == "care" else []))
    assert any(r["grad_norm"] > 0 for r in rows), "no learning signal: the update was never exercised"
    assert spies["policy_compute"] == {torch.bfloat16}, spies["policy_compute"]
    assert spies["ref_compute"] == {torch.bfloat16}, spies["ref_compute"]
    assert_all_fp32(spies["policy"].named_parameters(), "policy parameters after the steps")
    assert_all_fp32(spies["reference"].named_parameters(), "reference parameters after the steps")
    assert spies["ema_calls"] == (2 if algo == "care" else 0)
    ckpt = out / "checkpoint-000002"
    assert_fp32_state(ckpt, ["policy", "optimizer", "reference"])
    exported = load_file(os.path.join(ckpt, "policy", "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {models.checkpoint_dtype(warm_model_dir)}


def test_export_keeps_a_bf16_checkpoint_bf16(warm_model_dir, tmp_path):
    """A bf16 checkpoint (as Qwen's are) trained in fp32 master weights exports in bf16, and its
    config.json says so: fsdp.export_policy's intent. Loaded back, it is the same weights."""
    import checkpoint
    import fsdp
    bf16_dir = str(tmp_path / "bf16-model")
    models.load_model(warm_model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    assert models.checkpoint_dtype(bf16_dir) == torch.bfloat16
    policy = models.load_model(bf16_dir)
    assert_all_fp32(policy.named_parameters(), "the loaded policy")  # master weights
    fsdp.export_policy(str(tmp_path / "export"), policy, True, dtype=models.checkpoint_dtype(bf16_dir))
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "export" / "config.json"))["dtype"] == "bfloat16"
    assert policy.config.dtype == torch.float32  # the live model's config is left as it was
    assert "checkpoint_dtype(cfg.model)" in open(checkpoint.__file__).read()  # what checkpoint.save passes


def test_sft_step_in_bf16(spies, warm_model_dir, seed_bench_root, tmp_path):
    """One SFT step (2 micro-batches) in bf16 and in fp32 on the same samples: the logged loss
    within SFT_LOSS_ABS, computed in bf16, master weights and AdamW state fp32."""
    from accelerate.state import AcceleratorState
    losses = {}
    for precision in ("no", "bf16"):
        # internal: accelerate refuses a second mixed precision in one process (conftest resets too).
        AcceleratorState._reset_state(reset_partial_state=True)
        spies["policy_compute"].clear()
        out = tmp_path / precision
        sft.sft(sft.parse_config(sft_argv(warm_model_dir, seed_bench_root, out, "--max-steps", "1")
                                 + ["--mixed-precision", precision]))
        (row,) = read_log(out)
        assert_finite_log([row], ["loss", "grad_norm"])
        losses[precision] = row["loss"]
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert spies["policy_compute"] == {expected}, (precision, spies["policy_compute"])
        assert_all_fp32(spies["policy"].named_parameters(), "SFT policy parameters after the step")
        assert_fp32_state(out / "checkpoint-000001", ["policy", "optimizer"])
    assert losses["no"] != losses["bf16"] and abs(losses["no"] - losses["bf16"]) <= SFT_LOSS_ABS, losses


def eval_argv(model_dir, root, out, precision):
    return ["--model", model_dir, "--data", f"{root}/annotations/validation_L1.jsonl", "--data-root", root,
            "--output-dir", str(out), "--limit", "2", "--max-new-tokens", "20", "--judge-max-new-tokens", "6",
            "--max-frames", "4", "--video-max-pixels", "3136", "--image-max-pixels", "3136",
            "--mixed-precision", precision]


@pytest.mark.parametrize("precision", ["bf16", "no", "auto"])
def test_evaluation_pass_in_bf16(precision, warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """evaluate.py --mixed-precision: bf16 weights and bf16 compute (generation and the judge),
    nothing cast back to fp32; no and (on a CPU) auto: fp32. The resolved choice is a recorded
    row setting."""
    loaded, seen = [], set()
    load_model = models.load_model

    def spied(*args, **kwargs):
        loaded.append(watch_compute(load_model(*args, **kwargs), seen))
        return loaded[-1]

    monkeypatch.setattr(models, "load_model", spied)
    summary = evaluate.main(eval_argv(warm_model_dir, seed_bench_root, tmp_path, precision))
    resolved = "bf16" if precision == "bf16" or (precision == "auto" and torch.cuda.is_available()) else "no"
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float32
    assert summary["all"]["n"] == 2 and summary["all"]["judged"] >= 1  # the judge ran too
    (model,) = loaded
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert seen == {dtype}, seen
    settings = json.load(open(tmp_path / "eval_settings.json"))["settings"]
    assert settings["mixed_precision"] == resolved


def test_bf16_and_fp32_rows_never_mix(warm_model_dir, seed_bench_root, tmp_path):
    """--mixed-precision is a row setting: a bf16 re-run in an fp32 directory is refused."""
    evaluate.main(eval_argv(warm_model_dir, seed_bench_root, tmp_path, "no"))
    with pytest.raises(SystemExit, match="--mixed-precision no -> bf16"):
        evaluate.main(eval_argv(warm_model_dir, seed_bench_root, tmp_path, "bf16"))


def test_two_process_care_steps_in_bf16(warm_model_dir, seed_bench_root, tmp_path):
    """FSDP2 over gloo with its MixedPrecisionPolicy (bf16 parameters in compute, fp32 shards and
    gradient reduction): two CARE steps run, log finite values, and keep fp32 shards of the
    policy, its AdamW state and the reference."""
    out = tmp_path / "care-2proc-bf16"
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, out, "--algo", "care",
                                           "--max-steps", "2", "--mixed-precision", "bf16"))
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_log(rows, ["loss", "reward", "grad_norm", "ref_conf", "adv_std"])
    assert any(r["grad_norm"] > 0 for r in rows)
    assert_fp32_state(out / "checkpoint-000002", ["policy", "optimizer", "reference"])
