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
go through DCP: DCP would store any other value as a pickle ("bytes") and read it back with
``weights_only=False``, which runs whatever code the pickle names. So every entry of the metadata is checked
before DCP sees it (:func:`check_metadata`): tensor data only, in shard files of this folder, for exactly the
keys this run expects; anything else is refused.

Every file is checked before it is loaded: ``checkpoint.pt`` carries its own sha256
(:func:`epi_mini.checkpoint.save_checkpoint`) and the sha256 of every file of its shard folder, computed right
after DCP wrote them (each rank hashes a share of the files); on load, each rank verifies its share again, and
a damaged file is named on every rank. A failed write (a full disk on any rank) is one
:class:`~epi_mini.checkpoint.OutputError` on every rank.
"""
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError, OutputError, damaged, load_checkpoint, save_checkpoint, sha256_of_file
from .comm import _all_gather_object, on_rank0

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


SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")  # the names DCP's FileSystemWriter gives the shard files


def check_metadata(metadata, path, expected=None):
    """Raise ``pickle.UnpicklingError`` unless every entry of DCP's ``metadata`` (read from ``path``) is tensor
    data stored in a shard file of the checkpoint's own folder, without transforms, and, with ``expected``,
    the keys are exactly those. DCP reads anything else as a pickle with ``weights_only=False``."""
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise pickle.UnpicklingError(f"{path} is not DCP metadata")
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise pickle.UnpicklingError(f"{path}: entry {key!r} is {type(entry).__name__}, not tensor data: refused "
                                         "(DCP would read it as a pickle, which can run code)")
    for index, info in metadata.storage_data.items():
        where = getattr(info, "relative_path", None)
        if not (isinstance(where, str) and SHARD_FILE.fullmatch(where)) or getattr(info, "transform_descriptors",
                                                                                   None):
            raise pickle.UnpicklingError(f"{path}: entry {getattr(index, 'fqn', index)!r} points at {where!r} "
                                         "(with transforms or outside the shard files): refused")
    if expected is not None and set(entries) != set(expected):
        differ = sorted(set(entries) ^ set(expected))
        raise pickle.UnpicklingError(f"{path} does not hold this run's tensors: {len(differ)} key(s) differ, "
                                     f"e.g. {differ[:3]}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :class:`_MetadataUnpickler` instead of ``pickle.load`` and
    checked by :func:`check_metadata` (against ``expected`` keys, if given) before DCP uses any of it."""

    def __init__(self, path, expected=None, **kwargs):
        super().__init__(path, **kwargs)
        self.expected = expected

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        check_metadata(metadata, path, self.expected)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _failures(error, group):
    """``rank r: Type: message`` for each rank's failure in a DCP exception (DCP gathers them on every rank)."""
    here = dist.get_rank(group) if dist.is_initialized() else 0
    failures = error.failures.items() if isinstance(error, CheckpointException) else [(here, (error, None))]
    return "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc).strip()}" for rank, (exc, _) in failures)


def _share(names, group):
    """This rank's share of ``names`` (every R-th, from its rank on): each file is hashed by one rank."""
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    return sorted(names)[rank::size]


def shard_checksums(folder, group=None):
    """``{file name: sha256}`` of every file in the shard folder ``folder``, the same dict on every rank (each
    rank hashes its share of the files; one all-gather). A collective."""
    mine = {name: sha256_of_file(Path(folder) / name) for name in _share([p.name for p in Path(folder).iterdir()],
                                                                          group)}
    return {name: digest for part in _all_gather_object(mine, group) for name, digest in part.items()}


def verify_shard_checksums(folder, recorded, group=None):
    """Raise :class:`~epi_mini.checkpoint.CheckpointError` on every rank, naming the files, when a file of the
    shard folder is missing or its sha256 is not the ``recorded`` one. A collective."""
    problems = []
    for name in _share(recorded, group):
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        found = sha256_of_file(path)
        if found != recorded[name]:
            problems.append(str(damaged(path, recorded[name], found)))
    problems = [p for part in _all_gather_object(problems, group) for p in part]
    if problems:
        raise CheckpointError("; ".join(problems))


def _dcp_save(tensors, folder, group):
    # Every rank returns from dcp.save only after rank 0 has written .metadata (DCP's last phase is a
    # collective), so the folder is complete everywhere once this returns. A write that fails on any rank
    # (a full disk) fails on every rank: DCP gathers the failures.
    try:
        dcp.save(tensors, storage_writer=FileSystemWriter(folder), process_group=group)
    except (CheckpointException, OSError) as e:
        raise OutputError(f"cannot write sharded checkpoint {folder}: {_failures(e, group)}") from None


def _dcp_load(tensors, folder, group):
    try:
        dcp.load(tensors, storage_reader=SafeFileSystemReader(folder, expected=set(tensors)), process_group=group,
                 no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure and raises on each rank
        raise CheckpointError(f"cannot read sharded checkpoint {folder}: {_failures(e, group)}") from None


# --- the two things an FSDP2 run writes ----------------------------------------------------------------------
def save_sharded_checkpoint(folder, state, group=None):
    """Write ``state`` (a dict with a ``"step"``; its ``DTensor`` leaves are saved by DCP, the rest by rank 0)
    to ``folder``. A collective: every rank calls it with its own shards."""
    folder = Path(folder)
    rest, tensors = split_sharded(state)
    name = f"{SHARDS_PREFIX}{state['step']}"
    _dcp_save(tensors, folder / name, group)
    checksums = shard_checksums(folder / name, group)

    def commit():  # the new pointer, then the older shard folders go
        save_checkpoint(folder, {**rest, "shards": name, "shard_keys": sorted(tensors), "shard_sha256": checksums})
        for old in folder.glob(f"{SHARDS_PREFIX}*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    on_rank0(commit, group)  # every rank waits for it, and fails with it


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
    if "shard_sha256" in state:  # (absent from checkpoints written before checksums were kept)
        verify_shard_checksums(folder / state["shards"], state["shard_sha256"], group)
    _dcp_load(tensors, folder / state["shards"], group)
    return fill_sharded(state, tensors)


def save_sharded_weights(path, state_dict, group=None):
    """Write a model's sharded state dict (every value a ``DTensor``) to the DCP folder ``path``. The new folder
    is written next to it (``<path>.tmp``) and swapped in by rank 0 once complete: the old one is moved to
    ``<path>.old``, the new one into place, the old one removed. What a process killed half-way leaves behind
    (``.tmp``, ``.old``) is removed before the next write. A collective."""
    path = Path(path)
    rest, tensors = split_sharded(state_dict)
    plain = [k for k, v in rest.items() if v is not None]
    if plain:
        raise ValueError(f"save_sharded_weights: {plain[:3]} are not DTensors; shard the model with FSDP2 first")
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")

    def clear():
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)

    def swap():
        try:
            if path.exists():
                path.replace(old)
            tmp.replace(path)
        except OSError as e:
            raise OutputError(f"cannot move the new weights {tmp} to {path}: {e.strerror or e}") from None
        shutil.rmtree(old, ignore_errors=True)
    on_rank0(clear, group)
    _dcp_save(tensors, tmp, group)
    on_rank0(swap, group)
    return path
