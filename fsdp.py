"""Spreading the policy and the EMA reference over the GPUs (FSDP2, through accelerate), and the
few things that have to know about it: gathering the weights once for generation, sharded
checkpoints for exact resume, and a consolidated Hugging Face export of the policy.

Layout, with W processes: every parameter of both models is cut in W slices along its first
dimension and process r keeps slice r in fp32 (with its gradient and AdamW state, for the
policy). Each decoder layer is one FSDP unit: its bf16 weights are all-gathered just before
it runs and freed just after, so a GPU holds the full weights of about one layer at a time
(plus the vision tower, the embeddings and the LM head, gathered for a whole forward). Policy and reference are sharded by the same accelerate call over
the same process group, so process r holds the same slice of every parameter in both, and the
EMA update (reference.ema_update) is a local lerp with no communication.

With one process nothing is sharded; every function here then works on the plain model.
"""

import os
import pickle
import shutil
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

# The FSDP units: one per decoder layer (plus accelerate's own units for the embeddings, the
# final norm + LM head, and the root for what is left, the vision tower included). The decoder
# layer class is read off the model (decoder_layer), so every family is sharded alike. The vision
# blocks are deliberately not units of their own (accelerate's default, the model's
# _no_split_modules, would make them units): every unit all-gathers each time it runs, and
# the vision tower runs once per visual, so a process whose prompt has no video (a quarter of
# SEED-Bench-R1's rows) would issue fewer all-gathers than one whose prompt has: the processes'
# collectives fall out of step (a hang under NCCL, a crash under gloo). In the root the tower is
# gathered once per forward on every process, whatever the prompts hold (0.68B parameters for
# 7B: 1.4 GB in bf16 while a forward runs).
def decoder_layer(model):
    """The class name of model's decoder layers (Qwen2_5_VLDecoderLayer, Qwen2VLDecoderLayer, ...),
    the FSDP unit."""
    return type(model.model.language_model.layers[0]).__name__


# Until prepare_policy names the decoder layer, accelerate stops at this name (it is no class of
# any model), rather than falling back to _no_split_modules and making vision blocks units.
UNITS_UNSET = "<fsdp.prepare_policy sets the decoder layer class>"


def fsdp_plugin(mixed_precision):
    """The FSDP2 plugin: bf16 compute with fp32 master weights and fp32 gradient reduction. Its
    units are set from the model by set_units (prepare_policy)."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[UNITS_UNSET],
        reshard_after_forward=True, activation_checkpointing=False, state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=(MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                                if mixed_precision == "bf16" else None))


def set_units(plugin, model):
    """One FSDP unit per decoder layer of model: accelerate reads the class name at prepare."""
    plugin.transformer_cls_names_to_wrap = [decoder_layer(model)]


def make_accelerator(mixed_precision):
    """An Accelerator that shards with FSDP2 whenever there is more than one process; shard the
    policy with prepare_policy and the reference with prepare_reference.

    Activation checkpointing is transformers' own (models.load_policy), not accelerate's wrapper,
    which would rename every parameter and break the name-by-name match between policy and
    reference."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin = fsdp_plugin(mixed_precision) if world > 1 else None
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate only shards on accelerators. On CPU (the tests, the demo) we switch the very
        # same FSDP2 path on by hand, over gloo, so that CI runs the code the GPUs run.
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        # internal: accelerate re-reads the distributed type from this shared state.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def is_sharded(accelerator):
    return accelerator.distributed_type == DistributedType.FSDP


def prepare_policy(accelerator, model, optimizer):
    """accelerator.prepare(model, optimizer), sharded one FSDP unit per decoder layer of model
    when there is more than one process."""
    if is_sharded(accelerator):
        set_units(accelerator.state.fsdp_plugin, model)
    return accelerator.prepare(model, optimizer)


