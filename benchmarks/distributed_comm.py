"""Communication of EPI's sharded top-rho selection, printed and (optionally) measured. Run on demand (not a test):

    python benchmarks/distributed_comm.py                      # the cost table, from the formulas
    python benchmarks/distributed_comm.py --measure [--ranks 2] [--params 1000000]

The table gives, per refresh and per rank, the rounds (collectives) and bytes of
:func:`epi_mini.distributed.sharded_top_fraction` for the presets' models and several numbers of ranks R,
next to the naive alternative: all-gather every fp32 score (4 N bytes come back to every rank).
``--measure`` starts R gloo processes on this machine (CPU, loopback), times both on N random scores spread
over the cpu preset's 40 tensor shapes scaled to N, checks that they select the same entries, and prints the
collectives actually issued.
"""
import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epi_mini.config import OptionParser, make_config
from epi_mini.distributed import count_communication, selection_cost, shard_range, sharded_top_fraction
from epi_mini.epi import top_fraction
from epi_mini.model import GPT, GPTConfig


def preset_model_size(preset):
    """(number of parameter tensors, number of parameters) of a preset's GPT."""
    cfg = make_config(preset)
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    params = [p for p in model.parameters() if p.requires_grad]
    return len(params), sum(p.numel() for p in params), cfg.normalizer


def print_table():
    print("Sharded selection, per refresh and per rank. payload: the buffers a rank hands to the collectives (an")
    print("all-reduce of p bytes moves ~2p(R-1)/R per rank on a ring); gathered: what an all-gather brings back.")
    print("'gather all' = all-gather every fp32 score instead (4 N bytes come back to every rank).\n")
    print(f"{'preset':<7} {'tensors':>7} {'params':>10} {'R':>4} {'normalizer':>10} {'rounds':>8} "
          f"{'payload B':>16} {'gathered B':>11} {'gather all B':>13}")
    for preset in ("tiny", "cpu", "gpu"):
        tensors, params, _ = preset_model_size(preset)
        for ranks in (2, 8, 64):
            for normalizer in ("mean", "zscore"):
                lo = selection_cost(tensors, ranks, normalizer, ties_split=False)
                hi = selection_cost(tensors, ranks, normalizer, ties_split=True)
                rounds = f"{lo['rounds']} to {hi['rounds']}"
                payload = f"{lo['payload_bytes']:,} to {hi['payload_bytes']:,}"
                print(f"{preset:<7} {tensors:>7} {params:>10,} {ranks:>4} {normalizer:>10} {rounds:>8} "
                      f"{payload:>16} {hi['received_bytes']:>11,} {4 * params:>13,}")
    print("\n+1 round of 32 bytes per refresh for the log (global isolated fraction, Jaccard with the previous "
          "set).\nThe upper figures apply when only some of the entries tied at the threshold are taken (common "
          "with low-precision or integer scores, rare with fp32 EMAs).")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(rank, ranks, port, n_params, repeats):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # The cpu preset's tensor shapes, scaled so that they hold about n_params entries in all.
    cfg = make_config("cpu")
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    sizes = [p.numel() for p in model.parameters()]
    scale = n_params / sum(sizes)
    g = torch.Generator().manual_seed(0)
    full = {f"t{i}": torch.rand(max(1, round(s * scale)), generator=g) ** 4 for i, s in enumerate(sizes)}
    local = {n: s[slice(*shard_range(s.numel(), rank, ranks))] for n, s in full.items()}

    def gather_all():  # the naive way: every rank gets every score, then selects locally
        gathered = {}
        for n, s in local.items():
            chunk = -(-full[n].numel() // ranks)
            padded = torch.zeros(chunk)
            padded[: s.numel()] = s
            rows = [torch.empty(chunk) for _ in range(ranks)]
            dist.all_gather(rows, padded)
            gathered[n] = torch.cat(rows)[: full[n].numel()]
        return top_fraction(gathered, 0.1, "mean")

    timings = {"sharded selection": [], "gather all + top_fraction": []}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        with count_communication() as log:
            mine = sharded_top_fraction(local, 0.1, "mean")
        timings["sharded selection"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        reference = gather_all()
        timings["gather all + top_fraction"].append(time.perf_counter() - t0)
    for n, (a, _) in ((n, shard_range(full[n].numel(), rank, ranks)) for n in full):
        expected = reference[n][(reference[n] >= a) & (reference[n] < a + local[n].numel())] - a
        assert torch.equal(mine[n], expected), f"selections differ in {n}"
    if rank == 0:
        total = sum(s.numel() for s in full.values())
        print(f"\nmeasured: R={ranks} gloo processes on this machine, N={total:,} scores in {len(full)} tensors, "
              f"rho=0.1, normalizer=mean; median of {repeats}")
        for name, ts in timings.items():
            print(f"  {name:<28} {statistics.median(ts) * 1e3:8.2f} ms")
        print(f"  collectives of the sharded selection: {len(log)}, payload {sum(b for _, b in log):,} bytes "
              f"({', '.join(op for op, _ in log)})")
        print(f"  gather all: {4 * total * (ranks - 1) // ranks:,} bytes received per rank; same selection: yes")
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also time both ways with gloo processes")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print_table()
    if args.measure:
        mp.spawn(_measure, args=(args.ranks, _free_port(), args.params, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
