"""Atomic, code-free checkpoints and JSON outputs.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows): a process killed at any moment leaves either the previous
file or the new one, never half of one. Checkpoints are loaded with ``torch.load(weights_only=True)``, which
refuses to run code: a checkpoint from elsewhere can hold tensors and plain containers, nothing else.
"""
import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
# Config fields that may differ between a checkpoint and the run resuming it.
RESUME_MAY_DIFFER = ("device",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or from an incompatible config."""


def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # A process killed mid-write cannot remove its temporary file; the next good write does.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes):
    _atomic_write(path, lambda f: f.write(data))


def save_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def save_checkpoint(folder, state: dict):
    _atomic_write(Path(folder) / CHECKPOINT_NAME, lambda f: torch.save(state, f))


def config_differences(saved: dict, current: dict) -> list:
    """Names of config fields whose values differ (ignoring those allowed to differ on resume)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}" for k in keys
            if k not in RESUME_MAY_DIFFER and saved.get(k) != current.get(k)]


def load_checkpoint(folder, cfg=None):
    """The checkpoint dict in ``folder``, or None if there is none yet.

    Raises :class:`CheckpointError` if the file is unreadable or truncated, or, when ``cfg`` is given, if
    the checkpoint was written by a run with a different config (the message lists each differing field).
    """
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that tries to run code
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not an epi-mini checkpoint (no config/step entries)")
    if cfg is not None:
        diffs = config_differences(state["config"], cfg.to_dict())
        if diffs:
            raise CheckpointError(f"checkpoint {path} comes from an incompatible config: " + "; ".join(diffs))
    return state
