"""The wires between the formulas in train.py's step: each setting reaches the formula that
uses it, the reference (not the policy) scores the answers, the advantages the loss uses are
those of accuracy + format + bonus, and the reference moves every --ema-every steps by the
EMA's closed form. care.py's formulas themselves are pinned in test_care.py."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import read_state, train_argv

import care
import config
import data
import encoding
import fsdp
import reference
import rollout
import metrics
import models
import train

MC = "multiple choice"


def fake_rollout(texts, g):
    return SimpleNamespace(texts=texts, num_generations=g)


def spy(monkeypatch, module, name, calls, result=None):
    """Replace module.name by a function that records its arguments and returns result (or,
    without result, what the real function returns)."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs) if result is None else result(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


# --- score_rollout: settings, samples and the reference reach the formulas -------------------

ANSWERS = [  # prompt 0 (solution A) and prompt 1 (solution B), G = 4 each
    "<think>x</think><answer>A</answer>", "<think>y</think><answer>A</answer>", "<answer>A</answer>",
    "<think>z</think><answer>C</answer>",
    "<think>x</think><answer>B</answer>", "<think>y</think><answer>B</answer>", "<think>w</think><answer>B</answer>",
    "no answer",
]
SAMPLES = [data.Sample("s0", MC, "Q0", "A"), data.Sample("s1", MC, "Q1", "B")]
# The reference's mean answer log-probs: chosen so that the margin, the cap and the coefficient
# each change who gets a bonus or how much (checked below, so the test cannot go blind).
LOGP = torch.log(torch.tensor([0.99, 0.8, 0.42, 0.3, 0.97, 0.6, 0.45, 0.5]))
HAS_SPAN = torch.tensor([True] * 7 + [False])


def score(monkeypatch, *flags):
    cfg = config.parse_config(["--algo", "care", "--num-generations", "4", *flags])
    ref = torch.nn.Linear(1, 1)  # stands in for the reference model: only its identity matters
    calls = []
    spy(monkeypatch, reference, "answer_logprob", calls, result=lambda *a, **k: (LOGP, HAS_SPAN))
    scores = train.score_rollout(cfg, fake_rollout(ANSWERS, 4), SAMPLES, ref, tokenizer=None)
    return cfg, scores, calls, ref


def expected(margin, coef, cap):
    acc = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]])
    fmt = torch.tensor([[1.0, 1, 0, 1], [1, 1, 1, 0]])
    scores = care.care_rewards(acc, fmt, LOGP.view(2, 4), HAS_SPAN.view(2, 4), margin=margin, bonus_coef=coef,
                              conf_cap=cap)
    return acc, fmt, scores


def test_score_rollout_passes_every_care_setting(monkeypatch):
    cfg, scores, _, _ = score(monkeypatch, "--consistency-margin", "0.3", "--bonus-coef", "0.7", "--conf-cap", "0.9")
    acc, fmt, want = expected(0.3, 0.7, 0.9)
    torch.testing.assert_close(scores["acc"], acc)   # each prompt scored against its own solution
    torch.testing.assert_close(scores["fmt"], fmt)
    torch.testing.assert_close(scores["bonus"], want["bonus"])
    torch.testing.assert_close(scores["ref_conf"], want["ref_conf"])
    torch.testing.assert_close(scores["reward"], acc + fmt + want["bonus"])
    # Each setting matters for these inputs: a wire cut to its default would change the bonus.
    for default in (expected(0.0, 0.7, 0.9), expected(0.3, 0.5, 0.9), expected(0.3, 0.7, 0.95)):
        assert not torch.equal(default[2]["bonus"], want["bonus"])


def test_advantages_are_those_of_the_whole_reward(monkeypatch):
    _, scores, _, _ = score(monkeypatch, "--consistency-margin", "0.3")
    acc, fmt, want = expected(0.3, 0.5, 0.95)
    assert want["bonus"].sum() > 0
    torch.testing.assert_close(scores["advantages"], care.group_advantages(acc + fmt + want["bonus"]))
    assert not torch.allclose(scores["advantages"], care.group_advantages(acc + fmt))


def test_the_reference_scores_the_answers(monkeypatch):
    _, _, calls, ref = score(monkeypatch)
    assert len(calls) == 1 and calls[0][0][0] is ref


