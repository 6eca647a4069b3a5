"""Sharding-sensitive pieces of fsdp.py and reference.py, run under torchrun with 2 CPU
processes (gloo) by tests/test_distributed.py. Models are sharded by the same accelerate path
train.py uses. Each check compares against the same computation on an unsharded copy of the
model; rank 0 writes {check: detail} to the JSON file named on the command line, and any failed
check raises (non-zero exit).

    torchrun --standalone --nproc_per_node 2 tests/fsdp_checks.py MODEL_DIR OUT.json
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.distributed as dist
import fsdp
import models
import reference
import rollout
import tiny


class CountAllGathers:
    """Counts the all-gathers FSDP issues (torch.distributed.all_gather_single in recent torch,
    all_gather_into_tensor before)."""

    NAMES = tuple(n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n))

    def __enter__(self):
        self.count, self.real = 0, {n: getattr(dist, n) for n in self.NAMES}

        def counting(real):
            def counted(*args, **kwargs):
                self.count += 1
                return real(*args, **kwargs)
            return counted
        for name, real in self.real.items():
            setattr(dist, name, counting(real))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(dist, name, real)


def load(path, seed=None):
    model = models.load_model(path, "sdpa")
    if seed is not None:  # a different set of weights, for the EMA
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model


def main(model_dir, out_path):
    accelerator = fsdp.make_accelerator("no")
    rank, results = accelerator.process_index, {}
    tokenizer = tiny.build_tokenizer()

    full_policy, full_ref = load(model_dir, seed=1), load(model_dir)
    policy = load(model_dir, seed=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    policy, optimizer = fsdp.prepare_policy(accelerator, policy, optimizer)
    ref = fsdp.prepare_reference(accelerator, reference.make_reference(load(model_dir)))
    units = [m for m in policy.modules() if isinstance(m, fsdp.FSDPModule)]
    assert fsdp.is_sharded(accelerator) and len(units) > 2, "the models were not sharded"

    # 1. Shards: both models hold the same slice of every parameter, half of each tensor's rows.
    for (name, p), (_, r) in zip(policy.named_parameters(), ref.named_parameters()):
        full = dict(full_ref.named_parameters())[name]
        assert fsdp.local_shard(p).shape == fsdp.local_shard(r).shape, name
        rows = (full.shape[0] + 1) // 2
        expected = full[rank * rows:(rank + 1) * rows]
        torch.testing.assert_close(fsdp.local_shard(r), expected, rtol=0, atol=0, msg=f"{name}: wrong slice")
    results["same_slices"] = f"{sum(1 for _ in policy.parameters())} parameters"

    # 2. Generation: one all-gather per FSDP unit for the whole rollout, not one per token; the
    # ranks generate different numbers of tokens without waiting on each other; the tokens are
    # the unsharded model's; afterwards everything is sharded again with its old settings.
    ids = torch.tensor([tokenizer.encode("the person picks up the red cup and")])
    new_tokens = 4 if rank == 0 else 11
    config = rollout.sampling_config(tokenizer, max_new_tokens=new_tokens)
    config.min_new_tokens = new_tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():  # a first forward settles FSDP's root and its settings
        policy(**batch)
    fsdp.reshard(policy)
    settings = [[g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups] for m in units]
    with CountAllGathers() as gathers, fsdp.gathered(policy):
        sharded = rollout.generate(policy, batch, tokenizer, 3, config, seeds=[7])
    alone = rollout.generate(full_policy, batch, tokenizer, 3, config, seeds=[7])
    assert sharded.completion_ids.shape[1] == new_tokens
    assert torch.equal(sharded.completion_ids, alone.completion_ids), "sharded generation differs"
    groups = sum(len(m._get_fsdp_state()._fsdp_param_groups) for m in units)
    assert gathers.count == groups, f"{gathers.count} all-gathers for {groups} FSDP groups"
    assert all(hasattr(p, "to_local") for p in policy.parameters()), "not resharded after generation"
    after = [[g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups] for m in units]
    assert after == settings, "reshard-after-forward settings not restored"
    with CountAllGathers() as per_token:
        rollout.generate(policy, batch, tokenizer, 3, rollout.sampling_config(tokenizer, max_new_tokens=4)
                         .__class__(**{**config.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4}), seeds=[7])
    results["generation"] = (f"{gathers.count} all-gathers for {new_tokens} tokens inside fsdp.gathered, "
                             f"{per_token.count} for 4 tokens without it")
    layers = len(policy.model.language_model.layers)
    assert per_token.count >= 4 * layers, f"without gathering: {per_token.count} all-gathers, expected per-token ones"

    # 3. Log-probs under FSDP (chunked LM head inside the sharded forward) equal the unsharded ones.
    completions = sharded
    with torch.no_grad():
        lp_sharded = rollout.completion_logprobs(ref, completions, chunk_size=3)
        fsdp.reshard(ref)
        lp_full = rollout.completion_logprobs(full_ref, completions, chunk_size=3)
    torch.testing.assert_close(lp_sharded, lp_full, rtol=1e-5, atol=1e-5)
    results["logprobs"] = "sharded == unsharded"

    # 3b. Different prompts on the two processes: one image-only prompt here (a quarter of
    # SEED-Bench-R1's rows have no progress video), two video-and-image prompts there (as after
    # --skip-bad-samples dropped one here). The vision tower runs once here and four times
    # there; the sharded forwards and the backward must still line up across processes, and
    # give the unsharded gradients.
    import data
    import encoding
    from bench import baselines
    data_root = os.path.join(os.path.dirname(out_path), f"data-rank{rank}")
    tiny.build_seed_bench(data_root, n_train=8, n_val=1, n_frames=4)
    samples, _ = data.load_samples(f"{data_root}/annotations/training_6k.jsonl", data_root)
    mine = [s for s in samples if bool(s.video) == (rank == 1)][:1 + rank]
    budget = encoding.budget_from_checkpoint(model_dir, max_frames=4, video_max_pixels=56 * 56, image_max_pixels=56 * 56,
                                         video_min_pixels=28 * 28, image_min_pixels=28 * 28)
    prompts = encoding.collate_prompts([encoding.encode_prompt(s, tokenizer, budget) for s in mine], tokenizer)
    with fsdp.gathered(policy):
        completions = rollout.generate(policy, prompts, tokenizer, 2, rollout.sampling_config(tokenizer, 5),
                                seeds=list(range(len(mine))))
    for packed in (True, False):
        with torch.no_grad():
            rollout.completion_logprobs(ref, completions, layout=None if packed else baselines.repeated)
        fsdp.reshard(ref)
        rollout.completion_logprobs(policy, completions, layout=None if packed else baselines.repeated).sum().backward()
        full_policy.zero_grad()
        lp_full = rollout.completion_logprobs(full_policy, completions, layout=None if packed else baselines.repeated)
        lp_full.sum().backward()
        # FSDP averages gradients over the processes: compare this process's slice of the mean.
        for name in ("lm_head.weight", "model.visual.patch_embed.proj.weight"):
            grad = fsdp.local_shard(policy.get_parameter(name).grad)
            dist.all_reduce(expected := full_policy.get_parameter(name).grad.clone())
            rows = (expected.shape[0] + 1) // 2
            torch.testing.assert_close(grad, expected[rank * rows:(rank + 1) * rows] / 2, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        optimizer.zero_grad(set_to_none=True)
    results["mixed_visuals"] = ("1 image-only prompt here, 2 video+image prompts there: forwards and backward "
                                "line up, gradients equal the unsharded ones")

    # 4. EMA on local shards: no communication, and the same numbers as on whole tensors.
    with CountAllGathers() as ema_gathers:
        reference.ema_update(ref, policy, 0.9)
    reference.ema_update(full_ref, full_policy, 0.9)
    assert ema_gathers.count == 0, f"the EMA all-gathered {ema_gathers.count} times"
    whole = fsdp.get_model_state_dict(ref, options=fsdp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for name, value in full_ref.state_dict().items():
            torch.testing.assert_close(whole[name], value, rtol=1e-6, atol=1e-7, msg=f"EMA {name}")
    results["ema"] = "0 all-gathers; equals the unsharded EMA"

    # 5. A NaN on one process stops both, naming that process's samples (a process that stopped
    # alone would leave the other waiting in the next collective).
    import guards
    value = torch.tensor([1.0, float("nan") if rank == 1 else 2.0])
    try:
        guards.stop_if_not_finite(accelerator, "reward", value, 3, [f"sample-of-rank-{rank}"])
        raise AssertionError("no stop")
    except FloatingPointError as e:
        assert "step 3: non-finite reward" in str(e) and "sample-of-rank-1" in str(e), str(e)
        assert "sample-of-rank-0" not in str(e), str(e)
    results["nan_stops_all"] = "both processes stopped, naming rank 1's sample"

    # 6. Export: the consolidated policy loads with from_pretrained and equals the weights.
    export = os.path.join(os.path.dirname(out_path), "export")
    fsdp.export_policy(export, policy, accelerator.is_main_process, dtype=torch.float32)
    accelerator.wait_for_everyone()
    if rank == 0:
        loaded = models.load_model(export, "sdpa").state_dict()
        expected = full_policy.state_dict()
        assert set(loaded) == set(expected), set(loaded) ^ set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=f"export {name}")
        results["export"] = f"{len(loaded)} tensors equal"
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
