"""How many torch threads a CPU run should use, measured. On demand (not a test; figures depend on the machine):

    python benchmarks/threads.py              # about 2 minutes on 2 cores
    python benchmarks/threads.py --steps 100  # longer, steadier

The ``cpu`` preset's model trains ``--steps`` steps (after 10 unmeasured ones) at 1 thread, 2 threads and every
core, each in a fresh process, first on an idle machine and then with the cores shared: ``k`` other processes
each keep one core busy (a plain Python loop, what another job on a shared machine looks like to the scheduler).
Every setting is measured in the same run, one after another, so the ratios compare like with like.

Why it matters: torch's intra-op threads meet at a barrier after every operation; when another process holds
one of the cores, a thread that is not scheduled holds up the others, and a step that takes 100 ms alone can
take ten times longer. What this prints is what :func:`epi_mini.train.default_threads` was chosen from.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import time


def _busy(stop):
    while not stop.is_set():
        pass


def _time_steps(threads, steps, queue):
    import torch

    from epi_mini.config import make_config
    from epi_mini.strategy import PlainUpdate, sft_step
    from epi_mini.train import Run
    torch.set_num_threads(threads)
    run = Run(make_config("cpu", device="cpu"))
    times = []
    for step in range(steps + 10):
        batch = run.batch(step)
        t0 = time.perf_counter()
        sft_step(run.loss_on, batch, run.model.parameters(), run.optimizer, PlainUpdate(), 1.0)
        if step >= 10:
            times.append(time.perf_counter() - t0)
    queue.put(statistics.median(times) * 1000)


def measure(threads, steps, busy):
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    try:
        queue = ctx.Queue()
        p = ctx.Process(target=_time_steps, args=(threads, steps, queue))
        p.start()
        ms = queue.get()
        p.join()
    finally:
        stop.set()
        for h in hogs:
            h.join()
    return ms


def main(argv=None):
    from epi_mini.config import OptionParser  # here, not above: the busy processes re-import this file, light
    ap = OptionParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="measured steps per setting (default 40)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    counts = sorted({1, min(2, cores), cores})
    loads = sorted({0, 1, cores})  # idle, one core busy, every core busy
    print(f"cpu preset, batch 64, {cores} cores: median ms per training step ({args.steps} steps)")
    print(f"{'other busy processes':<22}" + "".join(f"{f'{t} thread' + 's' * (t > 1):>14}" for t in counts))
    for busy in loads:
        row = [measure(t, args.steps, busy) for t in counts]
        print(f"{busy:<22}" + "".join(f"{ms:>11.1f} ms" for ms in row)
              + "   (vs 1 thread: " + ", ".join(f"{ms / row[0]:.2f}x" for ms in row[1:]) + ")")


if __name__ == "__main__":
    main()
