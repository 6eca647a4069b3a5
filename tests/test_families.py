"""What differs between the model families (models.FAMILIES), each checked against the family's
own transformers classes: which family a checkpoint is, the FSDP units, and whether prompts
carry second_per_grid_ts. The runs themselves (train, export, evaluate, prefix sharing, two
processes) are parametrized over the families in test_train.py, test_rollout.py and
test_distributed.py."""

import inspect
import json
import os
import shutil

import pytest
import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

import data
import encoding
import fsdp
import models
import prefix_sharing

# Written out by hand, so that the code's answers are checked against something it did not compute.
DECODER_LAYER = {"qwen2_5_vl": "Qwen2_5_VLDecoderLayer", "qwen2_vl": "Qwen2VLDecoderLayer"}
MODEL_CLASS = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
TAKES_SECONDS = {"qwen2_5_vl": True, "qwen2_vl": False}


def test_the_family_is_read_from_the_checkpoint_config(family, family_tiny_dir, tmp_path):
    assert models.family_of(family_tiny_dir).model_class.__name__ == MODEL_CLASS[family]
    assert type(models.load_model(family_tiny_dir)).__name__ == MODEL_CLASS[family]
    config = json.load(open(f"{family_tiny_dir}/config.json"))
    json.dump({**config, "model_type": "llava"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="'llava' is not a supported family; supported: qwen2_5_vl, qwen2_vl"):
        models.family_of(str(tmp_path))


@pytest.mark.parametrize("model_type", list(models.FAMILIES))
def test_each_family_row_matches_its_model_class(model_type):
    """The row's class is its model_type's, and temporal_seconds says whether that class's
    forward takes second_per_grid_ts: a wrong row would feed a model an input it silently drops
    (its forward takes **kwargs), or starve one of it."""
    row = models.FAMILIES[model_type]
    assert row.model_class.config_class.model_type == model_type
    assert ("second_per_grid_ts" in inspect.signature(row.model_class.forward).parameters) == row.temporal_seconds


def test_fsdp_units_are_the_models_decoder_layers(family, family_tiny_dir):
    """The policy FSDP2 is given (accelerate's own policy function over our plugin) picks
    exactly the decoder layers, of whichever family; no vision block, which would put the
    processes' all-gathers out of step (fsdp.py). Unset, the plugin refuses to shard rather than
    falling back to the model's _no_split_modules (the vision blocks included)."""
    model = models.load_model(family_tiny_dir)
    assert fsdp.decoder_layer(model) == DECODER_LAYER[family]
    unset = fsdp.fsdp_plugin("no")
    with pytest.raises(ValueError, match="prepare_policy"):
        unset.set_auto_wrap_policy(model)
    plugin = fsdp.fsdp_plugin("no")
    fsdp.set_units(plugin, model)
    plugin.set_auto_wrap_policy(model)  # as accelerate's fsdp2_prepare_model does, then:
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in model.modules() if policy(m)]
    assert units == list(model.model.language_model.layers) and len(units) == 2
    assert not any(policy(m) for m in model.model.visual.modules())


def test_second_per_grid_ts_only_where_the_family_takes_it(family, family_tiny_dir, tokenizer, seed_bench_root):
    """Qwen2.5-VL's video positions are spaced by second_per_grid_ts, Qwen2-VL's one per
    temporal patch with no such input: a Qwen2-VL prompt batch has none, and its positions
    step by one temporal patch at a time."""
    samples, _ = data.load_samples(f"{seed_bench_root}/annotations/training_6k.jsonl", seed_bench_root)
    budget = encoding.budget_from_checkpoint(family_tiny_dir, max_frames=4, video_max_pixels=56 * 56,
                                             image_max_pixels=56 * 56)
    video = next(s for s in samples if s.video)
    batch = encoding.collate_prompts([encoding.encode_prompt(video, tokenizer, budget)], tokenizer)
    inputs = encoding.model_inputs(batch)
    timed = TAKES_SECONDS[family]
    assert ("second_per_grid_ts" in batch) == ("second_per_grid_ts" in inputs) == timed
    assert budget.temporal_seconds == timed
    model = models.load_model(family_tiny_dir, "sdpa")
    positions = prefix_sharing.prompt_positions(model, batch)[0, 0]  # [width] the temporal positions
    on_video = positions[batch["mm_token_type_ids"][0] == 2]
    steps = sorted(set(on_video.tolist()))
    grid_t = int(batch["video_grid_thw"][0, 0])
    assert len(steps) == grid_t == 2
    # Qwen2-VL: one position per temporal patch. Qwen2.5-VL: seconds per patch x tokens_per_second
    # (2 frames at the sampled fps, 2 tokens per second).
    seconds = float(batch["second_per_grid_ts"][0]) if timed else None
    expected = int(seconds * model.config.vision_config.tokens_per_second) if timed else 1
    assert steps[1] - steps[0] == expected
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == batch["input_ids"].shape[1]


def test_a_hub_id_in_the_local_cache_is_read_like_a_directory(tiny_qwen2_vl_dir, tmp_path, monkeypatch):
    """--model also takes a hub id already in the local cache: the visual budget reads its family
    and patch geometry from the cached files (a wrong guess would give a Qwen2-VL prompt a
    second_per_grid_ts that generate() refuses). Nothing is downloaded."""
    from huggingface_hub import constants
    repo = tmp_path / "models--tiny--qwen2-vl"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    shutil.copy(os.path.join(tiny_qwen2_vl_dir, "config.json"), repo / "snapshots" / "abc")
    preprocessor = json.load(open(os.path.join(tiny_qwen2_vl_dir, "preprocessor_config.json")))
    json.dump({**preprocessor, "patch_size": 16}, open(repo / "snapshots" / "abc" / "preprocessor_config.json", "w"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    budget = encoding.budget_from_checkpoint("tiny/qwen2-vl")
    assert budget.temporal_seconds is False and budget.patch_size == 16
    assert encoding.budget_from_checkpoint("tiny/not-cached") == encoding.VisualBudget()