def test_grpo_has_no_bonus_and_asks_no_reference(monkeypatch):
    cfg = config.parse_config(["--algo", "grpo", "--num-generations", "4"])
    calls = []
    spy(monkeypatch, reference, "answer_logprob", calls)
    scores = train.score_rollout(cfg, fake_rollout(ANSWERS, 4), SAMPLES, None, tokenizer=None)
    acc, fmt, _ = expected(0.0, 0.5, 0.95)
    assert not calls
    torch.testing.assert_close(scores["reward"], acc + fmt)
    torch.testing.assert_close(scores["advantages"], care.group_advantages(acc + fmt))
    assert not scores["bonus"].any() and not scores["has_span"].any()


def test_the_format_weight_reaches_the_reward_not_the_logged_format(monkeypatch):
    """--format-weight w: r = acc + w x fmt (+ bonus) for both algorithms; the logged format is
    the unweighted score, so the format rate stays visible with the reward off."""
    _, scores, _, _ = score(monkeypatch, "--format-weight", "0.25")
    acc, fmt, want = expected(0.0, 0.5, 0.95)
    care_want = care.care_rewards(acc, 0.25 * fmt, LOGP.view(2, 4), HAS_SPAN.view(2, 4))
    torch.testing.assert_close(scores["reward"], acc + 0.25 * fmt + care_want["bonus"])
    torch.testing.assert_close(scores["fmt"], fmt)
    cfg = config.parse_config(["--algo", "grpo", "--num-generations", "4", "--format-weight", "0"])
    grpo = train.score_rollout(cfg, fake_rollout(ANSWERS, 4), SAMPLES, None, tokenizer=None)
    torch.testing.assert_close(grpo["reward"], acc)
    torch.testing.assert_close(grpo["fmt"], fmt)
    assert fmt.sum() > 0


def test_the_seed_bench_r1_preset_sets_its_recipe_and_explicit_flags_win():
    cfg = config.parse_config(["--preset", "seed-bench-r1"])
    assert (cfg.model, cfg.algo, cfg.beta, cfg.format_weight, cfg.max_frames, cfg.max_prompt_length, cfg.lr,
            cfg.epochs) == ("Qwen/Qwen2-VL-7B-Instruct", "grpo", 0.1, 0.0, 16, 8192, 1e-6, 1)
    assert cfg.ema_decay == 1.0  # GRPO: a frozen reference
    mine = config.parse_config(["--preset", "seed-bench-r1", "--beta", "0.05", "--lr", "2e-6", "--model", "m"])
    assert (mine.beta, mine.lr, mine.model, mine.format_weight) == (0.05, 2e-6, "m", 0.0)
    assert set(config.PRESETS["seed-bench-r1"]) <= {f.name for f in dataclasses.fields(config.Config)}
    with pytest.raises(SystemExit):
        config.parse_config(["--preset", "no-such-recipe"])
    # SEED-Bench-R1's reward, prompt, visual pipeline, KL clamp, sampling and trainer defaults
    assert (cfg.reward_rules, cfg.prompt_template, cfg.kl_clamp, cfg.resize_to, cfg.resize_rule, cfg.frame_rounding,
            cfg.top_p, cfg.top_k, cfg.max_completion_length, cfg.lr_schedule, cfg.weight_decay, cfg.max_grad_norm) == \
        ("seed-bench-r1", "seed-bench-r1", 11.0, 256, "qwen-vl-utils", "floor", 1.0, 50, 256, "linear", 0.0, 1.0)
    help_text = config.build_parser(doc="").format_help()
    assert "--reward-rules seed-bench-r1" in " ".join(help_text.split())   # --help says what the preset sets


