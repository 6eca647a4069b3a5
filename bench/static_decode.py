"""Static-cache decoding: generate() over a preallocated KV cache with a torch.compile'd
single-token forward, in the spirit of gpt-fast. Measured, not adopted: the same tokens as
rollout.generate, but slower on a CPU (bench/README.md); kept here so that bench/decode.py and
`bench/gpu.py --decode` can time it against HF generate on a GPU before anyone adopts it.

    completions = static_decode.generate(model, prompts, tokenizer, G, gen_config, seeds)

HF generate() normally grows a DynamicCache by one position per token (a torch.cat per layer,
new shapes every step), and runs the model's forward eagerly: at small per-token work the
Python and dispatch overhead of ~30 ops per layer dominates. Here the cache is a StaticCache,
one [rows, kv_heads, max_len, head_dim] buffer per layer written in place, so every decode step
has the same shapes and transformers' own generate() runs it through torch.compile (the
model's __call__, mode "reduce-overhead": CUDA graphs on a GPU, fused kernels everywhere).

Only the cache and the forward change. The sampling loop, the logits processors built from the
GenerationConfig (temperature, top-p, top-k, suppress_tokens, repetition penalty), the random
draws and the stopping rule are generate()'s own, so for the same logits the same tokens come
out. The logits themselves can differ in the last bits (keys padded to max_len and masked, and
inductor's fused kernels round differently): tests/test_static_decode.py checks the tokens.

Prefix sharing keeps working: the prompt is prefilled once into a DynamicCache
(prefix_sharing.prefilled), copied G times, and that copy is written into the StaticCache
through its public update(), so the prompt's video still goes through the model once per group.

The cache length is rounded up to a multiple of BUCKET tokens, so prompts of nearby lengths
share one compiled graph (a new length means a recompile, seconds to tens of seconds).

Reaches into library internals are tagged `internal:` with the reason.
"""

import copy

from transformers import CompileConfig, DynamicCache, StaticCache

import prefix_sharing
import rollout

BUCKET = 256


def cache_length(prompt_tokens, max_new_tokens, bucket=BUCKET):
    """Positions the cache holds: prompt + new tokens, rounded up to a multiple of bucket."""
    need = prompt_tokens + max_new_tokens
    return -(-need // bucket) * bucket


def compiled_config(gen_config):
    """A copy of gen_config whose generate() compiles the decode step (on every device).

    generate() compiles the forward by itself when the cache is static, but only on
    accelerators; the flag below asks for it on a CPU too."""
    config = copy.deepcopy(gen_config)
    compile_config = CompileConfig(fullgraph=False, mode="reduce-overhead")
    # internal: CompileConfig's only switch for compiling on a CPU is this private field.
    compile_config._compile_all_devices = True
    config.compile_config = compile_config
    config.disable_compile = False
    return config


def static_inputs(model, inputs, max_new_tokens):
    """generate() inputs with a StaticCache in place of past_key_values.

    A filled DynamicCache (prefix_sharing.prefilled: the prompt, G copies) is copied into a
    StaticCache of the same rows; without one, an empty StaticCache is passed and generate()'s
    own prefill fills it (one generate for a batch of prompts, as evaluate.py calls it). Either
    way the cache holds cache_length(prompt width, max_new_tokens) positions."""
    width = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=cache_length(width, max_new_tokens))
    filled = inputs.get("past_key_values")
    if filled is not None:
        if not isinstance(filled, DynamicCache):
            raise TypeError(f"static_inputs copies a DynamicCache, got {type(filled).__name__}")
        for i, layer in enumerate(filled.layers):
            cache.update(layer.keys, layer.values, i)
    return {**inputs, "past_key_values": cache}


def generate(model, prompts, tokenizer, num_generations, gen_config, seeds):
    """rollout.generate (training's way: one seed per prompt) with a static cache and a compiled
    decode step: each group's prompt is prefilled once (prefix_sharing.prefilled) and copied
    into the StaticCache."""
    max_new = gen_config.max_new_tokens
    group = lambda model, prompt, g: static_inputs(model, prefix_sharing.prefilled(model, prompt, g), max_new)
    return rollout.generate(model, prompts, tokenizer, num_generations, compiled_config(gen_config), seeds,
                            group_inputs=group)
