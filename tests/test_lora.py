"""LoRA (--lora-rank): the adapters start as the base, the references are views of the one base
(CARE: the adapters' EMA swapped in; GRPO: adapters off), and a LoRA run trains the adapters
alone, checkpoints them with their EMA, resumes exactly and exports a merged and an
adapter-only model."""

import copy
import os
import shutil

import pytest
import torch
from conftest import read_log, read_state, train_argv
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import config
import data
import encoding
import lora
import models
import reference
import rollout
import train

SMALL = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56, video_min_pixels=28 * 28,
             image_min_pixels=28 * 28)


def lora_cfg(model_dir, *flags):
    return config.parse_config(["--model", model_dir, "--lora-rank", "4", "--no-gradient-checkpointing", *flags])


def randomize_adapters(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def completions(warm_model_dir, tokenizer, seed_bench_root):
    """8 sampled completions (2 prompts x 4) of the warm model, most with an answer span."""
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(warm_model_dir, **SMALL)
    prompts = encoding.collate_prompts([encoding.encode_prompt(s, tokenizer, budget) for s in samples[:2]], tokenizer)
    model = models.load_model(warm_model_dir, "sdpa").eval()
    torch.manual_seed(0)
    return rollout.generate(model, prompts, tokenizer, 4, rollout.sampling_config(tokenizer, max_new_tokens=20))


def scores(model, completions):
    with torch.no_grad():
        return rollout.completion_logprobs(model, completions)


def test_adapters_go_on_the_language_model_only_and_everything_else_is_frozen(tiny_model_dir):
    model = models.load_policy(lora_cfg(tiny_model_dir))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 2 * 7 and all(".language_model.layers." in n for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_parameters(model)) and len(trainable) == 2 * 7 * 2
    with_vision = models.load_policy(lora_cfg(tiny_model_dir, "--lora-vision"))
    vision = [n for n, m in with_vision.named_modules() if isinstance(m, LoraLayer) and ".visual.blocks." in n]
    assert len(vision) == 2 * 5  # qkv, proj, gate/up/down per block; the merger stays frozen


def test_zero_initialised_adapters_compute_the_base(warm_model_dir, completions):
    base = models.load_model(warm_model_dir, "sdpa").eval()
    policy = models.load_policy(lora_cfg(warm_model_dir)).eval()
    torch.testing.assert_close(scores(policy, completions), scores(base, completions), rtol=0, atol=0)
    randomize_adapters(policy, 0)  # the comparison can fail: adapters that are not zero change it
    assert not torch.allclose(scores(policy, completions), scores(base, completions))


def test_adapter_ema_matches_its_closed_form_after_k_updates(tiny_model_dir):
    """ema_k = d^k ema_0 + (1 - d^k) theta for a policy held at theta; fp32, adapters only."""
    policy = models.load_policy(lora_cfg(tiny_model_dir))
    randomize_adapters(policy, 1)
    ref = lora.Reference(policy, lora.AdapterEMA(policy))
    start = {n: t.clone() for n, t in ref.ema.tensors.items()}
    randomize_adapters(policy, 2)
    theta = {n: p.detach().clone() for n, p in lora.adapter_parameters(policy).items()}
    d, k = 0.9, 5
    for _ in range(k):
        reference.ema_update(ref, policy, d)
    assert set(ref.ema.tensors) == set(theta) and all(t.dtype == torch.float32 for t in ref.ema.tensors.values())
    for n in theta:
        torch.testing.assert_close(ref.ema.tensors[n], d ** k * start[n] + (1 - d ** k) * theta[n])
        assert not torch.allclose(ref.ema.tensors[n], theta[n])


def test_care_reference_scores_equal_an_explicitly_merged_model(warm_model_dir, tokenizer, completions):
    """The swap puts the EMA adapters over the frozen base: it scores answers as the base with
    the EMA adapters merged in by peft does, and leaves the policy's own adapters as they were."""
    policy = models.load_policy(lora_cfg(warm_model_dir)).eval()
    randomize_adapters(policy, 3)
    ref = lora.Reference(policy, lora.AdapterEMA(policy))
    randomize_adapters(policy, 4)  # the policy has moved away from its EMA
    before = {n: p.detach().clone() for n, p in lora.adapter_parameters(policy).items()}
    through_swap, has_span = reference.answer_logprob(ref, completions, tokenizer)
    merged = copy.deepcopy(policy)
    with torch.no_grad():
        for n, p in lora.adapter_parameters(merged).items():
            p.copy_(ref.ema.tensors[n])
    for m in merged.modules():
        if isinstance(m, LoraLayer):
            m.merge()  # peft's own merge: W + scaling B A, then the forward uses W alone
    explicit, _ = reference.answer_logprob(merged, completions, tokenizer)
    assert has_span.sum() >= 4
    torch.testing.assert_close(through_swap, explicit, rtol=1e-5, atol=1e-5, equal_nan=True)
    own, _ = reference.answer_logprob(policy, completions, tokenizer)
    assert not torch.allclose(own[has_span], through_swap[has_span])
    for n, p in lora.adapter_parameters(policy).items():
        assert torch.equal(p, before[n]), n
    assert policy.training is False


@pytest.mark.parametrize("algo", ["care", "grpo"])
def test_the_reference_scores_without_dropout_while_the_policy_trains(warm_model_dir, tokenizer, completions, algo):
    """With --lora-dropout 0.5 and the policy in train mode, as during a step, the reference
    (the EMA adapters, or the base) scores in eval mode: the same numbers every call, those of
    the policy put in eval mode by hand, and the policy is left training."""
    policy = models.load_policy(lora_cfg(warm_model_dir, "--lora-dropout", "0.5", "--algo", algo))
    randomize_adapters(policy, 3)
    ref = lora.make_reference(lora_cfg(warm_model_dir, "--lora-dropout", "0.5", "--algo", algo), policy)
    policy.train()
    first, has_span = reference.answer_logprob(ref, completions, tokenizer)
    second, _ = reference.answer_logprob(ref, completions, tokenizer)
    assert policy.training and has_span.sum() >= 4
    policy.eval()
    by_hand, _ = reference.answer_logprob(ref, completions, tokenizer)
    torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(first, by_hand, rtol=0, atol=0, equal_nan=True)


def test_grpo_reference_is_the_base_with_adapters_disabled(warm_model_dir, completions):
    base = models.load_model(warm_model_dir, "sdpa").eval()
    policy = models.load_policy(lora_cfg(warm_model_dir, "--algo", "grpo")).train()
    randomize_adapters(policy, 5)
    ref = lora.make_reference(lora_cfg(warm_model_dir, "--algo", "grpo"), policy)
    torch.testing.assert_close(scores(ref, completions), scores(base, completions), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(scores(policy.eval(), completions), scores(base, completions))
    assert all(p.requires_grad for p in lora.adapter_parameters(policy).values())  # trainable again
    assert lora.make_reference(lora_cfg(warm_model_dir, "--algo", "grpo", "--beta", "0"), policy) is None


# --- runs -----------------------------------------------------------------------------------


def run(model_dir, root, out, *extra):
    return train.train(config.parse_config(train_argv(model_dir, root, out, "--lora-rank", "4", *extra)))


# Seed 2: each of the three steps has a reward spread, so each moves the adapters and their EMA
# (seed 0's third has none, and a resume that got the adapters wrong would not show there).
LORA_CARE = ("--algo", "care", "--max-steps", "3", "--save-every", "1", "--seed", "2")


@pytest.fixture(scope="module")
def lora_care_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    """Three LoRA CARE steps in one process, a checkpoint after each."""
    out = tmp_path_factory.mktemp("lora-care")
    run(warm_model_dir, seed_bench_root, out, *LORA_CARE)
    return out


def test_a_lora_care_run_trains_the_adapters_and_checkpoints_them_small(lora_care_run, warm_model_dir):
    ckpt = os.path.join(lora_care_run, "checkpoint-000003")
    policy, ema = read_state(ckpt, "policy"), read_state(ckpt, "reference")
    assert policy and set(policy) == set(ema) and all("lora_" in k for k in policy)
    base = load_file(os.path.join(warm_model_dir, "model.safetensors"))
    state_bytes = sum(os.path.getsize(os.path.join(ckpt, "state", f)) for f in os.listdir(os.path.join(ckpt, "state")))
    assert state_bytes < sum(t.numel() * t.element_size() for t in base.values()) / 2
    # The adapters moved (B is no longer zero), and the EMA moved part of the way behind them.
    b = [k for k in policy if "lora_B" in k]
    assert all(policy[k].abs().max() > 0 for k in b)
    assert all(0 < ema[k].abs().max() < policy[k].abs().max() for k in b)
    log = read_log(lora_care_run)
    assert [r["step"] for r in log] == [1, 2, 3] and any(r["reward_bonus"] > 0 for r in log)


def test_the_merged_export_is_the_base_plus_the_adapters(lora_care_run, warm_model_dir):
    """checkpoint/policy loads as evaluate.py loads a model (models.load_model: every weight
    found) and equals peft's own merge of checkpoint/adapter into the base; only adapted
    layers differ from the base."""
    ckpt = os.path.join(lora_care_run, "checkpoint-000003")
    exported = models.load_model(os.path.join(ckpt, "policy"), "sdpa")
    peft_merged = PeftModel.from_pretrained(models.load_model(warm_model_dir, "sdpa"),
                                            os.path.join(ckpt, "adapter")).merge_and_unload()
    base = models.load_model(warm_model_dir, "sdpa").state_dict()
    mine, theirs = exported.state_dict(), peft_merged.state_dict()
    assert set(mine) == set(theirs) == set(base)
    changed = {k for k in mine if not torch.equal(mine[k], base[k])}
    assert changed and all(".language_model.layers." in k and k.endswith("proj.weight") for k in changed)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_a_lora_run_resumes_exactly(lora_care_run, warm_model_dir, seed_bench_root, tmp_path):
    """2 steps, a checkpoint, then step 3 from it: the same log row, adapters and EMA as the
    uninterrupted 3 steps."""
    shutil.copytree(os.path.join(lora_care_run, "checkpoint-000002"), tmp_path / "checkpoint-000002")
    shutil.copy(os.path.join(lora_care_run, "log.jsonl"), tmp_path / "log.jsonl")
    run(warm_model_dir, seed_bench_root, tmp_path, *LORA_CARE, "--resume", "auto")
    resumed, full = read_log(tmp_path), read_log(lora_care_run)
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[2]["grad_norm"] > 0
    for key in ("loss", "reward", "reward_bonus", "ref_conf", "grad_norm", "lr", "completion_len"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-7), key
    for part in ("policy", "reference"):
        a = read_state(os.path.join(lora_care_run, "checkpoint-000003"), part)
        b = read_state(os.path.join(tmp_path, "checkpoint-000003"), part)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_lora_grpo_run_has_a_kl_to_the_base(warm_model_dir, seed_bench_root, tmp_path):
    run(warm_model_dir, seed_bench_root, tmp_path, "--algo", "grpo", "--max-steps", "3", "--save-every", "3")
    log = read_log(tmp_path)
    assert log[0]["kl"] == 0 and log[1]["grad_norm"] > 0  # the policy starts as the base, step 2 moves it
    assert log[2]["kl"] > 0
    ckpt = tmp_path / "checkpoint-000003"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and (ckpt / "policy").exists()
    with pytest.raises(KeyError):
        read_state(str(ckpt), "reference")  # GRPO's reference is the base: nothing to save


# --- two processes (FSDP2 over gloo): the frozen base and the adapters sharded ---------------


def test_two_processes_train_resume_and_match_one(lora_care_run, warm_model_dir, seed_bench_root, tmp_path):
    """The 1-process run's 3 steps on 2 processes (same global batch): the same rewards, gradient
    norms, adapters and EMA; then step 3 again from the 2-process checkpoint of step 2."""
    from test_distributed import argv_per_process, torchrun
    out = tmp_path / "two"
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, out, "--lora-rank", "4", *LORA_CARE))
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-000002", resumed / "checkpoint-000002")
    shutil.copy(out / "log.jsonl", resumed / "log.jsonl")
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, resumed, "--lora-rank", "4", *LORA_CARE,
                                           "--resume", "auto"))
    one = read_log(lora_care_run)
    for other in (out, resumed):
        log = read_log(other)
        assert [r["step"] for r in log] == [1, 2, 3]
        for a, b in zip(one, log):
            for key in ("reward", "reward_bonus", "ref_conf", "grad_norm", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
        for part in ("policy", "reference"):
            a = read_state(os.path.join(lora_care_run, "checkpoint-000003"), part)
            b = read_state(str(other / "checkpoint-000003"), part)
            assert set(a) == set(b)
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    exported = load_file(str(out / "checkpoint-000003" / "policy" / "model.safetensors"))
    single = load_file(os.path.join(lora_care_run, "checkpoint-000003", "policy", "model.safetensors"))
    for k in single:
        torch.testing.assert_close(exported[k], single[k], rtol=1e-4, atol=1e-5)


def test_a_two_process_lora_grpo_run(warm_model_dir, seed_bench_root, tmp_path):
    from test_distributed import argv_per_process, torchrun
    torchrun("train.py", *argv_per_process(warm_model_dir, seed_bench_root, tmp_path, "--lora-rank", "4",
                                           "--algo", "grpo", "--max-steps", "3", "--save-every", "3"))
    log = read_log(tmp_path)
    assert log[0]["kl"] == 0 and log[2]["kl"] > 0
    assert (tmp_path / "checkpoint-000003" / "adapter" / "adapter_config.json").exists()


def test_sft_with_lora_trains_the_adapters_and_resumes(warm_model_dir, seed_bench_root, tmp_path):
    from test_sft import run as run_sft
    run_sft(warm_model_dir, seed_bench_root, tmp_path / "full", "--lora-rank", "4", "--max-steps", "2",
            "--save-every", "1")
    ckpt = tmp_path / "full" / "checkpoint-000002"
    policy = read_state(str(ckpt), "policy")
    assert policy and all("lora_" in k for k in policy) and any(policy[k].abs().max() > 0 for k in policy
                                                                if "lora_B" in k)
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    models.load_model(str(ckpt / "policy"), "sdpa")  # the merged export loads as evaluate.py loads it
    shutil.copytree(tmp_path / "full" / "checkpoint-000001", tmp_path / "resumed" / "checkpoint-000001")
    shutil.copy(tmp_path / "full" / "log.jsonl", tmp_path / "resumed" / "log.jsonl")
    run_sft(warm_model_dir, seed_bench_root, tmp_path / "resumed", "--lora-rank", "4", "--max-steps", "2",
            "--save-every", "1", "--resume", "auto")
    assert read_log(tmp_path / "resumed")[1]["loss"] == pytest.approx(read_log(tmp_path / "full")[1]["loss"], rel=1e-5)
    resumed = read_state(str(tmp_path / "resumed" / "checkpoint-000002"), "policy")
    for k in policy:
        torch.testing.assert_close(resumed[k], policy[k], rtol=1e-5, atol=1e-6)


def test_lora_runs_with_dropout_resume_exactly(lora_care_run, warm_model_dir, seed_bench_root, tmp_path):
    """Adapter dropout draws from torch's RNG in every training forward: train.py and sft.py seed
    it from (seed, step, process) at each step, so a resumed run draws the masks the
    uninterrupted one drew. The dropout matters: without it the runs differ."""
    from test_sft import run as run_sft
    for program, extra in ((run, ("--algo", "care")), (run_sft, ())):
        flags = (*extra, "--lora-rank", "4", "--lora-dropout", "0.5", "--max-steps", "3", "--save-every", "1")
        full, resumed = tmp_path / program.__module__ / "full", tmp_path / program.__module__ / "resumed"
        program(warm_model_dir, seed_bench_root, full, *flags)
        shutil.copytree(full / "checkpoint-000002", resumed / "checkpoint-000002")
        shutil.copy(full / "log.jsonl", resumed / "log.jsonl")
        program(warm_model_dir, seed_bench_root, resumed, *flags, "--resume", "auto")
        a, b = read_log(full), read_log(resumed)
        assert [r["step"] for r in b] == [1, 2, 3]
        for key in ("loss", "grad_norm"):
            assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-9), (program.__module__, key)
        x = read_state(str(full / "checkpoint-000003"), "policy")
        y = read_state(str(resumed / "checkpoint-000003"), "policy")
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)
    no_dropout = read_log(lora_care_run)  # the same CARE run with --lora-dropout 0
    assert no_dropout[1]["grad_norm"] != pytest.approx(read_log(tmp_path / "test_lora" / "full")[1]["grad_norm"],
                                                       rel=1e-3)
