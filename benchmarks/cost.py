"""What EPI costs: training throughput, peak memory, state bytes, and refresh time against model size.
Run on demand (not a test; it takes a few minutes):

    python benchmarks/cost.py [--steps 40] [--max-params 100_000_000]

1. Tokens/s of training on the `cpu` preset model with plain AdamW, EPI (K = 50, default and compact
   state) and static isolation, each in its own fresh process (so peak RSS is its own), run one after the
   other; the ratios to plain AdamW are from the same invocation.
2. EPI state bytes per parameter, default (fp32 EMA + int32 indices) and compact (bf16 EMA + packed bits).
3. The refresh (layer-normalise + global top-rho with kthvalue) on random scores from 0.1M to 100M
   parameters: time per parameter stays flat, i.e. the refresh is linear in N.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

STRATEGIES = {
    "AdamW (plain)": "plain",
    "EPI K=50": dict(mask_interval=50),
    "EPI K=50 compact": dict(mask_interval=50, ema_dtype="bf16", mask_storage="bits"),
    "static (10%)": "static",
}


def train_worker(kind, steps):
    """In a fresh process: train `steps` steps, print tokens/s and peak RSS as JSON."""
    import resource

    from epi_mini.config import make_config
    from epi_mini.baselines import StaticIsolation
    from epi_mini.epi import EvolvingIsolation
    from epi_mini.strategy import PlainUpdate
    from epi_mini.train import Run
    run = Run(make_config("cpu", device="cpu"))
    if kind == "plain":
        strategy = PlainUpdate()
    elif kind == "static":
        gen = torch.Generator().manual_seed(1)
        strategy = StaticIsolation(run.model, {n: torch.rand(p.shape, generator=gen) < 0.1
                                               for n, p in run.model.named_parameters()})
    else:
        kw = dict(kind)
        if kw.get("ema_dtype") == "bf16":
            kw["ema_dtype"] = torch.bfloat16
        strategy = EvolvingIsolation(run.model, isolation_ratio=0.1, warmup_steps=0, **kw)
    times, tokens = [], 0
    for step in range(steps + 5):
        batch = run.batch(step)
        t0 = time.perf_counter()
        loss = run.loss_on(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        strategy.step(run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        if step >= 5:
            times.append(time.perf_counter() - t0)
            tokens += int(batch.loss_mask.numel())
    print(json.dumps({"tokens_per_s": tokens / sum(times), "median_step_ms": 1e3 * statistics.median(times),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params": run.model.num_params()}))


def refresh_time(n, ratio=0.1, tensors=8, repeats=3):
    from epi_mini.epi import top_fraction
    gen = torch.Generator().manual_seed(0)
    sizes = [n // tensors] * (tensors - 1) + [n - (n // tensors) * (tensors - 1)]
    scores = {f"t{i}": torch.rand(s, generator=gen) ** 4 * (10.0 ** (i % 4)) for i, s in enumerate(sizes)}
    top_fraction(scores, ratio)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        top_fraction(scores, ratio)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-params", type=int, default=100_000_000)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return train_worker(json.loads(args.worker), args.steps)

    print(f"1. training throughput, cpu preset, {args.steps} steps per strategy, {torch.get_num_threads()} threads")
    results = {}
    for name, kind in STRATEGIES.items():
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", json.dumps(kind)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["AdamW (plain)"]
    print(f"   {'strategy':<18} {'tokens/s':>10} {'vs AdamW':>9} {'median step':>12} {'peak RSS':>10}")
    for name, r in results.items():
        print(f"   {name:<18} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base['tokens_per_s']:>9.3f} "
              f"{r['median_step_ms']:>9.1f} ms {r['peak_rss_mb']:>7.0f} MB")

    from epi_mini.epi import EvolvingIsolation
    model = torch.nn.Linear(1024, 1024)
    print("\n2. EPI state, bytes per parameter (rho = 0.1)")
    for label, kw in (("default: fp32 EMA + int32 indices", {}),
                      ("compact: bf16 EMA + packed bits", dict(ema_dtype=torch.bfloat16, mask_storage="bits"))):
        e = EvolvingIsolation(model, isolation_ratio=0.1, warmup_steps=0, **kw)
        model.weight.grad, model.bias.grad = torch.randn_like(model.weight), torch.randn_like(model.bias)
        e.step(torch.optim.SGD(model.parameters(), lr=0.0))
        b = e.state_bytes()
        print(f"   {label:<36} EMA {b['ema'] / 1049600:.2f} + set {b['mask'] / 1049600:.3f} = {b['per_param']:.3f} B/param")

    print("\n3. refresh time (normalise + global top-10% with kthvalue) vs parameter count")
    print(f"   {'parameters':>12} {'refresh':>10} {'ns / parameter':>15}")
    n = 100_000
    while n <= args.max_params:
        t = refresh_time(n)
        print(f"   {n:>12,} {t * 1e3:>7.1f} ms {t / n * 1e9:>15.2f}")
        n *= 10


if __name__ == "__main__":
    main()
