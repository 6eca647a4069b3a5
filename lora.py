"""LoRA training (--lora-rank R > 0): low-rank adapters on the language model's linear layers,
the base frozen, and the two references as views of that one base.

    W x  ->  W x + (alpha / r) B A x        A: [r, in], B: [out, r], B = 0 at the start

The adapters are peft's own LoRA layers, put into the model in place (peft's
inject_adapter_in_model) rather than by wrapping it in a PeftModel: the model keeps its class,
its attribute paths (model.lm_head, model.model.language_model, which rollout.py,
prefix_sharing.py and fsdp.py reach for) and its parameter names, with "...q_proj.base_layer.weight"
and "...q_proj.lora_A.default.weight" where "...q_proj.weight" was. Everything but the adapters
is frozen (requires_grad False), so AdamW, the gradients and the checkpoints hold the adapters
alone.

The references need no second copy of the base:

- CARE's EMA reference is an fp32 EMA of the adapter tensors only (AdapterEMA), swapped into the
  policy's adapters for the reference's forward and swapped back after (Reference);
- GRPO's frozen reference is the base itself: the policy with its adapters switched off.

Under FSDP the adapters are sharded like every other parameter and the EMA keeps this process's
slices (as DTensors, so checkpoints save them sharded); the swap copies slice into slice.
"""

import contextlib
import os

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fsdp import local_shard, reshard

ADAPTER = "default"  # peft's adapter name; one adapter per model here
# The vision tower's linear layers inside its blocks: Qwen2.5-VL attn.qkv, attn.proj,
# mlp.{gate,up,down}_proj; Qwen2-VL attn.qkv, attn.proj, mlp.fc1, mlp.fc2. The merger stays frozen.
VISION_TARGETS = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))"


def target_regex(module_names, vision):
    """peft's target_modules as one regex over full module names: the language model's layers'
    linear layers named in module_names (a comma list), and with vision the vision blocks'."""
    names = "|".join(n.strip() for n in module_names.split(",") if n.strip())
    language = rf"model\.language_model\.layers\.\d+\.\w+\.({names})"
    return rf"({language}|{VISION_TARGETS})" if vision else language


def add_adapters(model, cfg):
    """Freeze model and put LoRA adapters (cfg.lora_rank, lora_alpha, lora_dropout,
    lora_target_modules, lora_vision) into it, in place. B starts at zero: the model computes
    exactly what the base does until the first update; A starts random, drawn from cfg.seed."""
    model.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                        lora_dropout=cfg.lora_dropout,
                        target_modules=target_regex(cfg.lora_target_modules, cfg.lora_vision))
    # A's random start from cfg.seed alone: every process must draw the same A (each shards its
    # own copy; the processes' RNGs are seeded apart), and 1 or N processes the same run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # config kept as model.peft_config
    if not adapter_parameters(model):
        raise ValueError(f"--lora-target-modules {cfg.lora_target_modules!r} matches no linear layer of the model")
    return model


def has_adapters(model):
    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapter_parameters(model):
    """{name: parameter} of the adapters (the trainable parameters under LoRA)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------
# The references


class AdapterEMA:
    """fp32 copies of the adapter tensors, moved towards the policy's by reference.ema_update
    (it pairs them with the policy's parameters by name). DTensors under FSDP: this process's
    slices, saved and loaded sharded by checkpoint.save/load."""

    def __init__(self, model):
        self.tensors = {n: p.detach().to(torch.float32, copy=True) for n, p in adapter_parameters(model).items()}

    def named_parameters(self):
        return iter(self.tensors.items())


class Reference:
    """Stands in for the reference model under LoRA. Called, it runs the policy with the EMA
    adapters swapped in (CARE, ema given) or with its adapters switched off (GRPO, ema None), in
    eval mode (no adapter dropout), and puts everything back after; attribute look-ups (lm_head,
    model, config, modules) go to the policy. Use it under no_grad, as reference scoring does."""

    def __init__(self, policy, ema=None):
        self.policy, self.ema = policy, ema

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.policy(*args, **kwargs)

    def named_parameters(self):  # what reference.ema_update moves
        return self.ema.named_parameters() if self.ema is not None else iter(())

    def checkpoint_state(self):  # what checkpoint.save keeps as the reference: the EMA, or nothing
        return self.ema.tensors if self.ema is not None else {}

    @contextlib.contextmanager
    def active(self):
        # FSDP keeps some units gathered after a forward: free them on both sides of the swap, so
        # the forward gathers the swapped-in slices and the policy's next forward its own again.
        reshard(self.policy)
        was_training = self.policy.training
        self.policy.eval()
        with self.ema_swapped_in() if self.ema is not None else adapters_disabled(self.policy):
            try:
                yield
            finally:
                reshard(self.policy)
        self.policy.train(was_training)

    @contextlib.contextmanager
    @torch.no_grad()
    def ema_swapped_in(self):
        params = adapter_parameters(self.policy)
        saved = {n: local_shard(p).clone() for n, p in params.items()}
        for n, p in params.items():
            local_shard(p).copy_(local_shard(self.ema.tensors[n]))
        try:
            yield
        finally:
            for n, p in params.items():
                local_shard(p).copy_(saved[n])


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model: every LoRA layer passes its input through the base layer alone."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)  # peft also makes the adapters trainable again


def make_reference(cfg, policy):
    """train.py's reference under LoRA: CARE's EMA of the adapters, GRPO's base (only needed for
    the KL, beta > 0), or None."""
    if cfg.algo == "care":
        return Reference(policy, AdapterEMA(policy))
    return Reference(policy) if cfg.beta > 0 else None


# ---------------------------------------------------------------------------------------------
# Exports


def merger(model):
    """A function that turns model's full state dict into the merged base's: W + scaling B A for
    every adapted layer, under the base layer's own names. Built on every process (the scalings
    are read off the LoRA layers), applied on the main one to the gathered weights."""
    scalings = {name: m.scaling[ADAPTER] for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    def merge(full):
        out = {k: v for k, v in full.items() if "lora_" not in k and ".base_layer." not in k}
        for name, scale in scalings.items():
            a, b = full[f"{name}.lora_A.{ADAPTER}.weight"], full[f"{name}.lora_B.{ADAPTER}.weight"]
            w = full[f"{name}.base_layer.weight"]
            out[f"{name}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            if f"{name}.base_layer.bias" in full:
                out[f"{name}.bias"] = full[f"{name}.base_layer.bias"]
        return out
    return merge


def export_adapters(path, model, is_main, base_model):
    """Write the adapters alone in peft's format (adapter_config.json, adapter_model.safetensors):
    PeftModel.from_pretrained(base, path) loads them. Every process takes part in the gather."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    if is_main:
        os.makedirs(path, exist_ok=True)
        config = model.peft_config[ADAPTER]
        config.base_model_name_or_path = base_model
        weights = get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()},
                  os.path.join(path, "adapter_model.safetensors"))
        config.save_pretrained(path)
    return path
