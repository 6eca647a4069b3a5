"""Loading a checkpoint as the policy or the reference: the model family, the attention kernel,
fp32 master weights, and the training switches.

The family (Qwen2-VL or Qwen2.5-VL) is the checkpoint's own: config.json's model_type picks its
row of FAMILIES, and everything that differs between families asks that row, so one code path
and the same commands serve both. What differs:

- the model class (train.py's policy and reference, evaluate.py, tiny.py, tests);
- the temporal 3D-RoPE positions of a video (encoding.VisualBudget.temporal_seconds): Qwen2.5-VL
  spaces temporal patches by their real duration (second_per_grid_ts, seconds per temporal
  patch, times tokens_per_second), Qwen2-VL gives temporal patch k position k and takes no
  second_per_grid_ts;
- the FSDP unit, its decoder layer class: fsdp.py reads it off the loaded model, not from here.

The prompt (chat template, default system message, vision special tokens) and the visual
preprocessing (patch 14, merge 2, temporal patch 2, CLIP mean/std, read from the checkpoint's
preprocessor_config.json) are the same in both families.

A third family that fits this mould is one more row here, its tiny config in tiny.tiny_config,
and its rows in the tests' per-family tables (tests/conftest.py FAMILY_FIXTURES, the
hand-written expectations in tests/test_families.py, the 2-process run in
tests/test_distributed.py). Qwen3-VL (transformers'
Qwen3VLForConditionalGeneration) does not fit it yet, so it has no row: its vision tower takes
16-pixel patches with its own mean and std (budget_from_checkpoint would read those), but a
video is no longer one placeholder. Its processor writes each temporal patch (two frames) as a
block "<t seconds><|vision_start|><|video_pad|>...<|vision_end|>" with the timestamp in the
text, and its get_rope_index expects that layout (it cuts video_grid_thw into one row per
temporal patch). Adding it means a family hook in encoding.encode_prompt that lays the video
out that way, its own chat template checked against encoding.chat_prompt, and a tiny config.

bf16 is the compute dtype, applied by FSDP's mixed-precision policy (or accelerate's autocast
with one process); AdamW and the EMA need the fp32 master weights.
"""

import json
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    class_name: str           # transformers' ...ForConditionalGeneration class
    temporal_seconds: bool    # its video positions take second_per_grid_ts (see above)

    @property
    def model_class(self):
        # Imported when first asked for: importing a model class takes a second or two, which
        # evaluate.py's argument errors and `compare` have no need to wait for.
        import transformers
        return getattr(transformers, self.class_name)


# Keyed by config.json's model_type.
FAMILIES = {
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", temporal_seconds=True),
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", temporal_seconds=False),
}


def family(model_type):
    """The Family row of a model_type, or an error naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported family; supported: {', '.join(FAMILIES)} "
                         "(models.FAMILIES)")
    return FAMILIES[model_type]


def checkpoint_file(model_dir, name):
    """The path of file name of a checkpoint, a directory or a hub id in the local cache (as
    --model takes it), or None where it has none. Nothing is downloaded."""
    if os.path.isdir(model_dir):
        path = os.path.join(model_dir, name)
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache
    try:
        path = try_to_load_from_cache(model_dir, name)
    except ValueError:  # not a hub id either
        return None
    return path if isinstance(path, str) else None


def model_problem(path):
    """Why path cannot be a --model, in a few words, or None: it must be a directory or a hub id
    in the local Hugging Face cache (nothing is downloaded, so an id that is not there fails
    now rather than after a minute of retries) with a config.json naming a supported family."""
    config = checkpoint_file(path, "config.json")
    if config is None:
        return ("no config.json, not a model directory" if os.path.isdir(path) else
                "no such directory, and not in the local Hugging Face cache (nothing is downloaded: "
                "download it first, e.g. with `hf download`)")
    try:
        with open(config) as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError):
        return f"{config} is not a JSON object"
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} is not a supported family ({', '.join(FAMILIES)})"
    return None


def family_of(path):
    """The Family of the checkpoint at path (a directory or a cached hub id), from its
    config.json alone: no weights are read, no config class is built."""
    from transformers import PreTrainedConfig
    config, _ = PreTrainedConfig.get_config_dict(path)
    return family(config.get("model_type"))


def checkpoint_dtype(path):
    """The dtype the checkpoint at path is stored in (config.json's dtype, torch_dtype before
    transformers 5; fp32 if it names none): bf16 for the Qwen VL checkpoints. load_model's
    model says fp32 whatever the file holds, so exports ask here (checkpoint.save)."""
    from transformers import PreTrainedConfig
    config, _ = PreTrainedConfig.get_config_dict(path)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) else name


def pick_attn_implementation(choice):
    """auto: flash-attention 2 where it is installed and a GPU is there, else sdpa."""
    if choice != "auto":
        return choice
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def load_model(path, attn_implementation="auto", dtype=torch.float32):
    """The checkpoint at path as its own family's model class (fp32 by default)."""
    return family_of(path).model_class.from_pretrained(
        path, dtype=dtype, attn_implementation=pick_attn_implementation(attn_implementation))


def load_policy(cfg):
    """The policy to train from cfg.model, with cfg's attention, freeze_vision and
    gradient_checkpointing; with cfg.lora_rank > 0 a frozen base with LoRA adapters (lora.py)."""
    model = load_model(cfg.model, cfg.attn_implementation)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if getattr(cfg, "lora_rank", 0) > 0:
        import lora  # imports peft, which full fine-tuning has no need of
        model = lora.add_adapters(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode, and transformers only checkpoints
    # activations in train mode: without this, checkpointing is silently off.
    return model.train()
