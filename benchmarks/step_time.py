"""Per-step cost of EPI against plain AdamW, on the `cpu` preset model. Run on demand (not a test):

    python benchmarks/step_time.py [--steps 60] [--preset cpu]

Every strategy trains its own copy of the same model on the same batches, and the strategies take turns
step by step (round-robin), so they share the machine's state and noise; the script prints each median
step time, its ratio to plain AdamW, and the extra state bytes per parameter.
"""
import argparse
import statistics
import time

import torch

from epi_mini.config import make_config
from epi_mini.adaptive import AdaptiveIsolation
from epi_mini.baselines import StaticIsolation
from epi_mini.epi import EvolvingIsolation
from epi_mini.strategy import PlainUpdate
from epi_mini.train import Run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per strategy")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args.preset, device="cpu")
    base = Run(cfg)
    batches = [base.stream.batch(i) for i in range(args.steps + 10)]
    n = base.model.num_params()

    def static_mask(model):
        return {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.1
                for name, p in model.named_parameters()}

    makers = {
        "AdamW (plain)": lambda m: PlainUpdate(),
        "EPI K=1": lambda m: EvolvingIsolation(m, isolation_ratio=0.1, mask_interval=1, warmup_steps=0),
        "EPI K=50": lambda m: EvolvingIsolation(m, isolation_ratio=0.1, mask_interval=50, warmup_steps=0),
        "EPI K=50 compact": lambda m: EvolvingIsolation(m, isolation_ratio=0.1, mask_interval=50, warmup_steps=0,
                                                        ema_dtype=torch.bfloat16, mask_storage="bits"),
        "EPI auto": lambda m: AdaptiveIsolation(m, isolation_ratio=0.1, warmup_steps=0),
        "static (10%)": lambda m: StaticIsolation(m, static_mask(m)),
    }
    runs = {}
    for name, make in makers.items():
        run = Run(cfg)
        run.model.load_state_dict(base.model.state_dict())
        runs[name] = (run, make(run.model), [])
    for i, batch in enumerate(batches):
        for name, (run, strategy, times) in runs.items():
            t0 = time.perf_counter()
            loss = run.loss_on(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            strategy.step(run.optimizer)
            run.optimizer.zero_grad(set_to_none=True)
            if i >= 10:  # the first steps warm up allocators and caches
                times.append(time.perf_counter() - t0)
    plain = statistics.median(runs["AdamW (plain)"][2])
    print(f"preset {args.preset}: {n:,} parameters, batch {cfg.batch_size}, {args.steps} timed steps each, "
          f"{torch.get_num_threads()} threads, round-robin")
    print(f"{'strategy':<18} {'median step':>12} {'vs AdamW':>9} {'extra bytes/param':>18}")
    for name, (run, strategy, times) in runs.items():
        med = statistics.median(times)
        if hasattr(strategy, "state_bytes"):
            extra = strategy.state_bytes()["per_param"]
        elif isinstance(strategy, StaticIsolation):
            extra = sum(t.numel() * t.element_size() for t in strategy._stored.values()) / n
        else:
            extra = 0.0
        print(f"{name:<18} {med * 1e3:>9.2f} ms {med / plain:>9.3f} {extra:>18.2f}")


if __name__ == "__main__":
    main()
