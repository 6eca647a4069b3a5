"""Loading a Qwen2.5-VL checkpoint as the policy or the reference: the model class, the
attention kernel, fp32 master weights, and the training switches.

bf16 is the compute dtype, applied by FSDP's mixed-precision policy (or accelerate's autocast
with one process); AdamW and the EMA need the fp32 master weights.
"""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def pick_attn_implementation(choice):
    """auto: flash-attention 2 where it is installed and a GPU is there, else sdpa."""
    if choice != "auto":
        return choice
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def load_model(path, attn_implementation="auto"):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=pick_attn_implementation(attn_implementation))


def load_policy(cfg):
    """The policy to train from cfg.model, with cfg's attention, freeze_vision and
    gradient_checkpointing."""
    model = load_model(cfg.model, cfg.attn_implementation)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode, and transformers only checkpoints
    # activations in train mode: without this, checkpointing is silently off.
    return model.train()