def prepare_reference(accelerator, ref):
    """Shard the reference exactly as prepare_policy sharded the policy (the same accelerate
    function, plugin and process group), or move it to the device when nothing is sharded."""
    if not is_sharded(accelerator):
        return ref.to(accelerator.device)
    set_units(accelerator.state.fsdp_plugin, ref)
    return fsdp2_prepare_model(accelerator, ref)


def local_shard(tensor):
    """This process's slice of a (possibly sharded) parameter, as a plain tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reshard(model):
    """Free the gathered weights FSDP keeps after a forward with no backward to follow. The
    root unit and the final norm + LM head stay unsharded after forward (backward would need
    them at once); after a no-grad reference forward nothing will, and the EMA works on the
    shards."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def param_groups(unit):
    """The FSDP2 parameter groups of one unit, where its reshard-after-forward setting lives.
    internal: FSDP2 has no public getter for it. torch 2.13 keeps a list (_fsdp_param_groups),
    torch 2.11 one group per unit (_fsdp_param_group, None when the unit owns no parameters)."""
    state = unit._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return state._fsdp_param_groups
    group = state._fsdp_param_group
    return [group] if group is not None else []


@contextmanager
def gathered(model):
    """Every FSDP unit of model unsharded for the duration of the block, then resharded.

    Generation runs one forward per new token. Left alone, FSDP would all-gather every layer
    for every token (768 all-gathers of the whole model per rollout); here it is one. It also
    means no collective runs during generation, so ranks whose groups stop at different lengths
    do not wait for each other. Costs the full bf16 weights on each GPU while it lasts."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units:
        # FSDP picks its root at the first forward; a unit unsharded or run on its own before
        # that (unshard() below, or generate() calling a submodule) would become the root.
        # Settle it now. internal: FSDP2 has no public call for its lazy root initialisation.
        units[0]._get_fsdp_state()._lazy_init()
    # set_reshard_after_forward has no getter, so keep each group's setting to put it back
    # (accelerate keeps the root and the LM head unsharded after forward, the layers not).
    saved = [[g.post_forward_mesh_info for g in param_groups(m)] for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, infos in zip(units, saved):
            m.reshard()
            for group, info in zip(param_groups(m), infos):
                group.post_forward_mesh_info = info


# ---------------------------------------------------------------------------------------------
# Checkpoints. <dir>/state holds every process's shards of the policy, its AdamW state and the
# reference (torch.distributed.checkpoint: each process writes and reads only its own slices,
# and can resume on a different number of processes). <dir>/policy is a consolidated Hugging
# Face export for evaluation and sharing. Everything is written to <dir>.tmp and renamed.


def _options(model):
    """A LoRA policy's state is its trainable parameters, the adapters: the frozen base is the
    --model checkpoint, read again on resume."""
    lora = any("lora_" in n for n, _ in model.named_parameters())
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _state(model, optimizer, ref_model):
    policy, optim = get_state_dict(model, optimizer, options=_options(model))
    state = {"policy": policy, "optimizer": optim}
    if hasattr(ref_model, "checkpoint_state"):  # lora.Reference: the adapters' EMA (or nothing)
        if ref_model.checkpoint_state():
            state["reference"] = ref_model.checkpoint_state()
    elif ref_model is not None:
        state["reference"] = get_model_state_dict(ref_model)
    return state


def save_sharded(path, model, optimizer, ref_model):
    dcp.save(_state(model, optimizer, ref_model), checkpoint_id=os.path.join(path, "state"))


# Reading state/ runs no code from it. torch.distributed.checkpoint pickles two things: the
# metadata file (.metadata: which tensor slice lies where) and the state's non-tensor values
# (AdamW's hyperparameters), and unpickles both with pickle's full power, so a crafted file
# could run anything. Here .metadata goes through an unpickler that builds only the classes
# torch's metadata is made of, and each non-tensor value is read as plain data
# (torch.load(weights_only=True)) before torch reads it.
METADATA = "torch.distributed.checkpoint.metadata"
METADATA_CLASSES = {
    *((METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                    "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                    "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which file, offset and length
    ("torch", "Size"), ("torch.serialization", "_get_layout"),    # a tensor's shape and layout
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),         # the checkpoint id it was saved as
}


class NotPlainData(pickle.UnpicklingError):
    """A checkpoint file that holds more than the data it should: refused, never run."""


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise NotPlainData(f"holds {module}.{name}, which torch's checkpoint metadata never does")


def read_metadata(state_dir):
    """state_dir/.metadata, built from METADATA_CLASSES alone (NotPlainData for anything else)."""
    with open(os.path.join(state_dir, ".metadata"), "rb") as f:
        return MetadataUnpickler(f).load()


def shard_sizes(metadata):
    """{shard file: the bytes its items need} of a checkpoint's metadata."""
    sizes = {}
    for info in metadata.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    return sizes


