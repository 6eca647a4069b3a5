"""The public code's way, kept only as the baseline that tests/test_rollout.py and bench/step.py
compare prefix sharing (prefix_sharing.py) with: every prompt, its video included, repeated G
times, in generation and in scoring.

    rollout.generate(model, prompts, tokenizer, g, gen_config, seeds, batch_inputs=repeated_inputs)
    rollout.completion_logprobs(model, rollout, chunk_size, layout=repeated)
"""

from contextlib import nullcontext

import torch

from encoding import model_inputs

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def repeat_prompts(prompts, num_generations):
    """The prompt batch with each prompt repeated G times in place (p0 x G, p1 x G, ...), the row
    order of the completions. Visual tensors are concatenated per prompt, so they are split by
    each prompt's patch count and repeated as whole blocks."""
    g = num_generations
    out = {k: prompts[k].repeat_interleave(g, dim=0) for k in TEXT_KEYS}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid not in prompts:
            continue
        sizes = prompts[grid].prod(-1).tolist()
        blocks = torch.split(prompts[pix], sizes)
        # Each prompt has at most one image and one video, so per-prompt blocks are the visuals.
        out[pix] = torch.cat([b for b in blocks for _ in range(g)])
        out[grid] = prompts[grid].repeat_interleave(g, dim=0)
    if "second_per_grid_ts" in prompts:
        out["second_per_grid_ts"] = prompts["second_per_grid_ts"].repeat_interleave(g, dim=0)
    return out


def repeated_inputs(model, prompts, num_generations):
    """generate() inputs for G samples of each prompt: every prompt repeated G times, so
    generate() prefills it (and runs its video through the vision tower) G times."""
    return model_inputs(repeat_prompts(prompts, num_generations))


def repeated(model, rollout):
    """Prompt + completion as P*G separate full sequences. Returns (inputs, source, attention)
    as prefix_sharing.packed does: source = (rows, cols) of the position whose output predicts
    each completion token under the mask, in row-major order; any attention kernel will do."""
    prompts = repeat_prompts(rollout.prompts, rollout.num_generations)
    ids, mask = rollout.completion_ids, rollout.completion_mask.long()  # [P*G, T]
    inputs = model_inputs(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], mask], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(ids)], dim=1).int()
    rows, t = mask.nonzero(as_tuple=True)
    return inputs, (rows, prompts["input_ids"].shape[1] + t - 1), nullcontext()
