"""What EPI costs, next to plain AdamW, in one run. On demand (not a test; figures depend on the machine):

    python benchmarks/cost.py            # everything: about 10 minutes on 2 cores
    python benchmarks/cost.py --quick    # the same tables on smaller sizes and fewer steps: about 2 minutes

1. **State**: EPI's extra bytes per parameter (from ``state_bytes()``), default and compact modes.
2. **Step time**, side by side: every strategy trains its own copy of the ``cpu`` preset's model on the same
   batches, taking turns step by step (round-robin), so machine noise hits them alike. Repeated ``--repeats``
   times; the ratio to AdamW is printed as the median of the repeats, with their min-max.
3. **Refresh**: normalise + global top-rho + the overlap with the previous set, in ns per parameter, from 0.1M
   to 100M parameters, for each threshold method of ``epi_mini.compact.kth_largest`` (``auto`` is what EPI uses).
4. **8-bit importance vs fp32**: one EPI run of the ``cpu`` preset; the same gradients also feed an 8-bit EMA,
   and at every refresh both pick their top-rho set: the Jaccard overlap of the two, across the run.
5. **GPU**: the ``gpu`` preset's step time and EPI's ratio, when a CUDA device is present.
"""
import argparse
import statistics
import time

import torch

from epi_mini.compact import BlockwiseEMA8
from epi_mini.config import OptionParser, make_config
from epi_mini.drift import jaccard
from epi_mini.epi import EvolvingIsolation, top_fraction
from epi_mini.isolation import indices_to_masks
from epi_mini.strategy import PlainUpdate
from epi_mini.train import Run

MODES = {"default": dict(), "bf16 + bits": dict(ema_storage="bf16", mask_storage="bits"),
         "compact (int8 + gaps)": dict(ema_storage="int8", mask_storage="gaps"),
         "int8 + bits": dict(ema_storage="int8", mask_storage="bits")}


def state_table(model):
    print("1. EPI's state, bytes per parameter (rho = 0.1; AdamW itself keeps 8: two fp32 moments)")
    for label, kw in MODES.items():
        e = EvolvingIsolation(model, isolation_ratio=0.1, warmup_steps=0, **kw)
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        e.step(torch.optim.SGD(model.parameters(), lr=0.0))
        b = e.state_bytes()
        n = sum(p.numel() for p in model.parameters())
        print(f"   {label:<24} EMA {b['ema'] / n:.3f} + isolated set {b['mask'] / n:.3f} = {b['per_param']:.3f}")


def step_table(preset, steps, repeats, device="cpu"):
    cfg = make_config(preset, device=device)
    base = Run(cfg)
    batches = [base.stream.batch(i) for i in range(steps + 5)]
    makers = {"AdamW (plain)": lambda m: PlainUpdate(),
              **{f"EPI K={k} {mode}": (lambda kw, k: lambda m: EvolvingIsolation(
                  m, isolation_ratio=0.1, mask_interval=k, warmup_steps=0, **kw))(kw, k)
                 for mode, kw in MODES.items() if mode in ("default", "compact (int8 + gaps)") for k in (50, 1)}}
    ratios = {name: [] for name in makers}
    medians = {name: [] for name in makers}
    for _ in range(repeats):
        runs = {}
        for name, make in makers.items():
            run = Run(cfg)
            run.model.load_state_dict(base.model.state_dict())
            runs[name] = (run, make(run.model), [])
        for i, batch in enumerate(batches):
            for name, (run, strategy, times) in runs.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = run.loss_on(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
                strategy.step(run.optimizer)
                run.optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 5:  # the first steps warm up allocators and caches
                    times.append(time.perf_counter() - t0)
        plain = statistics.median(runs["AdamW (plain)"][2])
        for name, (_, _, times) in runs.items():
            medians[name].append(statistics.median(times))
            ratios[name].append(statistics.median(times) / plain)
    n = base.model.num_params()
    print(f"\n2. step time, {preset} preset ({n:,} parameters, batch {cfg.batch_size}), {device}, "
          f"{torch.get_num_threads()} threads, {steps} steps x {repeats} repeats, round-robin")
    print(f"   {'strategy':<30} {'median step':>12} {'vs AdamW (median [min, max] of repeats)':>40}")
    for name in makers:
        r = ratios[name]
        print(f"   {name:<30} {statistics.median(medians[name]) * 1e3:>9.2f} ms "
              f"{statistics.median(r):>14.3f} [{min(r):.3f}, {max(r):.3f}]")
    return ratios


def refresh_table(sizes, methods=("kthvalue", "topk", "histogram", "auto"), repeats=3):
    print("\n3. refresh: normalise + global top-10% + overlap with the previous set, ns per parameter "
          f"({torch.get_num_threads()} threads)")
    print(f"   {'parameters':>12} " + " ".join(f"{m:>11}" for m in methods))
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        parts = [n // 40] * 39 + [n - (n // 40) * 39]  # 40 tensors, as the cpu preset's model has
        scores = {f"t{i}": torch.rand(s, generator=gen) ** 4 * (10.0 ** (i % 5)) for i, s in enumerate(parts)}
        previous = top_fraction(scores, 0.1, method="kthvalue" if n < 2**18 else "histogram")
        row = []
        for method in methods:
            if method == "topk" and n > 10_000_000:
                row.append("-")
                continue
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                top_fraction(scores, 0.1, method=method).count_of(previous)
                best = min(best, time.perf_counter() - t0)
            row.append(f"{best / n * 1e9:.2f}")
        print(f"   {n:>12,} " + " ".join(f"{v:>11}" for v in row))


def int8_overlap(steps, interval=50):
    cfg = make_config("cpu", device="cpu")
    run = Run(cfg)
    epi = EvolvingIsolation(run.model, isolation_ratio=0.1, mask_interval=interval, warmup_steps=100)
    shadow = BlockwiseEMA8({n: p.shape for n, p in epi.params.items()})
    overlaps = []
    for step in range(steps):
        loss = run.loss_on(run.batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        shadow.update({n: p.grad * p.grad for n, p in epi.params.items() if p.grad is not None}, epi.ema_beta)
        refreshes = len(epi.history)
        epi.step(run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        if len(epi.history) > refreshes:
            picked = indices_to_masks(top_fraction(shadow.values(), epi.isolation_ratio), epi.params)
            overlaps.append(jaccard(epi.isolated, picked))
    print(f"\n4. 8-bit importance vs fp32, cpu preset, {steps} steps, refresh every {interval}: Jaccard overlap of "
          f"the two top-10% sets at each of {len(overlaps)} refreshes")
    print(f"   min {min(overlaps):.3f}, median {statistics.median(overlaps):.3f}, max {max(overlaps):.3f}")
    return overlaps


def main():
    ap = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (about 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="step-time repeats (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    state_table(Run(make_config("cpu", device="cpu")).model)
    step_table("cpu", 30 if quick else 60, args.repeats or (2 if quick else 5))
    refresh_table([100_000, 1_000_000, 10_000_000] if quick else [100_000, 1_000_000, 10_000_000, 100_000_000])
    int8_overlap(400 if quick else 1500)
    print("\n5. GPU:", "the gpu preset, on " + torch.cuda.get_device_name() if torch.cuda.is_available() else
          "no CUDA device on this machine: nothing measured")
    if torch.cuda.is_available():
        step_table("gpu", 30 if quick else 100, 2 if quick else 3, device="cuda")


if __name__ == "__main__":
    main()
