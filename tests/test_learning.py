"""Does the policy-gradient machinery learn at all? A toy reward on the tiny model.

The reward is the share of completion tokens drawn from a fixed eighth of the vocabulary, so a
random policy scores about 1/8. The step below is the training step of train.py stripped of
everything but sampling, group advantages and the loss: a sign error, a wrong mask or
advantages computed across groups make the reward fall or stall, and this test fail.
"""

import torch

import care
import data
import encoding
import models
import rollout


def test_a_few_dozen_steps_raise_a_toy_reward(tiny_model_dir, tokenizer, seed_bench_root):
    torch.manual_seed(0)
    model = models.load_model(tiny_model_dir, "sdpa")
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(tiny_model_dir, max_frames=4, video_max_pixels=56 * 56,
                                         image_max_pixels=56 * 56, video_min_pixels=28 * 28,
                                         image_min_pixels=28 * 28)
    encoded = [encoding.encode_prompt(s, tokenizer, budget) for s in samples[:4]]
    target = torch.zeros(len(tokenizer), dtype=torch.bool)
    target[torch.randperm(len(tokenizer))[: len(tokenizer) // 8]] = True
    g, p = 8, 2
    config = rollout.sampling_config(tokenizer, max_new_tokens=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    history = []
    for step in range(30):
        batch = encoding.collate_prompts([encoded[(2 * step + i) % len(encoded)] for i in range(p)], tokenizer)
        completions = rollout.generate(model, batch, tokenizer, g, config)
        mask = completions.completion_mask
        reward = ((target[completions.completion_ids].float() * mask).sum(1) / mask.sum(1)).view(p, g)
        history.append(reward.mean().item())
        adv = care.group_advantages(reward).view(-1)
        model.train()
        loss, _ = care.policy_loss(rollout.completion_logprobs(model, completions), adv, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert first < 0.3, history
    assert last > first + 0.3, f"reward did not rise: first {first:.3f}, last {last:.3f}, {history}"
