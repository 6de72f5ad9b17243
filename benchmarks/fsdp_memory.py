"""Memory per rank of EPI on FSDP2 (``--fsdp``), from the code's own accounting. Run on demand (not a test):

    python benchmarks/fsdp_memory.py

For the ``gpu`` preset's GPT and a 1B-parameter GPT of the same code (``GPTConfig(n_layer=20, n_embd=2048,
n_head=16, block_size=1024)``) on R ranks: what one rank holds at the optimizer step. Everything is built on
the meta device (shapes only, nothing allocated), with the shapes of rank 0's FSDP2 shards (dim 0 chunked as
``torch.chunk`` does: rank 0's shard is the largest), and measured by the code that holds it:

* weights and gradients: the shards themselves, fp32 (the project trains in fp32, no mixed precision);
* AdamW: the state ``torch.optim.AdamW`` creates in a step over those shards (two moments and a step count);
* EPI: :meth:`~epi_mini.epi.EvolvingIsolation.state_bytes` of an EPI over those shards (its importance EMA),
  with an isolated set of rho of the shard's entries (int32 indices: the average share; a rank whose shard
  holds more of the globally important entries stores more, see the README).

The last column is transient, not in the total: the peak of the buffers a refresh allocates (the exact
selection's normalised scores, its int64 keys and their temporaries, freed after it), measured per local entry
by tracking every tensor ``sharded_top_fraction`` allocates (one gloo process, 1M random scores) and scaled to
the shard. Also transient and not counted: the all-gathered weights of the block that runs (and of the one
FSDP2 prefetches), its unsharded gradients before the reduce-scatter, and the activations.
"""
import argparse
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from epi_mini.config import OptionParser, make_config
from epi_mini.distributed import sharded_top_fraction
from epi_mini.epi import EvolvingIsolation
from epi_mini.model import GPT, GPTConfig
from epi_mini.tokenizer import get_tokenizer

ONE_B = dict(n_layer=20, n_embd=2048, n_head=16, block_size=1024)


def model_config(name):
    if name == "1B":
        return GPTConfig(vocab_size=get_tokenizer("bytes").vocab_size, **ONE_B)
    cfg = make_config(name)
    return GPTConfig(block_size=cfg.block_size, vocab_size=get_tokenizer(cfg.tokenizer).vocab_size,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)


def rank0_shards(config, world_size):
    """name -> a meta Parameter shaped like rank 0's FSDP2 shard of that parameter (tied weights once)."""
    with torch.device("meta"):
        model = GPT(config)
    return {n: torch.nn.Parameter(p.chunk(world_size, dim=0)[0]) for n, p in model.named_parameters()}, \
        sum(p.numel() for p in model.parameters())


def memory_per_rank(config, world_size, isolation_ratio=0.1):
    """Bytes one rank holds at the optimizer step: {"params", "weights", "grads", "adamw", "epi_ema",
    "epi_mask", "total"} (``params``: the model's parameter count)."""
    shards, params = rank0_shards(config, world_size)
    for p in shards.values():
        p.grad = torch.empty_like(p)
    optimizer = torch.optim.AdamW(list(shards.values()))
    optimizer.step()  # creates AdamW's state for the shards (meta tensors, and the step counts)
    adamw = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    epi = EvolvingIsolation(list(shards.items()), isolation_ratio=isolation_ratio)
    epi._set_isolated({n: torch.empty(round(isolation_ratio * p.numel()), dtype=torch.int32, device="meta")
                       for n, p in shards.items()})
    state = epi.state_bytes()
    weights = sum(p.numel() * p.element_size() for p in shards.values())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in shards.values())
    return {"params": params, "weights": weights, "grads": grads, "adamw": adamw, "epi_ema": state["ema"],
            "epi_mask": state["mask"], "total": weights + grads + adamw + state["total"]}


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that the ops run under it allocate (storages shared by views
    counted once; ``external`` storages, e.g. the inputs, not at all)."""

    def __init__(self, external=()):
        super().__init__()
        self.live, self.now, self.peak, self.external = {}, 0, 0, set(external)

    def _release(self, ptr):
        count, size = self.live[ptr]
        if count == 1:
            del self.live[ptr]
            self.now -= size
        else:
            self.live[ptr] = (count - 1, size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in self.external:
                continue
            ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            count, _ = self.live.get(ptr, (0, size))
            self.live[ptr] = (count + 1, size)
            if count == 0:
                self.now += size
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._release, ptr)
        return out


def refresh_peak_bytes_per_entry(entries=1_000_000, isolation_ratio=0.1):
    """Peak bytes per score entry that one :func:`sharded_top_fraction` call allocates, in a one-process gloo
    group, on ``entries`` random scores in 10 tensors."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        g = torch.Generator().manual_seed(0)
        scores = {f"t{i}": torch.rand(entries // 10, generator=g) ** 4 for i in range(10)}
        tracker = _LiveBytes(t.untyped_storage().data_ptr() for t in scores.values())
        with tracker:
            sharded_top_fraction(scores, isolation_ratio, "mean")
        return tracker.peak / sum(t.numel() for t in scores.values())
    finally:
        if started:
            dist.destroy_process_group()


def human(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def main():
    ap = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8, 64])
    ap.add_argument("--isolation-ratio", type=float, default=0.1)
    args = ap.parse_args()
    columns = ("weights", "grads", "adamw", "epi_ema", "epi_mask", "total", "refresh")
    per_entry = refresh_peak_bytes_per_entry(isolation_ratio=args.isolation_ratio)
    print(f"Per rank at the optimizer step, fp32, rho = {args.isolation_ratio} (rank 0: the largest shards); "
          f"refresh: transient peak, {per_entry:.1f} bytes per local entry (measured)\n")
    print(f"| {'model':<5} | {'parameters':>13} | {'R':>3} | " + " | ".join(f"{c:>10}" for c in columns) + " |")
    print("|" + "|".join("-" * (w + 2) for w in (5, 13, 3, *[10] * len(columns))) + "|")
    for name in ("gpu", "1B"):
        config = model_config(name)
        for ranks in args.ranks:
            m = memory_per_rank(config, ranks, args.isolation_ratio)
            m["refresh"] = round(per_entry * m["weights"] / 4)
            print(f"| {name:<5} | {m['params']:>13,} | {ranks:>3} | "
                  + " | ".join(f"{human(m[c]):>10}" for c in columns) + " |")
    m = memory_per_rank(model_config("gpu"), 1, args.isolation_ratio)
    entries = m["weights"] / 4
    print(f"\nPer local entry: EPI {(m['epi_ema'] + m['epi_mask']) / entries:.2f} bytes (EMA and isolated set), "
          f"AdamW {m['adamw'] / entries:.2f}, weights and gradients 4 each.")


if __name__ == "__main__":
    main()