def test_the_seed_bench_r1_preset_reaches_every_piece(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """A 1-step run under --preset seed-bench-r1 (the tiny model and data, the preset's
    pipeline): its rules score, its layout and fixed 252 x 252 visuals encode, its clamp reaches
    the KL term, and the linear schedule the optimizer."""
    budgets, scored, losses, built = [], [], [], []
    spy(monkeypatch, encoding, "encode_prompt", budgets)
    spy(monkeypatch, train.rewards, "score", scored)
    spy(monkeypatch, care, "policy_loss", losses)
    real_build = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda *a: built.append(real_build(*a)) or built[-1])
    argv = ["--preset", "seed-bench-r1", "--model", warm_model_dir, "--data",
            f"{seed_bench_root}/annotations/training_6k.jsonl", "--data-root", seed_bench_root,
            "--output-dir", str(tmp_path), "--num-generations", "2", "--max-completion-length", "4",
            "--max-steps", "2", "--max-frames", "4", "--lr", "1e-3"]
    train.train(config.parse_config(argv))
    (args, _), *_ = budgets
    sample, _, budget, template = args
    assert template.name == "seed-bench-r1" and budget.resize_to == 256
    enc = encoding.encode_prompt(sample, args[1], budget, template)
    grids = [enc[k][0, 1:].tolist() for k in ("image_grid_thw", "video_grid_thw") if k in enc]
    assert grids and all(g == [18, 18] for g in grids)   # 252 / 14 patches a side
    assert scored and all((a[3] if len(a) > 3 else k.get("rules", "ours")) == "seed-bench-r1" for a, k in scored)
    assert losses and all(k["kl_clamp"] == 11.0 and k["beta"] == 0.1 for _, k in losses)
    from transformers import get_linear_schedule_with_warmup
    (optimizer, scheduler), = built
    # Over 2 steps the two schedules agree at whole steps; half way through step 1 they do not.
    probe = get_linear_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 0, 2)
    assert scheduler.lr_lambdas[0](0.5) == probe.lr_lambdas[0](0.5) == 0.75


# --- a real run: what the loss used, which model scored, when the reference moved -------------

@pytest.fixture(scope="module")
def spied_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    """Three CARE steps, EMA every 2 steps, a margin, checkpoints after each step, with spies on
    the policy loss (the advantages it gets), the answer scorer (which model) and the models."""
    out = tmp_path_factory.mktemp("spied")
    mp = pytest.MonkeyPatch()
    calls = {"loss": [], "scorer": [], "policy": [], "reference": [], "ema": []}
    spy(mp, care, "policy_loss", calls["loss"])
    spy(mp, reference, "answer_logprob", calls["scorer"])
    spy(mp, reference, "ema_update", calls["ema"])
    real_policy, real_ref = models.load_policy, fsdp.prepare_reference
    mp.setattr(models, "load_policy", lambda cfg: calls["policy"].append(real_policy(cfg)) or calls["policy"][-1])
    mp.setattr(train.fsdp, "prepare_reference",
               lambda acc, ref: calls["reference"].append(real_ref(acc, ref)) or calls["reference"][-1])
    try:
        train.train(config.parse_config(train_argv(
            warm_model_dir, seed_bench_root, out, "--algo", "care", "--max-steps", "3", "--save-every", "1",
            "--ema-every", "2", "--ema-decay", "0.9", "--consistency-margin", "0.05", "--log-completions")))
    finally:
        mp.undo()
    rows = [json.loads(line) for line in open(out / "completions.jsonl")]
    return out, calls, rows


def test_the_loss_gets_the_advantages_of_accuracy_format_and_bonus(spied_run):
    """Recompute every step's advantages from the logged accuracy, format and bonus, and the
    bonus from the logged accuracy and reference confidence under the run's margin."""
    _, calls, rows = spied_run
    assert len(calls["loss"]) == 3
    for step, (args, kwargs) in enumerate(calls["loss"], 1):
        mine = [r for r in rows if r["step"] == step]
        field = lambda k: torch.tensor([float(r[k]) for r in mine]).view(-1, 4)
        acc, fmt, bonus = field("accuracy"), field("format"), field("bonus")
        torch.testing.assert_close(args[1].cpu().view(-1, 4), care.group_advantages(acc + fmt + bonus))
        torch.testing.assert_close(args[1].cpu().view(-1, 4), field("advantage"))  # what the log says
        has_span = torch.tensor([r["ref_conf"] is not None for r in mine]).view(-1, 4)
        p = torch.tensor([r["ref_conf"] or 0.0 for r in mine]).view(-1, 4)
        recomputed, _ = care.consistency_bonus(acc, p, has_span, margin=0.05, bonus_coef=0.5)
        torch.testing.assert_close(bonus, recomputed)
    assert any(r["bonus"] > 0 for r in rows), "no bonus in the run: the check above would be blind to it"


