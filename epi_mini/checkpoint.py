"""Atomic, verified, code-free checkpoints and JSON outputs.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows): a process killed at any moment leaves either the previous
file or the new one, never half of one. The new file gets the permissions any new file of the user gets (0666
minus the umask), not the private 0600 of a temporary file. A write that fails -- a full disk, a read-only
folder -- raises :class:`OutputError`, one line naming the file and the reason; the previous file is untouched.

A checkpoint carries its own checksum: ``checkpoint.pt`` is a torch file holding ``{"sha256": hex digest,
"state": the torch.save bytes of the state, as a uint8 tensor}``, and :func:`load_checkpoint` compares the
digest with the bytes before it deserialises them. A flipped bit anywhere in the weights, the optimizer's
moments or EPI's state is then reported, naming the file, instead of training on from damaged numbers.

Checkpoints are loaded with ``torch.load(weights_only=True)`` (both the outer file and the state inside), which
refuses to run code: a checkpoint from elsewhere can hold tensors and plain containers, nothing else.
"""
import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
# Config fields that may differ between a checkpoint and the run resuming it.
RESUME_MAY_DIFFER = ("device",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, damaged, or from an incompatible config."""


class OutputError(Exception):
    """An output that cannot be written (a full disk, a read-only folder, ...); what was there is unchanged."""


REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to write there",
           errno.EPERM: "no permission to write there"}


def output_error(path, error: OSError) -> OutputError:
    """The :class:`OutputError` of a failed write to ``path``: what, where and why, in one line."""
    reason = REASONS.get(error.errno, error.strerror or str(error))
    code = errno.errorcode.get(error.errno, "")
    return OutputError(f"cannot write {path}: {reason}{f' ({code})' if code else ''}; what was there is unchanged")


def new_file_mode():
    """The permissions a new file of this user gets: 0666 minus the umask."""
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path, data: bytes):
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, new_file_mode())  # mkstemp makes it private (0600); the file is an ordinary output
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise output_error(path, e) from None
    finally:
        if tmp is not None:  # the write failed or was interrupted: take the temporary file away again
            try:
                os.unlink(tmp)
            except OSError:
                pass
    # A process killed mid-write cannot remove its temporary file; the next good write does.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes):
    _atomic_write(path, data)


def save_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def sha256_of_file(path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def damaged(path, recorded, found) -> CheckpointError:
    """The error for a file whose sha256 is not the one recorded when it was written."""
    return CheckpointError(f"{path} is damaged: its sha256 is {found[:16]}..., the checkpoint recorded "
                           f"{recorded[:16]}... when it was written (a changed or corrupted file); it was not loaded")


def save_checkpoint(folder, state: dict):
    """Write ``state`` to ``folder/checkpoint.pt`` with its sha256, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapped = io.BytesIO()  # serialised in memory first: a full disk then fails in a plain, explained write
    torch.save({"sha256": hashlib.sha256(payload).hexdigest(),
                "state": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, wrapped)
    _atomic_write(Path(folder) / CHECKPOINT_NAME, wrapped.getvalue())


def config_differences(saved: dict, current: dict) -> list:
    """Names of config fields whose values differ (ignoring those allowed to differ on resume)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in keys
            if k not in RESUME_MAY_DIFFER and saved.get(k) != current.get(k)]


def _read_verified(path):
    outer = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(outer, dict) and set(outer) == {"sha256", "state"}):
        return outer  # written before checkpoints carried their checksum: nothing to verify against
    payload = outer["state"].numpy().tobytes()
    found = hashlib.sha256(payload).hexdigest()
    if found != outer["sha256"]:
        raise damaged(path, outer["sha256"], found)
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_checkpoint(folder, cfg=None):
    """The checkpoint dict in ``folder``, or None if there is none yet.

    Raises :class:`CheckpointError` if the file is unreadable, truncated or damaged (its sha256 differs from the
    one written with it), or, when ``cfg`` is given, if the checkpoint was written by a run with a different
    config (the message lists each differing field).
    """
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = _read_verified(path)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that tries to run code
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not an epi-mini checkpoint (no config/step entries)")
    if cfg is not None:
        diffs = config_differences(state["config"], cfg.to_dict())
        if diffs:
            raise CheckpointError(f"checkpoint {path} comes from an incompatible config: " + "; ".join(diffs))
    return state
