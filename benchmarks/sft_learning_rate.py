"""Which learning rate fine-tunes the base: full SFT on the main schedule at several rates, measured side by side.

    python benchmarks/sft_learning_rate.py                       # 5 rates x 3 seeds, cpu preset: about 15 min
    python benchmarks/sft_learning_rate.py --rates 3e-4 1e-3 --seeds 0 1 2 3 4

Pretraining runs at a high rate (3e-3 here); fine-tuning a base at that rate overwrites what the base knew.
For each rate this prints, as mean ± std over seeds: the tasks' average final score, the earlier tasks' final
score, plasticity, the score of each family at the end, and the base's held-out LM loss after SFT (its rise,
and the share of its gain over a uniform guess that is kept). The preset's ``learning_rate`` was chosen from
this table (see ``epi_mini/config.py``); ``--schedule`` and ``--method`` measure other settings.
"""
import json
import time
from pathlib import Path

import numpy as np

from epi_mini.config import OptionParser, make_config
from epi_mini.experiments import run_many
from epi_mini.metrics import record_metric

FIGURES = ("average_score", "forgetting", "earlier_final", "plasticity", "lm_loss_final", "base_gain_kept")


def main(argv=None):
    ap = OptionParser(description=__doc__)
    ap.add_argument("--rates", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 2e-3, 3e-3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--schedule", default="shifting")
    ap.add_argument("--method", default="full")
    ap.add_argument("--init", default="base")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--save", default=None, metavar="FILE", help="also write every run's record to FILE (JSON)")
    args = ap.parse_args(argv)
    configs = [make_config(args.preset, learning_rate=lr, seed=s, schedule=args.schedule, method=args.method,
                           init=args.init) for lr in args.rates for s in args.seeds]
    t0 = time.perf_counter()
    records = run_many(configs, workers=args.workers)
    if args.save:
        Path(args.save).write_text(json.dumps(records))
    n = len(args.seeds)
    tasks = records[0]["tasks"]
    print(f"{args.method} on {args.schedule}, {args.preset} preset, init {args.init}, seeds {args.seeds} "
          f"({time.perf_counter() - t0:.0f} s for {len(records)} runs); mean ± std over seeds")
    print(f"{'rate':>8} " + " ".join(f"{f:>15}" for f in FIGURES) + "  " + " ".join(f"{t:>11}" for t in tasks))
    for i, lr in enumerate(args.rates):
        recs = records[i * n:(i + 1) * n]
        cells = []
        for f in FIGURES:
            v = np.array([record_metric(r, f) for r in recs])
            cells.append(f"{v.mean():>7.3f} ± {v.std(ddof=1) if n > 1 else 0:.3f}")
        finals = [f"{np.mean([r['accuracy_matrix'][-1][j] for r in recs]):>11.3f}" for j in range(len(tasks))]
        print(f"{lr:>8g} " + " ".join(f"{c:>15}" for c in cells) + "  " + " ".join(finals))


if __name__ == "__main__":
    main()