def test_the_reference_not_the_policy_scores_in_a_run(spied_run):
    _, calls, _ = spied_run
    (policy,), (ref,) = calls["policy"], calls["reference"]
    assert len(calls["scorer"]) == 3 and all(args[0] is ref for args, _ in calls["scorer"])
    assert ref is not policy


def test_the_reference_moves_every_ema_every_steps_by_the_closed_form(spied_run, warm_model_dir):
    """--ema-every 2, decay 0.9: the reference is the start after step 1, decay * start +
    (1 - decay) * policy_2 after step 2, and unchanged after step 3."""
    out, calls, _ = spied_run
    assert len(calls["ema"]) == 1
    refs = [read_state(out / f"checkpoint-00000{k}", "reference") for k in (1, 2, 3)]
    policy_2 = read_state(out / "checkpoint-000002", "policy")
    start = models.load_model(warm_model_dir).state_dict()
    moved = 0
    for name in refs[0]:
        torch.testing.assert_close(refs[0][name], start[name], rtol=0, atol=0)
        torch.testing.assert_close(refs[1][name], 0.9 * start[name] + 0.1 * policy_2[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(refs[2][name], refs[1][name], rtol=0, atol=0)
        moved += (refs[1][name] - start[name]).abs().sum()
    assert moved > 0


def test_reproduce_official_freezes_the_reference_and_reaches_sampling_and_video(
        warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """--reproduce-official: frozen reference, top-k 50, 1.0 s per temporal patch, frames
    rounded down, the public frame bounds and resize rule, prompt layout, reward rules and answer
    span; each reaches the piece that uses it. (The small test budget's pixel flags are left to
    the switch here, so the public per-frame bounds apply.)"""
    sampling, budgets, ema, scored, spans = [], [], [], [], []
    spy(monkeypatch, rollout, "sampling_config", sampling)
    spy(monkeypatch, encoding, "encode_prompt", budgets)
    spy(monkeypatch, reference, "ema_update", ema)
    spy(monkeypatch, train.rewards, "score", scored)
    spy(monkeypatch, reference, "answer_logprob", spans)
    argv = [a for a in train_argv(warm_model_dir, seed_bench_root, tmp_path, "--algo", "care", "--max-steps", "2",
                                  "--reproduce-official") if not a.startswith("--video-")]
    train.train(config.parse_config(argv))
    assert sampling[0][0][4] == 50  # top_k
    budget = budgets[0][0][2]
    assert budget.second_per_grid == 1.0 and budget.frame_rounding == "floor"
    assert (budget.video_min_pixels, budget.video_max_pixels, budget.resize_rule) == (100352, 105369, "qwen-vl-utils")
    assert budgets[0][0][3].name == "official"                     # the prompt layout
    arg = lambda args, kwargs, i, name, default: args[i] if len(args) > i else kwargs.get(name, default)
    assert scored and all(arg(a, k, 3, "rules", "ours") == "official" for a, k in scored)       # the reward rules
    assert spans and all(arg(a, k, 4, "span", "tags") == "official" for a, k in spans)          # the answer span
    assert [args[2] for args, _ in ema] == [1.0, 1.0]  # called (ema every step) with a frozen decay
    start = models.load_model(warm_model_dir).state_dict()
    ref = read_state(tmp_path / "checkpoint-000002", "reference")
    assert all(torch.equal(ref[k], start[k]) for k in ref)
    saved = json.load(open(os.path.join(tmp_path, "checkpoint-000002", "config.json")))
    assert (saved["ema_decay"], saved["top_k"], saved["second_per_grid"], saved["frame_rounding"]) == \
        (1.0, 50, 1.0, "floor")


# --- a GRPO run with every loss, sampling and optimizer setting away from its default ---------

GRPO_FLAGS = ["--algo", "grpo", "--max-steps", "2", "--num-iterations", "2", "--epsilon", "0.3", "--beta", "0.07",
              "--temperature", "0.9", "--top-p", "0.8", "--repetition-penalty", "1.1", "--max-grad-norm", "0.1",
              "--warmup-steps", "1", "--weight-decay", "0.05", "--adam-beta1", "0.8", "--seed", "5"]
# Seed 5: step 1 has a reward spread, so its gradient (0.36 before clipping) is clipped to 0.1.


@pytest.fixture(scope="module")
def grpo_run(warm_model_dir, seed_bench_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-spied")
    mp = pytest.MonkeyPatch()
    calls = {"loss": [], "generate": [], "clip": [], "ema": [], "optimizer": [], "stepped_norm": []}
    spy(mp, care, "policy_loss", calls["loss"])
    spy(mp, rollout, "generate", calls["generate"])
    spy(mp, torch.nn.utils, "clip_grad_norm_", calls["clip"])
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):  # the gradient norm the update is made from
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        calls["stepped_norm"].append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return real_step(self, *a, **k)
    mp.setattr(torch.optim.AdamW, "step", step)
    spy(mp, reference, "ema_update", calls["ema"])
    real_build = train.build_optimizer
    mp.setattr(train, "build_optimizer", lambda *a: calls["optimizer"].append(real_build(*a)) or calls["optimizer"][-1])
    try:
        cfg = config.parse_config(train_argv(warm_model_dir, seed_bench_root, out, *GRPO_FLAGS))
        train.train(cfg)
    finally:
        mp.undo()
    return cfg, calls, out


def test_grpo_loss_gets_its_settings_the_frozen_reference_and_the_rollout_logprobs(grpo_run):
    cfg, calls, _ = grpo_run
    loss_calls = calls["loss"]
    assert len(loss_calls) == 4  # 2 steps x 2 iterations
    for k, (args, kwargs) in enumerate(loss_calls):
        assert kwargs["epsilon"] == 0.3 and kwargs["beta"] == 0.07
        assert kwargs["ref_logp"] is not None and kwargs["old_logp"] is not None
        if k % 2 == 0:  # first iteration: the old log-probs are the current ones
            torch.testing.assert_close(kwargs["old_logp"], args[0].detach(), rtol=1e-5, atol=1e-5)
        else:  # second: still the rollout's, though the policy may have moved (the ratio is not 1)
            torch.testing.assert_close(kwargs["old_logp"], loss_calls[k - 1][0][0].detach(), rtol=0, atol=0)
    moved = [(kw["old_logp"] - args[0].detach()).abs().max().item() for args, kw in loss_calls[1::2]]
    assert max(moved) > 1e-4   # some second iteration's policy differs from the rollout's
    # Step 1: the reference is the starting policy; step 2: the policy has moved away from it.
    torch.testing.assert_close(loss_calls[0][1]["ref_logp"], loss_calls[0][0][0].detach(), rtol=1e-5, atol=1e-5)
    assert (loss_calls[2][1]["ref_logp"] - loss_calls[2][0][0].detach()).abs().max() > 1e-5
    assert all(args[2] == 1.0 for args, _ in calls["ema"])  # GRPO never moves its reference


def test_sampling_gets_its_settings_and_one_seed_per_group(grpo_run, seed_bench_root):
    cfg, calls, out = grpo_run
    samples, _ = data.load_samples(cfg.data, cfg.data_root, seed=cfg.seed)
    for step, (args, _) in enumerate(calls["generate"]):
        gen_config, seeds = args[4], args[5]
        assert (gen_config.temperature, gen_config.top_p, gen_config.top_k, gen_config.repetition_penalty,
                gen_config.max_new_tokens) == (0.9, 0.8, 0, 1.1, 20)
        assert args[3] == 4  # G
        assert gen_config.eos_token_id == ends_of_sequence(cfg.model)   # where the checkpoint stops
        indices = train.shard_order(len(samples), 0, cfg.seed, 0, 1, 2)[step]
        assert seeds == [train.rollout_seed(cfg.seed, step, i) for i in indices]
    assert calls["generate"][0][0][5] != calls["generate"][1][0][5]


def ends_of_sequence(model_dir):
    """<|im_end|> and <|endoftext|>: the tiny checkpoint's generation_config lists both, as Qwen's do."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_the_judge_and_the_analysis_stop_where_the_checkpoint_stops(warm_model_dir, seed_bench_root, monkeypatch):
    """judge.judge_replies and analyze.analyse_checkpoint generate with every end-of-sequence id
    of the checkpoint's generation_config (rollout.stop_ids), not <|im_end|> alone."""
    from transformers import AutoTokenizer

    import analyze
    import judge
    calls = []
    spy(monkeypatch, rollout, "generate", calls)
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    judge.judge_replies(models.load_model(warm_model_dir, "sdpa").eval(), tokenizer, ["Is it red?"], 2)
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = dict(max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56, video_min_pixels=784,
                  image_min_pixels=784)
    analyze.analyse_checkpoint(warm_model_dir, samples[:1], budget, 2, 1)
    assert len(calls) == 2
    for args, kwargs in calls:
        assert sorted(args[4].eos_token_id) == ends_of_sequence(warm_model_dir)


def test_a_template_file_reaches_training_evaluation_and_the_analysis(warm_model_dir, seed_bench_root, tmp_path,
                                                                      monkeypatch):
    """--prompt-template FILE.json: every prompt train.py, evaluate.py and analyze.py encode is
    rendered from the file's text, and evaluate.py and analyze.py record that text."""
    import analyze
    import evaluate
    template = tmp_path / "mine.json"
    doc = {"template": {"multiple choice": "{question} zebra\n{options}{answer_format}"},
           "answer_format": {"multiple choice": "One letter."}}
    template.write_text(json.dumps(doc))
    seen = []
    real = encoding.encode_prompt
    monkeypatch.setattr(encoding, "encode_prompt", lambda *a: seen.append(a) or real(*a))
    budget = [f"--{k.replace('_', '-')}={v}" for k, v in
              dict(max_frames=4, video_max_pixels=3136, image_max_pixels=3136, video_min_pixels=784,
                   image_min_pixels=784).items()]
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, tmp_path / "train", "--max-steps", "1",
                                               "--prompt-template", str(template))))
    n_train = len(seen)
    evaluate.main(["--model", warm_model_dir, "--data", f"{seed_bench_root}/annotations/validation_L1.jsonl",
                   "--data-root", seed_bench_root, "--output-dir", str(tmp_path / "eval"), "--limit", "2",
                   "--judge", "none", "--max-new-tokens", "4", "--prompt-template", str(template), *budget])
    n_eval = len(seen) - n_train
    report = analyze.main(["attention", "--models", warm_model_dir, "--data-root", seed_bench_root, "--data",
                           f"{seed_bench_root}/annotations/validation_L1.jsonl", "--limit", "1", "--max-new-tokens",
                           "2", "--output-dir", str(tmp_path / "attention"), "--prompt-template", str(template),
                           *budget])
    assert n_train == 2 and n_eval == 2 and len(seen) == 5
    for sample, _, _, used in seen:
        assert used.name == str(template) and used.text == doc["template"]
        assert used.render(sample).endswith("One letter.") and " zebra\n" in used.render(sample)
    recorded = json.load(open(tmp_path / "eval" / "eval_settings.json"))["settings"]["prompt_template"]
    assert recorded == {"file": str(template), "text": doc["template"], "answer_format": doc["answer_format"]}
    assert report["settings"]["prompt_template"] == recorded