class _Reader(dcp.FileSystemReader):
    """torch's reader, with the metadata read_metadata already read."""

    def __init__(self, path, metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _PlainDataPlanner(dcp.DefaultLoadPlanner):
    """torch's planner, which unpickles each non-tensor value with weights_only=False: the same
    bytes are read with weights_only=True first, so they hold plain data only."""

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise NotPlainData(f"the value of {read_item.dest_index.fqn} {plain_data_refusal(e)}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def plain_data_refusal(error):
    """torch.load(weights_only=True)'s refusal as a few words: "holds builtins.exec"."""
    text = str(error)
    if "GLOBAL " in text:
        return "holds " + text.split("GLOBAL ", 1)[1].split()[0]
    return "holds more than plain data"


def load_sharded(path, model, optimizer, ref_model, metadata):
    """Load path/state (its metadata: read_metadata's) into the model, optimizer and reference.
    A value that is not plain data raises NotPlainData, on every process."""
    state = _state(model, optimizer, ref_model)  # shapes, dtypes and placements to load into
    try:  # lora.Reference's EMA: in place
        dcp.load(state, storage_reader=_Reader(os.path.join(path, "state"), metadata), planner=_PlainDataPlanner())
    except CheckpointException as e:  # torch gathers the processes' exceptions into one
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, NotPlainData)]
        if refused:
            raise NotPlainData(str(refused[0])) from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["policy"], optim_state_dict=state["optimizer"],
                   options=_options(model))
    if ref_model is not None and not hasattr(ref_model, "checkpoint_state"):
        set_model_state_dict(ref_model, state["reference"])


def export_policy(path, model, is_main, dtype=None, edit=None):
    """Write a from_pretrained-loadable copy of the policy to path (main process), in dtype
    (checkpoint.save passes the initial checkpoint's own, models.checkpoint_dtype: bf16 for the
    Qwen VL checkpoints; default: model.config.dtype, fp32 for a model loaded by
    models.load_model). Every process takes part in the gather; the full weights only ever exist
    on the main process, in CPU memory. The export's config.json keeps the model_type, so it
    loads back as the same family (models.family_of), and names dtype. edit(full state dict)
    changes the weights before they are written (lora.merger: the adapters merged in)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        full = edit(full) if edit else full
        dtype = dtype or getattr(model.config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        full = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in full.items()}
        saved = model.config.dtype
        model.save_pretrained(path, state_dict=full)
        # save_pretrained writes the dtype of the model's own (fp32) parameters into config.json,
        # not that of the weights it was given: name theirs, and leave the live config as it was.
        model.config.dtype = dtype
        model.config.save_pretrained(path)
        model.config.dtype = saved
    return path


def atomic_dir(final, accelerator):
    """(tmp, commit): write into tmp, then call commit() on every process to rename tmp to
    final, so a crash never leaves a half-written checkpoint under the final name."""
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()

    def commit():
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        accelerator.wait_for_everyone()
        return final
    return tmp, commit
