"""What stops a training step, and how it says why: out of GPU memory (with the settings to
lower), and NaN or inf (on every process together, naming the samples)."""

from contextlib import contextmanager

import torch
from accelerate.utils import gather_object


def oom_advice(cfg, phase):
    budget = (f"--max-frames ({cfg.max_frames}), --video-max-pixels ({cfg.video_max_pixels}), "
              f"--image-max-pixels ({cfg.image_max_pixels}), --max-completion-length ({cfg.max_completion_length})")
    if phase == "rollout":
        return (f"generation holds the full bf16 weights and a KV cache for G x (prompt + completion) tokens; "
                f"lower --num-generations ({cfg.num_generations}), {budget}")
    return (f"lower --logprob-chunk-size ({cfg.logprob_chunk_size}), {budget}, "
            f"and keep --gradient-checkpointing on ({cfg.gradient_checkpointing})")


@contextmanager
def oom_hint(phase, cfg, advice=None):
    """Name the phase and the settings to lower (advice; by default train.py's, oom_advice)
    when it runs out of GPU memory."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"out of memory during {phase}: {advice or oom_advice(cfg, phase)}") from e


def stop_if_not_finite(accelerator, what, value, step, sample_ids):
    """Stop every process, before the optimizer step, if value has a NaN or inf on any of them,
    naming the step and the samples of the processes where it happened. All processes stop
    together: one that raised alone would leave the others waiting in a collective."""
    bad = not torch.isfinite(value).all().item()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), reduction="sum")
        if flags.item() == 0:
            return
        culprits = [s for ids in gather_object([sample_ids if bad else []]) for s in ids]
    elif not bad:
        return
    else:
        culprits = list(sample_ids)
    raise FloatingPointError(f"step {step}: non-finite {what} for samples {culprits}; "
                             f"stopped before the optimizer step")


def finite_grad_norm(accelerator, grad_norm, step, sample_ids):
    """The global gradient norm as a float; a non-finite one stops the run before the optimizer
    step (every process sees the same global value, so all stop together)."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm.item()}) for samples "
                                 f"{sample_ids} on process {accelerator.process_index}; stopped before "
                                 f"the optimizer step")
    return grad_norm.item()