def test_the_optimizer_gets_its_settings(grpo_run):
    from transformers import get_cosine_schedule_with_warmup
    cfg, calls, out = grpo_run
    assert all(kwargs.get("max_norm", args[1] if len(args) > 1 else None) == 0.1 for args, kwargs in calls["clip"])
    assert len(calls["clip"]) == 4
    # Each update is made from the clipped gradient: its norm is at most 0.1, also where it was
    # larger before clipping (the logged norm, of each step's last update).
    from conftest import read_log
    logged = [r["grad_norm"] for r in read_log(out)]
    assert any(g > 0.1 for g in logged) and len(calls["stepped_norm"]) == 4
    assert all(n <= 0.1 * (1 + 1e-5) for n in calls["stepped_norm"])
    (optimizer, scheduler), = calls["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["betas"] == (0.8, 0.999)
    # 1 warmup update, then cosine over 2 steps x 2 iterations: the lr after each step.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_cosine_schedule_with_warmup(probe, 1, 4)
    expected = []
    for _ in range(2):
        sched.step(), sched.step()
        expected.append(sched.get_last_lr()[0])
    from conftest import read_log
    assert [r["lr"] for r in read_log(out)] == pytest.approx(expected)


def test_each_epoch_deals_every_sample_once_in_a_new_order(warm_model_dir, seed_bench_root, tmp_path, monkeypatch):
    """Every sample once per epoch, in a new order, and each time with a new sampling seed: a
    prompt does not get the same completions again the next epoch."""
    generated = []
    spy(monkeypatch, rollout, "generate", generated)
    train.train(config.parse_config(train_argv(warm_model_dir, seed_bench_root, tmp_path, "--algo", "grpo",
                                              "--beta", "0", "--epochs", "2", "--max-completion-length", "2",
                                              "--save-every", "100")))
    seeds = [seed for args, _ in generated for seed in args[5]]
    assert len(seeds) == 16 and len(set(seeds)) == 16   # 8 samples x 2 epochs, no seed twice
    from conftest import read_log
    log = read_log(tmp_path)
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    per_epoch = len(samples) // 2
    assert len(log) == 2 * per_epoch
    epochs = [[sid for row in log[e * per_epoch:(e + 1) * per_epoch] for sid in row["samples"][0]] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(s.sample_id for s in samples)
    assert epochs[0] != epochs[1]


def test_freeze_vision_freezes_the_vision_tower_only(tiny_model_dir):
    frozen = models.load_policy(config.parse_config(["--model", tiny_model_dir, "--freeze-vision"]))
    assert not any(p.requires_grad for p in frozen.model.visual.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if ".visual." not in f".{n}")
    trained = models.load_policy(config.parse_config(["--model", tiny_model_dir]))
    assert all(p.requires_grad for p in trained.parameters())


def test_zero_advantage_groups_counts_groups_with_one_reward():
    """A group whose G rewards are all equal has zero advantages: counted, the others not."""
    reward = torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    scores = {"reward": reward, "acc": reward, "fmt": reward, "bonus": torch.zeros(3, 4), "ref_conf": torch.zeros(3, 4),
             "has_span": torch.zeros(3, 4, dtype=torch.bool), "advantages": care.group_advantages(reward)}
    completions = SimpleNamespace(completion_mask=torch.ones(12, 5), truncated=torch.zeros(12, dtype=torch.bool))
    assert metrics.step_metrics(scores, completions, {})["zero_adv_groups"] == pytest.approx(2 / 3)


def test_logged_reference_confidence_is_over_answers_with_a_span():
    """ref_conf in the log: the mean over completions that have an answer span (the others have
    no confidence, 0 in the tensor), and NaN when none has."""
    reward = torch.zeros(1, 4)
    ref_conf = torch.tensor([[0.8, 0.0, 0.4, 0.0]])
    has_span = torch.tensor([[True, False, True, False]])
    scores = {"reward": reward, "acc": reward, "fmt": reward, "bonus": reward, "ref_conf": ref_conf,
              "has_span": has_span, "advantages": reward}
    completions = SimpleNamespace(completion_mask=torch.ones(4, 3), truncated=torch.zeros(4, dtype=torch.bool))
    assert metrics.step_metrics(scores, completions, {})["ref_conf"] == pytest.approx(0.6)
    scores["has_span"] = torch.zeros(1, 4, dtype=torch.bool)
    assert math.isnan(metrics.step_metrics(scores, completions, {})["ref_conf"])


def test_seed_bench_r1_rules_refuse_other_problem_types_before_a_step(tiny_model_dir, tmp_path):
    """Its first-letter rule would score a number by its first digit: a mixed Video-R1 file under
    --reward-rules seed-bench-r1 stops before any step, naming the types."""
    import tiny
    root = tiny.build_video_r1_eval(str(tmp_path / "data"), n=5)
    cfg = config.parse_config(["--model", tiny_model_dir, "--data", f"{root}/eval_tiny.json", "--data-root", root,
                               "--output-dir", str(tmp_path / "out"), "--reward-rules", "seed-bench-r1"])
    with pytest.raises(data.DataError, match="multiple choice only .* free-form, numerical"):
        train.train(cfg)
    assert not (tmp_path / "out" / "log.jsonl").exists()
