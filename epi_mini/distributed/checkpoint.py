"""Sharded checkpoints of an FSDP2 run with ``torch.distributed.checkpoint`` (DCP): no rank gathers the model.

A checkpoint folder holds two things:

* ``shards-step<N>/``: every ``DTensor`` of the state (parameters, AdamW moments, EPI's importance EMA and
  isolated set), written by DCP: each rank writes its own shards (``__<rank>_0.distcp``) and rank 0 the
  index (``.metadata``, written last, by rename);
* ``checkpoint.pt``: everything else (config, step, record, optimizer hyper-parameters and step counts, EPI's
  counters and history, RNG state), the same on every rank, written by rank 0 with
  :func:`epi_mini.checkpoint.save_checkpoint` (atomic) *after* DCP has finished. It names its shard folder,
  so it is the commit point: a run killed during a save leaves the previous ``checkpoint.pt`` pointing at the
  previous, complete shard folder; older shard folders are removed once the new pointer is in place.

Loading never runs code from the files: ``checkpoint.pt`` is read with ``torch.load(weights_only=True)``,
DCP reads tensor data with ``weights_only=True`` too, and its ``.metadata`` pickle is read here with an
unpickler that accepts DCP's own metadata classes only (DCP itself would ``pickle.load`` it). Only tensors
go through DCP (DCP would store other values as pickles and read them back with ``weights_only=False``).
"""
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint

SHARDS_PREFIX = "shards-step"


def split_sharded(tree, path=()):
    """``(tree with every DTensor replaced by None, {key: DTensor})``; keys are the paths joined by "/"."""
    if isinstance(tree, DTensor):
        return None, {"/".join(map(str, path)): tree}
    found = {}
    if isinstance(tree, dict):
        rest = {}
        for k, v in tree.items():
            rest[k], more = split_sharded(v, path + (k,))
            found.update(more)
        return rest, found
    if isinstance(tree, (list, tuple)):
        parts = [split_sharded(v, path + (i,)) for i, v in enumerate(tree)]
        for _, more in parts:
            found.update(more)
        return type(tree)(p for p, _ in parts), found
    return tree, found


def fill_sharded(tree, tensors, path=()):
    """The inverse of :func:`split_sharded`: put ``tensors[key]`` back where ``key``'s path points."""
    key = "/".join(map(str, path))
    if key in tensors:
        return tensors[key]
    if isinstance(tree, dict):
        return {k: fill_sharded(v, tensors, path + (k,)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(fill_sharded(v, tensors, path + (i,)) for i, v in enumerate(tree))
    return tree


# --- reading DCP's metadata without running code ---------------------------------------------------------
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"),
    ("pathlib._local", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Accepts DCP's metadata classes, torch.Size and torch dtypes; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :class:`_MetadataUnpickler` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _dcp_save(tensors, folder, group):
    # Every rank returns from dcp.save only after rank 0 has written .metadata (DCP's last phase is a
    # collective), so the folder is complete everywhere once this returns.
    dcp.save(tensors, storage_writer=FileSystemWriter(folder), process_group=group)


def _dcp_load(tensors, folder, group):
    try:
        dcp.load(tensors, storage_reader=SafeFileSystemReader(folder), process_group=group,
                 no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure and raises on each rank
        here = dist.get_rank(group) if dist.is_initialized() else 0
        failures = e.failures.items() if isinstance(e, CheckpointException) else [(here, (e, None))]
        reasons = "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc).strip()}" for rank, (exc, _) in failures)
        raise CheckpointError(f"cannot read sharded checkpoint {folder}: {reasons}") from None


# --- the two things an FSDP2 run writes ----------------------------------------------------------------------
def save_sharded_checkpoint(folder, state, group=None):
    """Write ``state`` (a dict with a ``"step"``; its ``DTensor`` leaves are saved by DCP, the rest by rank 0)
    to ``folder``. A collective: every rank calls it with its own shards."""
    folder = Path(folder)
    rest, tensors = split_sharded(state)
    name = f"{SHARDS_PREFIX}{state['step']}"
    _dcp_save(tensors, folder / name, group)
    if dist.get_rank(group) == 0:
        save_checkpoint(folder, {**rest, "shards": name, "shard_keys": sorted(tensors)})  # the commit point
        for old in folder.glob(f"{SHARDS_PREFIX}*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group)  # leave together: no rank starts the next step while rank 0 still writes


def load_sharded_checkpoint(folder, template, cfg=None, group=None):
    """The checkpoint in ``folder`` with its ``DTensor`` leaves loaded into ``template`` (a dict shaped like
    the saved state's sharded part, e.g. the live model's, optimizer's and strategy's state dicts, whose
    ``DTensor``s are filled in place), or None if there is no checkpoint. Raises
    :class:`~epi_mini.checkpoint.CheckpointError` for a broken, foreign or mismatched checkpoint."""
    folder = Path(folder)
    state = load_checkpoint(folder, cfg)
    if state is None:
        return None
    if "shards" not in state or "shard_keys" not in state:
        raise CheckpointError(f"{folder} is not a sharded (FSDP2) checkpoint: it has no shard folder; it was "
                              "written by a run without --fsdp")
    _, tensors = split_sharded(template)
    if set(tensors) != set(state["shard_keys"]):
        differ = sorted(set(tensors) ^ set(state["shard_keys"]))
        raise CheckpointError(f"sharded checkpoint {folder} does not match this run's state: {len(differ)} "
                              f"tensor(s) differ, e.g. {differ[:3]}")
    _dcp_load(tensors, folder / state["shards"], group)
    return fill_sharded(state, tensors)


def save_sharded_weights(path, state_dict, group=None):
    """Write a model's sharded state dict (every value a ``DTensor``) to the DCP folder ``path``. The new folder
    is written next to it and swapped in by rank 0 once complete. A collective."""
    path = Path(path)
    rest, tensors = split_sharded(state_dict)
    plain = [k for k, v in rest.items() if v is not None]
    if plain:
        raise ValueError(f"save_sharded_weights: {plain[:3]} are not DTensors; shard the model with FSDP2 first")
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if dist.get_rank(group) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier(group)
    _dcp_save(tensors, tmp, group)
    if dist.get_rank(group) == 0:
        if path.exists():
            path.replace(old)
        tmp.replace(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group)
    return path
