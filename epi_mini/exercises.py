"""The checks of the course's exercises: one function per exercise, called by the check cell below its stub.

Every lesson notebook ends with exercises: a task in words, a stub cell you fill in, and a check cell that calls
``check_exercise_NN_k(...)`` from this module with your answer. A check prints one line that starts with
``Exercise NN.k: correct.`` and says what your answer shows, or ``Exercise NN.k: not yet.`` and what is wrong,
and then raises ``AssertionError`` (so that a solution notebook run by pytest fails when a check does). The
reference solutions are ``notebooks/solutions/NN_name.ipynb``.

The checks are fast (a second or two each on the ``tiny`` preset or on a toy model) and test what holds with a
wide margin: a definition against the package's own implementation on many inputs, an exact count against the
real object's, or a direction measured far from its noise -- never one exact float of one training run.
"""
import io
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .baselines import core_region
from .config import make_config
from .data import MixtureStream, Schedule, collate, encode_example, make_schedule
from .drift import jaccard, layer_group
from .epi import EvolvingIsolation
from .methods import EPIUpdate
from .metrics import backward_transfer, forgetting, paired_difference, record_metric, t_975
from .model import GPT, GPTConfig
from .pretrain import BASE_DIR, HELDOUT_FILE, lm_loss, load_base, read_windows
from .strategy import sft_step
from .tasks import BUILTIN_TASKS, Example, Task
from .tokenizer import byte_tokenizer
from .train import Run


# --- what every check shares --------------------------------------------------------------------------------------
def _require(ok, exercise, message):
    """Print ``Exercise <exercise>: not yet. <message>`` and raise AssertionError, unless ``ok``."""
    if not ok:
        print(f"Exercise {exercise}: not yet. {message}")
        raise AssertionError(f"Exercise {exercise}: {message}")


def _correct(exercise, message):
    print(f"Exercise {exercise}: correct. {message}")


def _call(exercise, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a stub that still raises NotImplementedError (or is not a function yet)
    reported in one line."""
    _require(callable(fn), exercise, f"expected a function or a class, got {type(fn).__name__}: run your stub cell")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        _require(False, exercise, "your stub still raises NotImplementedError: fill it in, run its cell, then "
                                  "run this check again")


def _close(a, b, tol):
    return a is not None and math.isfinite(float(a)) and abs(float(a) - float(b)) <= tol


def _toy_model(seed=0, width=32):
    """A two-layer MLP on 16 inputs: small enough that a check trains it in milliseconds."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 4))


def _toy_batches(n, size=16, seed=0):
    """``n`` batches ``(x, y)`` of a fixed smooth regression target for :func:`_toy_model`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=g) / 4       # x @ w of unit scale: a smooth target
    out = []
    for _ in range(n):
        x = torch.randn(size, 16, generator=g)
        out.append((x, torch.sin(x @ w)))
    return out


def _toy_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


# --- 01 · a tiny GPT ----------------------------------------------------------------------------------------------
def check_exercise_01_1(masked_loss):
    """``masked_loss(logits, targets, loss_mask)``: the mean cross-entropy over the positions where ``loss_mask`` is
    1, over the whole batch (not per row), as ``GPT.forward`` computes it. Checked on random logits of several
    shapes, with an all-ones mask (the plain mean), and against the GPT's own loss on a real batch."""
    ex = "01.1"
    torch.manual_seed(0)
    for B, T, V in ((2, 5, 7), (3, 11, 258)):
        logits, targets = torch.randn(B, T, V), torch.randint(0, V, (B, T))
        mask = (torch.rand(B, T) < 0.4).float()
        mask[0, :T - 1] = 1.0                      # rows with different counts: a per-row mean would differ
        token = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")
        want = float((token * mask.reshape(-1)).sum() / mask.sum())
        got = _call(ex, masked_loss, logits, targets, mask)
        _require(_close(got, want, 1e-4), ex, f"on random logits {B}x{T}x{V} you give {float(got):.5f}, the masked "
                 f"mean is {want:.5f}: average the per-token cross-entropy over every masked-in position of the "
                 "batch (sum of loss x mask, divided by the sum of the mask)")
        ones = _call(ex, masked_loss, logits, targets, torch.ones(B, T))
        _require(_close(ones, float(token.mean()), 1e-4), ex, "with a mask of ones the loss should be the plain "
                 "mean cross-entropy over every position")
    tok = byte_tokenizer()
    exs = BUILTIN_TASKS["math"].examples(8, seed=0)
    batch = collate([encode_example(tok, e) for e in exs], tok, 40)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        logits, loss = model(batch.x, batch.y, batch.loss_mask)
        got = _call(ex, masked_loss, logits, batch.y, batch.loss_mask)
    _require(_close(got, float(loss), 1e-4), ex, f"on a batch of math examples you give {float(got):.5f}, the GPT's "
             f"own masked loss is {float(loss):.5f}")
    _correct(ex, f"your loss matches the GPT's on every case (a batch of 8 math examples: {float(loss):.3f}; only "
                 f"{int(batch.loss_mask.sum())} of its {batch.loss_mask.numel()} positions count).")


def check_exercise_01_2(sample_next):
    """``sample_next(logits, temperature=1.0, top_k=None)``: one token id per row of ``logits`` (B, V). Checked:
    ``top_k=1`` and a temperature near 0 give the argmax; ``top_k=3`` never leaves the three largest logits; at
    temperatures 1 and 2 the frequencies of 40,000 draws follow ``softmax(logits / temperature)`` within 0.015
    (six standard errors of a frequency)."""
    ex = "01.2"

    def draw(logits, **kw):
        out = _call(ex, sample_next, logits, **kw)
        _require(isinstance(out, torch.Tensor) and out.numel() == logits.shape[0], ex,
                 f"return a tensor of {logits.shape[0]} token ids, one per row (got {type(out).__name__})")
        return out.reshape(-1).long()

    torch.manual_seed(0)
    spaced = torch.stack([torch.randperm(10).float() * 0.5 for _ in range(64)])   # gaps of at least 0.5
    argmax = spaced.argmax(-1)
    _require(torch.equal(draw(spaced.clone(), top_k=1), argmax), ex, "top_k=1 must always give the largest logit")
    _require(torch.equal(draw(spaced.clone(), temperature=1e-3), argmax), ex,
             "temperature 0.001 must give the largest logit (divide the logits by the temperature)")
    row = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    picks = draw(row.repeat(3000, 1), top_k=3)
    _require(set(picks.tolist()) == {0, 1, 2}, ex, f"top_k=3 must sample among the three largest logits only, and "
             f"each of them sometimes (drew {sorted(set(picks.tolist()))})")
    freqs = {}
    for t in (1.0, 2.0):
        f = torch.bincount(draw(row.repeat(40000, 1), temperature=t), minlength=5).float() / 40000
        want = F.softmax(row / t, -1)
        _require(float((f - want).abs().max()) < 0.015, ex, f"at temperature {t} the frequencies "
                 f"{[round(x, 3) for x in f.tolist()]} should follow softmax(logits / {t}) = "
                 f"{[round(x, 3) for x in want.tolist()]}")
        freqs[t] = f
    _correct(ex, f"greedy at top_k=1 and near temperature 0; at temperature 1 the top token comes "
                 f"{freqs[1.0][0]:.0%} of the time, at temperature 2 only {freqs[2.0][0]:.0%}.")


def check_exercise_01_3(count_params):
    """``count_params(n_layer, n_embd, vocab_size=258, block_size=40)``: the GPT's parameter count from its
    shapes alone (the output layer is tied to the token embedding). Checked against ``GPT.num_params()`` for
    five shapes, the cpu preset's among them."""
    ex = "01.3"
    shapes = [(3, 96, 258, 40), (1, 96, 258, 40), (2, 32, 258, 40), (6, 256, 258, 40), (4, 64, 100, 16)]
    for n_layer, n_embd, vocab, block in shapes:
        want = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, vocab_size=vocab, block_size=block)).num_params()
        got = _call(ex, count_params, n_layer, n_embd, vocab, block)
        _require(got == want, ex, f"n_layer={n_layer}, n_embd={n_embd}, vocab_size={vocab}, block_size={block}: you "
                 f"count {got}, the model has {want:,} (each block: two LayerNorms, attention's c_attn and c_proj, "
                 "the MLP's c_fc and c_proj, every Linear with a bias; the output layer shares the embedding's matrix)")
    cpu, one = count_params(3, 96, 258, 40), count_params(1, 96, 258, 40)
    _correct(ex, f"every shape matches. The cpu preset's {cpu:,} parameters fall to {one:,} with n_layer=1: each "
                 f"block holds {(cpu - one) // 2:,}, and with one block {1 - (cpu - one) / 2 / one:.0%} of what is "
                 "left is embeddings and norms.")


# --- 02 · the base model ------------------------------------------------------------------------------------------
def check_exercise_02_1(answer, records, keep=0.5):
    """``answer``: the highest learning rate among ``records`` (one full-SFT record per rate, from the base) whose
    ``base_gain_kept`` is at least ``keep``; None when none is. Checked against the records themselves, and the
    trade-off too: the lowest rate must keep more of the base than the highest (by 0.1 at least)."""
    ex = "02.1"
    _require(isinstance(records, (list, tuple)) and all(isinstance(r, dict) and "lm_loss" in r for r in records), ex,
             "pass the list of records your runs returned (one per learning rate)")
    rows = sorted((r["config"]["learning_rate"], record_metric(r, "base_gain_kept"), r) for r in records)
    rates = [lr for lr, _, _ in rows]
    _require(len(set(rates)) >= 3 and rates[-1] >= 30 * rates[0], ex,
             f"train at least three rates spanning a factor of 30 or more (got {rates})")
    _require(all(r.get("base") for _, _, r in rows), ex, "the runs must start from the base (init='base', the default)")
    expected = max((lr for lr, kept, _ in rows if kept >= keep), default=None)
    print(" rate     base's held-out loss (nats/byte)   gain kept")
    for lr, kept, r in rows:
        print(f" {lr:<8g} {record_metric(r, 'lm_loss_start'):.2f} -> {record_metric(r, 'lm_loss_final'):.2f}"
              f"{'':22}{kept:+.2f}{'   <- ' + str(lr) if lr == expected else ''}")
    _require(answer is None if expected is None else (answer is not None and math.isclose(answer, expected)), ex,
             f"your answer is {answer}; by these records the highest rate that keeps at least {keep:.0%} of the "
             f"base's gain is {expected}")
    _require(rows[0][1] > rows[-1][1] + 0.1, ex, f"the lowest rate should keep clearly more of the base than the "
             f"highest ({rows[0][1]:+.2f} vs {rows[-1][1]:+.2f}): train them from the same base, as many steps each")
    _correct(ex, f"{expected:g} is the highest of these rates that keeps at least {keep:.0%} of the base's gain over a "
                 f"uniform guess; at {rates[-1]:g} SFT keeps {rows[-1][1]:+.2f} of it." if expected is not None else
             f"none of these rates keeps {keep:.0%} of the base's gain: try lower ones.")


def check_exercise_02_2(heldout_loss):
    """``heldout_loss(model, windows)``: mean next-byte cross-entropy in nats per byte over ``windows`` (N, 41) --
    inputs ``w[:, :40]``, targets ``w[:, 1:]``. Checked against :func:`epi_mini.pretrain.lm_loss` within 1e-3, on
    the tiny preset's base and on the same model with random weights."""
    ex = "02.2"
    windows = read_windows(HELDOUT_FILE)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32))
    found = {}
    for what in ("random weights", "the tiny base"):
        if what == "the tiny base":
            load_base(model, BASE_DIR / "tiny.pt")
        want = lm_loss(model, windows)
        with torch.no_grad():
            got = _call(ex, heldout_loss, model, windows)
        _require(_close(got, want, 1e-3), ex, f"with {what} you give {float(got):.4f} nats/byte, lm_loss gives "
                 f"{want:.4f}: cross-entropy of w[:, 1:] given w[:, :40], averaged over every byte of every window")
        found[what] = want
    uniform = math.log(258)
    _correct(ex, f"random weights score {found['random weights']:.2f} nats/byte (a uniform guess: ln 258 = "
                 f"{uniform:.2f}); the tiny base {found['the tiny base']:.2f}, i.e. "
                 f"{found['the tiny base'] / math.log(2):.2f} bits per byte, where a uniform guess needs 8.01.")


# --- 03 · tasks and mixtures --------------------------------------------------------------------------------------
def check_exercise_03_1(task):
    """``task``: a sixth task family (an instance or subclass of :class:`~epi_mini.tasks.Task`). Checked: a new
    name and prompt tag; ``<tag> <input>=`` prompts; the same seed gives the same examples; at least 50 distinct
    prompts in 500; every example fits the model's 40-token context with its end token; the reference answer
    scores 1, a wrong one less, and every score is in [0, 1]; a stream can mix it with ``code``."""
    ex = "03.1"
    task = task() if isinstance(task, type) else task
    _require(isinstance(task, Task), ex, "subclass epi_mini.tasks.Task")
    _require(isinstance(task.name, str) and task.name and task.name not in BUILTIN_TASKS, ex,
             f"give it a name of its own (not one of {sorted(BUILTIN_TASKS)}), got {task.name!r}")
    _require(bool(task.description), ex, "give it a one-line description")
    examples = _call(ex, task.examples, 500, seed=0)
    _require(all(isinstance(e, Example) and e.task == task.name for e in examples), ex,
             f"sample() must return Example(task={task.name!r}, prompt, response)")
    _require(examples == task.examples(500, seed=0) and examples != task.examples(500, seed=1), ex,
             "draw everything from the rng that sample(rng) is given: the same seed, the same examples")
    tags = {t.examples(1, seed=0)[0].prompt.split(" ")[0] for t in BUILTIN_TASKS.values()}
    bad = [e.prompt for e in examples if not re.fullmatch(r"\S+ \S.*=", e.prompt)]
    _require(not bad, ex, f"prompts must look like '<tag> <input>=', e.g. {bad[:2]}")
    tag = examples[0].prompt.split(" ")[0]
    _require(tag not in tags and all(e.prompt.startswith(tag + " ") for e in examples), ex,
             f"use one tag of your own for every prompt (taken: {sorted(tags)})")
    distinct = len({e.prompt for e in examples})
    _require(distinct >= 50, ex, f"only {distinct} distinct prompts in 500: a model could memorise them")
    tok = byte_tokenizer()
    lengths = [len(encode_example(tok, e)[0]) for e in examples]
    _require(max(lengths) <= 41, ex, f"an example is {max(lengths)} tokens long; prompt + response + end must fit in "
                                     "block_size + 1 = 41")
    for e in examples[:100]:
        right, wrong = task.score(e.response, e), task.score(e.response + "?", e)
        _require(right == 1.0 and 0.0 <= wrong < 1.0, ex, f"score({e.response!r}) should be 1 and a wrong answer "
                 f"score less (got {right} and {wrong} for {e.prompt!r})")
    tasks = {**BUILTIN_TASKS, task.name: task}
    schedule = make_schedule("two_task", 10, tasks=(task.name, "code"))
    batch = MixtureStream(schedule, tasks, tok, 16, 40).batch(0)
    _require(set(batch.tasks) == {task.name}, ex, "a stream over your task should give batches of it")
    _correct(ex, f"{task.name!r}: {distinct} distinct prompts in 500, {min(lengths)}-{max(lengths)} tokens each, "
                 f"e.g. {examples[0].prompt!r} -> {examples[0].response!r}.")


def check_exercise_03_2(schedule):
    """``schedule``: a :class:`~epi_mini.data.Schedule` whose stages overlap -- a later stage's mixture still holds a
    task of the stage before it, beside a task of its own. Checked: the overlap, weights that sum to 1, and the
    task shares of at least 4,000 examples of the overlapping stage against its sampling weights (within 0.05)."""
    ex = "03.2"
    _require(isinstance(schedule, Schedule) and len(schedule.stages) >= 2, ex,
             "return an epi_mini.data.Schedule with at least two stages")
    unknown = [t for t in schedule.tasks if t not in BUILTIN_TASKS]
    _require(not unknown, ex, f"use the built-in tasks ({sorted(BUILTIN_TASKS)}); unknown: {unknown}")
    overlap = None
    for i in range(1, len(schedule.stages)):
        before = {t for t, w in schedule.stages[i - 1].mixture.items() if w > 0}
        now = {t for t, w in schedule.stages[i].mixture.items() if w > 0}
        if before & now and schedule.new_tasks(i):
            overlap = i
            break
    _require(overlap is not None, ex, "no stage both keeps a task of the stage before it in its mixture and brings "
                                      "a new one")
    for i in range(len(schedule.stages)):
        print(f" stage {i} ({schedule.stages[i].steps} steps): " + ", ".join(
            f"{t} {p:.2f}" for t, p in schedule.sampling_weights(i).items()) + f"   new: {schedule.new_tasks(i)}")
        _require(abs(sum(schedule.sampling_weights(i).values()) - 1) < 1e-9, ex, f"stage {i}'s weights do not sum to 1")
    start = ([0] + schedule.boundaries)[overlap]
    stream = MixtureStream(schedule, BUILTIN_TASKS, byte_tokenizer(), 64, 40)
    counts = {}
    for step in range(start, min(start + 5, schedule.boundaries[overlap])):   # 4,000 examples a step
        for t in stream.examples(step, n=4000):
            counts[t.task] = counts.get(t.task, 0) + 1
    total = sum(counts.values())
    for t, p in schedule.sampling_weights(overlap).items():
        _require(abs(counts.get(t, 0) / total - p) < 0.05, ex, f"{t}'s share of stage {overlap}'s batches is "
                 f"{counts.get(t, 0) / total:.3f}, its weight {p:.3f}")
    kept = sorted({t for t, w in schedule.stages[overlap - 1].mixture.items() if w > 0}
                  & {t for t, w in schedule.stages[overlap].mixture.items() if w > 0})
    _correct(ex, f"stage {overlap} keeps training {kept} beside its new {schedule.new_tasks(overlap)}; the batches "
                 "follow the weights. Plasticity counts only the new tasks there: the kept ones are not new.")


def check_exercise_03_3(distinct_prompts, memorisable):
    """``distinct_prompts(task, n)``: how many distinct prompts ``task.examples(n, seed=0)`` holds; ``memorisable``:
    the set of built-in families with fewer than 2,000 distinct prompts among 20,000 examples. Checked against the
    count for every family at n = 1,000 and 20,000."""
    ex = "03.3"
    table = {}
    for name, task in BUILTIN_TASKS.items():
        for n in (1000, 20000):
            want = len({e.prompt for e in task.examples(n, seed=0)})
            got = _call(ex, distinct_prompts, task, n)
            _require(got == want, ex, f"{name}, n={n}: you count {got}, there are {want} distinct prompts among "
                                      f"task.examples({n}, seed=0)")
            table[name, n] = want
    few = {name for name in BUILTIN_TASKS if table[name, 20000] < 2000}
    _require(set(memorisable or ()) == few, ex, f"memorisable should be {sorted(few)} by your own counts, got "
                                                f"{sorted(memorisable or ())}")
    for name in BUILTIN_TASKS:
        print(f" {name:<12} {table[name, 1000]:>6} distinct of 1,000   {table[name, 20000]:>6} of 20,000")
    _correct(ex, f"{sorted(few)}: its prompts run out (about a thousand in all, 200 of them held out for "
                 "evaluation), so training sees the same ones again and again; the others keep producing new ones.")


# --- 04 · forgetting ----------------------------------------------------------------------------------------------
def check_exercise_04_1(forgetting_fn, bwt_fn):
    """``forgetting_fn(R, first_stage)`` and ``bwt_fn(R, first_stage)``: forgetting (best score before the last
    stage minus the final score) and backward transfer (final score minus the score at the end of the task's own
    stage), each averaged over the tasks introduced before the last stage, 0.0 when there are none. Checked against
    :mod:`epi_mini.metrics` on 200 random accuracy matrices."""
    ex = "04.1"
    rng = np.random.default_rng(0)
    cases = [(np.array([[0.5, 0.0, 0.0], [0.8, 0.3, 0.1], [0.4, 0.6, 0.7]]), [0, 1, 2]),
             (np.array([[0.2, 0.3], [0.4, 0.5]]), [1, 1])]                       # nothing before the last stage
    for _ in range(200):
        stages, tasks = rng.integers(2, 5), rng.integers(1, 5)
        cases.append((rng.random((stages, tasks)), sorted(rng.integers(0, stages, tasks).tolist())))
    for R, first in cases:
        for name, fn, ref in (("forgetting", forgetting_fn, forgetting), ("BWT", bwt_fn, backward_transfer)):
            got, want = _call(ex, fn, R.copy(), list(first)), ref(R, first)
            _require(_close(got, want, 1e-9), ex, f"{name} of R={np.round(R, 2).tolist()}, first_stage={first}: you "
                     f"give {got}, it is {want:.4f}")
    R, first = cases[0]
    _correct(ex, f"both match on 202 matrices. On {R.tolist()}: forgetting {forgetting(R, first):+.2f} (task 0 "
                 f"fell from its best, 0.8), BWT {backward_transfer(R, first):+.2f} (measured from the end of each "
                 "task's own stage, where task 0 stood at 0.5): one says something was lost, the other that the "
                 "earlier tasks gained.")


def check_exercise_04_2(rises):
    """``rises``: replay share -> how much task A's held-out loss rose during stage 2 (end of training minus end of
    stage 1), for replay 0.0 and 0.5 at least (0.05 too, if you measured it). Checked: without replay the loss
    rises (by more than 0.1 nats), and by at least 0.3 more than with half of every batch replaying A; 5% replay,
    if given, lies below no replay."""
    ex = "04.2"
    _require(isinstance(rises, dict) and {0.0, 0.5} <= set(rises), ex, "pass a dict {replay: rise} with 0.0 and 0.5")
    _require(all(isinstance(v, (int, float)) and math.isfinite(v) for v in rises.values()), ex,
             f"every rise should be a finite number, got {rises}")
    for replay in sorted(rises):
        print(f" replay {replay:<5} A's held-out loss rose by {rises[replay]:+.3f} nats during stage 2")
    _require(rises[0.0] > 0.1, ex, f"without replay A's loss should rise during stage 2, you measured "
                                   f"{rises[0.0]:+.3f}: take the loss at the end of stage 1 and at the end of training")
    _require(rises[0.0] > rises[0.5] + 0.3, ex, "replaying A in half of every batch should keep its loss far lower "
             f"than no replay does ({rises[0.5]:+.3f} vs {rises[0.0]:+.3f})")
    if 0.05 in rises:
        _require(rises[0.05] < rises[0.0], ex, "even 5% replay should keep A's loss below no replay's")
    small = f" 5% replay already removes {1 - rises[0.05] / rises[0.0]:.0%} of the rise." if 0.05 in rises else ""
    _correct(ex, f"without replay A's loss rises by {rises[0.0]:.2f} nats; with 50% replay by "
                 f"{rises[0.5]:+.2f}.{small}")


# --- 05 · importance drift ----------------------------------------------------------------------------------------
def check_exercise_05_1(importance):
    """``importance(param, grad)``: a per-entry importance score (a tensor shaped like ``param``, finite, >= 0) that
    is not EPI's own. Checked on random tensors; then EPI runs 20 SFT steps of the tiny preset's base with it and
    with the default ``g**2`` (same batches, rho = 0.3), and the check prints which layers each one isolates. It
    fails if your score selects exactly EPI's set."""
    ex = "05.1"
    torch.manual_seed(0)
    p, g = torch.randn(8, 5), torch.randn(8, 5)
    s = _call(ex, importance, p, g)
    _require(isinstance(s, torch.Tensor) and s.shape == p.shape, ex,
             f"return a tensor shaped like param {tuple(p.shape)}")
    _require(bool(torch.isfinite(s).all()) and bool((s >= 0).all()), ex, "scores must be finite and >= 0")
    sets = {}
    for label, fn in (("g**2 (EPI)", "squared_gradient"), ("yours", importance)):
        run = Run(make_config("tiny", schedule="two_task", tasks=("chat", "code"), steps_per_stage=10, eval_size=1))
        epi = EPIUpdate(run.model, isolation_ratio=0.3, mask_interval=5, warmup_steps=5, importance=fn)
        for step in range(20):
            sft_step(run.loss_on, run.batch(step), run.model.parameters(), run.optimizer, epi, run.cfg.grad_clip)
        _require(abs(epi.isolated_fraction() - 0.3) < 1e-3, ex, "EPI with your score should isolate 30% of the weights")
        sets[label] = epi.isolated
    overlap = jaccard(sets["g**2 (EPI)"], sets["yours"])
    groups = sorted({layer_group(n) for n in sets["yours"]}, key=lambda x: (not x.startswith("emb"), x))
    print(f" share of the isolated set      {'g**2 (EPI)':>12} {'yours':>8}")
    for group in groups:
        shares = [sum(int(m.sum()) for n, m in sets[k].items() if layer_group(n) == group) /
                  sum(int(m.sum()) for m in sets[k].values()) for k in ("g**2 (EPI)", "yours")]
        print(f" {group:<30} {shares[0]:>12.2f} {shares[1]:>8.2f}")
    _require(overlap < 0.999, ex, "your score isolates exactly the set EPI's g**2 does: write another one "
                                  "(|g|, |g * theta|, ...)")
    _correct(ex, f"your score works inside EPI; its set overlaps g**2's with Jaccard {overlap:.2f} (two random sets "
                 f"of 30%: {0.3 / 1.7:.2f}).")


def check_exercise_05_2(summaries):
    """``summaries``: ema_beta -> ``DriftRecorder.summary()`` of an EPI run, for 0.9 and 0.99 (same run
    otherwise). Checked: with the shorter memory (0.9) consecutive snapshots overlap less, by 0.03 at least (on
    the tiny preset's two-task stream: about 0.84 against 0.93); and in both, the first and last sets overlap
    less than consecutive ones (the set drifts either way)."""
    ex = "05.2"
    _require(isinstance(summaries, dict) and {0.9, 0.99} <= set(summaries), ex,
             "pass a dict {ema_beta: recorder.summary()} with 0.9 and 0.99")
    for beta in (0.9, 0.99):
        s = summaries[beta]
        _require(isinstance(s, dict) and "overlap_consecutive" in s, ex, f"summaries[{beta}] should be a "
                 "DriftRecorder's summary() (take at least two snapshots)")
        print(f" ema_beta {beta:<5} overlap consecutive {s['overlap_consecutive']:.2f}, first vs last "
              f"{s['overlap_first_last']:.2f} (chance {s['chance']:.2f})")
        _require(s["overlap_first_last"] < s["overlap_consecutive"], ex, f"with ema_beta={beta} the first and last "
                 "sets should overlap less than consecutive ones")
    short, long_ = summaries[0.9]["overlap_consecutive"], summaries[0.99]["overlap_consecutive"]
    _require(short < long_ - 0.03, ex, f"with a shorter memory consecutive sets should overlap less ({short:.2f} vs "
                                       f"{long_:.2f}): are the two runs the same apart from ema_beta?")
    _correct(ex, f"a ten-step memory (0.9) reshuffles more of the set between snapshots ({short:.2f} against "
                 f"{long_:.2f}): part of its drift is batch noise, not a change in what matters.")


# --- 06 · static isolation ----------------------------------------------------------------------------------------
def check_exercise_06_1(core_region_per_layer):
    """``core_region_per_layer(before, after, ratio)``: name -> bool mask of the top ``ratio`` entries of *each
    tensor* by ``|after - before|`` (CPI-FT's :func:`~epi_mini.baselines.core_region` takes them globally).
    Checked on three tensors whose updates differ in scale a hundredfold: every tensor gets its share (within one
    entry), and within a tensor no entry outside the core moved more than one inside it."""
    ex = "06.1"
    g = torch.Generator().manual_seed(0)
    scales = {"block.weight": 1.0, "block.bias": 0.1, "head.weight": 0.01}
    shapes = {"block.weight": (50, 40), "block.bias": (40,), "head.weight": (30, 20)}
    before = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    after = {n: w + scales[n] * torch.randn(w.shape, generator=g) for n, w in before.items()}
    ratio = 0.1
    got = _call(ex, core_region_per_layer, before, after, ratio)
    _require(isinstance(got, dict) and set(got) == set(before), ex, "return a dict name -> bool mask, one per tensor")
    for n, m in got.items():
        delta = (after[n] - before[n]).abs()
        _require(isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == delta.shape, ex,
                 f"{n}: the mask must be a bool tensor shaped {tuple(delta.shape)}")
        _require(abs(int(m.sum()) - ratio * m.numel()) <= 1, ex, f"{n}: {int(m.sum())} of {m.numel()} entries chosen, "
                 f"the core of each tensor is round({ratio} x {m.numel()}) = {round(ratio * m.numel())}")
        _require(bool(delta[m].min() >= delta[~m].max()), ex, f"{n}: an entry outside the core moved more than one "
                                                               "inside it: take the largest |after - before|")
    glob = core_region(before, after, ratio)
    print(f" {'tensor':<14} {'update scale':>12} {'global core':>12} {'per layer':>10}   (share of the tensor chosen)")
    for n in before:
        print(f" {n:<14} {scales[n]:>12g} {float(glob[n].float().mean()):>12.2f} {float(got[n].float().mean()):>10.2f}")
    biggest = float(glob["block.weight"].sum()) / sum(int(m.sum()) for m in glob.values())
    _correct(ex, f"a global core spends {biggest:.0%} of itself on the tensor that moved most; yours protects every "
                 "tensor equally.")


def check_exercise_06_2(fractions, pipeline):
    """``fractions``: the frozen fraction at the start of every stage of ``pipeline``'s schedule (a CPI-FT
    :class:`~epi_mini.baselines.CoreRegionPipeline`, after ``pipeline.begin_stage(i)``). Checked against the union
    of the cores of the tasks introduced before each stage, counted here; and it must lie between the largest of
    those cores and their sum."""
    ex = "06.2"
    schedule = pipeline.run.schedule
    first = schedule.first_stage()
    _require(isinstance(fractions, (list, tuple)) and len(fractions) == len(schedule.stages), ex,
             f"give one fraction per stage ({len(schedule.stages)})")
    total = sum(p.numel() for p in pipeline.params.values())
    size = {t: sum(int(m.sum()) for m in core.values()) / total for t, core in pipeline.cores.items()}
    print(f" {'stage':<24} {'frozen':>7} {'largest core':>13} {'sum of cores':>13}")
    for i, got in enumerate(fractions):
        earlier = [t for t in pipeline.cores if first[t] < i]
        union = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in pipeline.params.items()}
        for t in earlier:
            union = {n: u | pipeline.cores[t][n] for n, u in union.items()}
        want = sum(int(m.sum()) for m in union.values()) / total
        low, high = max((size[t] for t in earlier), default=0.0), sum(size[t] for t in earlier)
        print(f" {i} {schedule.stages[i].name:<22} {float(got):>7.3f} {low:>13.3f} {high:>13.3f}")
        _require(_close(got, want, 1e-9), ex, f"stage {i}: you give {float(got):.4f}; the cores of {earlier} cover "
                 f"{want:.4f} of the weights (call begin_stage({i}), then isolated_fraction())")
        _require(low - 1e-9 <= want <= high + 1e-9, ex, "the union of cores lies between the largest and their sum")
    last = len(fractions) - 1
    earlier = [t for t in pipeline.cores if first[t] < last]
    _correct(ex, f"the frozen share only grows, to {fractions[-1]:.3f} in the last stage: less than the "
                 f"{sum(size[t] for t in earlier):.3f} of {len(earlier)} disjoint cores, because the cores overlap.")


# --- 07 · EPI -----------------------------------------------------------------------------------------------------
def _random_gradient_run(cls, margin=None, steps=60):
    """Train :func:`_toy_model` with a strategy of class ``cls`` (rho 0.2, K 2, beta 0.9, 4 warm-up steps) on a fixed
    stream of random gradients (each entry's own scale times noise); returns (strategy, the isolated sets after each
    refresh, how many isolated entries moved)."""
    model = _toy_model()
    strategy = cls(model, isolation_ratio=0.2, mask_interval=2, warmup_steps=4, ema_beta=0.9)
    if margin is not None:
        strategy.margin = margin
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    scale = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    sets, moved = [], 0
    for _ in range(steps):
        for n, p in model.named_parameters():
            p.grad = scale[n] * torch.randn(p.shape, generator=g)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        refreshes = len(strategy.history)
        strategy.step(opt)
        moved += sum(int((p.detach() != before[n])[strategy.isolated[n]].sum()) for n, p in model.named_parameters())
        if len(strategy.history) > refreshes:
            sets.append({n: i.clone() for n, i in strategy.isolated_indices().items()})
    return strategy, sets, moved


def check_exercise_07_1(cls):
    """``cls``: a subclass of :class:`~epi_mini.methods.EPIUpdate` with a class attribute ``margin`` and a
    ``select()`` with hysteresis: an isolated weight is released only when a newcomer beats it by more than
    ``margin``. Checked on a toy model fed random gradients, against EPI on the same stream: the set is still
    exactly rho after every refresh and isolated weights never move; with ``margin = 0`` it is EPI, refresh by
    refresh; with ``margin = 0.5`` consecutive sets overlap more than EPI's (median Jaccard, by 0.05 at least)."""
    ex = "07.1"
    _require(isinstance(cls, type) and issubclass(cls, EPIUpdate), ex, "write a subclass of epi_mini.methods.EPIUpdate")
    _require(isinstance(getattr(cls, "margin", None), (int, float)), ex, "give the class a number attribute margin")
    epi, epi_sets, _ = _random_gradient_run(EPIUpdate)
    zero, zero_sets, _ = _call(ex, _random_gradient_run, cls, margin=0.0)
    _require(len(zero_sets) == len(epi_sets) and all(
        set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(zero_sets, epi_sets)), ex,
        "with margin = 0 your select() should choose exactly EPI's set at every refresh")
    sticky, _, moved = _random_gradient_run(cls, margin=0.5)
    _require(all(abs(h["isolated_fraction"] - 0.2) < 1e-3 for h in sticky.history), ex,
             f"after every refresh exactly rho = 0.2 should be isolated, got "
             f"{sorted({round(h['isolated_fraction'], 3) for h in sticky.history})}")
    _require(moved == 0, ex, f"{moved} isolated entries moved: keep EPI's masked step (override select() only)")
    median = lambda s: float(np.median([h["jaccard_previous"] for h in s.history[1:]]))  # noqa: E731
    _require(median(sticky) > median(epi) + 0.05, ex, f"with margin 0.5 consecutive sets should overlap more than "
             f"EPI's (median Jaccard {median(sticky):.2f} vs {median(epi):.2f}): give the isolated weights a head "
             "start")
    _correct(ex, f"with margin 0 your method is EPI; with 0.5 consecutive sets overlap {median(sticky):.2f} (median "
                 f"Jaccard) against EPI's {median(epi):.2f} on the same random gradients, still exactly 20% isolated.")


def check_exercise_07_2(refreshes):
    """``refreshes(total_steps, warmup_steps, mask_interval)``: how many refreshes EPI makes in a run of
    ``total_steps`` steps. Checked against a real :class:`~epi_mini.epi.EvolvingIsolation` for 19 combinations, the
    lesson's (500 steps, 50 warm-up, K = 20) among them."""
    ex = "07.2"
    combos = [(t, w, k) for t in (37, 120) for w in (0, 5, 50) for k in (1, 7, 20)] + [(500, 50, 20)]
    layer = nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    for total, warmup, k in combos:
        epi = EvolvingIsolation(layer, isolation_ratio=0.5, mask_interval=k, warmup_steps=warmup)
        for _ in range(total):
            for p in layer.parameters():
                p.grad = torch.ones_like(p)
            epi.step(opt)
        got = _call(ex, refreshes, total, warmup, k)
        _require(got == len(epi.history), ex, f"{total} steps, {warmup} warm-up, K = {k}: you predict {got}, EPI "
                 f"refreshed {len(epi.history)} times (the first refresh is at step warmup + 1, then every K steps)")
    _correct(ex, f"all 19 match. The lesson's runs: {refreshes(500, 50, 20)} refreshes; K = 1 would make "
                 f"{refreshes(500, 50, 1)}, K = 200 only {refreshes(500, 50, 200)}.")


def check_exercise_07_3(moved_fraction):
    """``moved_fraction(make_optimizer)``: the naive freeze of notebook 07 as a function -- a ``Linear(16, 16)``
    trained 5 steps with ``make_optimizer(parameters)``, then 5 more with half of its weight's gradient entries
    zeroed; return the share of those entries that moved anyway. Checked: plain SGD (no momentum, no weight decay) moves
    none; SGD with momentum, SGD with weight decay, Adam and AdamW move more than 90% of them."""
    ex = "07.3"
    optimizers = {"SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
                  "SGD, momentum 0.9": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                  "SGD, weight decay 0.1": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1),
                  "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
                  "AdamW, weight decay 0.1": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}
    found = {}
    for name, make in optimizers.items():
        found[name] = got = _call(ex, moved_fraction, make)
        print(f" {name:<24} {float(got):.0%} of the 'frozen' weights moved")
        if name == "SGD":
            _require(got == 0, ex, "with plain SGD a zero gradient means no update: none should move")
        else:
            _require(got > 0.9, ex, f"with {name} nearly every 'frozen' weight should still move (momentum or decay)")
    _correct(ex, "only plain SGD is frozen by a zero gradient; momentum carries the past, weight decay shrinks the "
                 "weight, and Adam's moments do both: that is why EPI masks the optimizer's whole step.")


# --- 08 · ablations -----------------------------------------------------------------------------------------------
def check_exercise_08_1(churn):
    """``churn``: label -> the median Jaccard overlap of each refreshed set with the previous one in an EPI run, for
    ``"default"``, ``"ema_beta=0.9"`` and ``"mask_interval=25"`` (the run otherwise the same). Checked: a shorter
    memory churns more (lower overlap, by 0.03 at least; about 0.86 against 0.93 on the tiny two-task stream), and
    five times fewer refreshes churn more still (by 0.1 at least; about 0.70)."""
    ex = "08.1"
    need = ("default", "ema_beta=0.9", "mask_interval=25")
    _require(isinstance(churn, dict) and set(need) <= set(churn), ex, f"pass a dict with the keys {need}")
    for label in need:
        _require(isinstance(churn[label], float) and 0 <= churn[label] <= 1, ex,
                 f"churn[{label!r}] should be a Jaccard overlap in [0, 1], got {churn[label]!r}")
        print(f" {label:<18} median overlap with the previous set {churn[label]:.2f}")
    _require(churn["ema_beta=0.9"] < churn["default"] - 0.03, ex, "a shorter memory (ema_beta=0.9) should churn more "
                                                                  "than the default")
    _require(churn["mask_interval=25"] < churn["default"] - 0.1, ex, "refreshing five times less often should move the "
                                                                     "set further between refreshes")
    _correct(ex, "both knobs set how fast the isolated set churns, mechanically: beta by how much of the past the "
                 "score remembers, K by how many steps pass between two looks at it.")


def check_exercise_08_2(paired_interval):
    """``paired_interval(a, b)``: ``(mean, low, high)``, the mean of the per-seed differences ``a - b`` and its
    two-sided 95% Student-t interval. Checked against :func:`epi_mini.metrics.paired_difference` on 60 random
    pairs of 2 to 12 seeds; then an example shows what pairing buys."""
    ex = "08.2"
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(2, 13))
        a, b = rng.random(n), rng.random(n)
        d = paired_difference(a, b)
        got = _call(ex, paired_interval, a.tolist(), b.tolist())
        _require(isinstance(got, (tuple, list)) and len(got) == 3, ex, "return (mean, low, high)")
        _require(all(_close(x, y, 1e-9) for x, y in zip(got, (d["mean"], d["low"], d["high"]))), ex,
                 f"for {n} seeds you give {tuple(round(float(x), 4) for x in got)}, the interval is "
                 f"({d['mean']:.4f}, {d['low']:.4f}, {d['high']:.4f}): mean of the differences +- "
                 "t_975(n - 1) x their standard deviation (ddof=1) / sqrt(n)")
    a = [0.50, 0.62, 0.41, 0.70, 0.55]
    b = [x - 0.03 + e for x, e in zip(a, (0.004, -0.006, 0.002, -0.003, 0.005))]
    mean, low, high = paired_interval(a, b)
    pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2) * math.sqrt(2 / len(a))
    half = t_975(2 * len(a) - 2) * pooled
    _correct(ex, f"on five seeds where a beats b by 0.03 but the seeds differ by 0.3, the paired interval is "
                 f"[{low:+.3f}, {high:+.3f}] (separated); ignoring the pairing it would be [{mean - half:+.3f}, "
                 f"{mean + half:+.3f}]: the seed-to-seed spread swamps the difference.")


# --- 11 · EPI in your own loop ------------------------------------------------------------------------------------
def check_exercise_11_1(train_accumulating):
    """``train_accumulating(model, optimizer, isolation, batches, loss_fn, accumulate)``: gradient accumulation with
    EPI -- ``accumulate`` micro-batches' gradients summed (each loss divided by ``accumulate``), then one
    ``isolation.step(optimizer)`` and the gradients cleared; returns one loss per optimizer step. Checked on a toy
    regression: EPI sees one step per ``accumulate`` micro-batches, isolated weights never move, the loss falls,
    and the weights match a reference loop's within 1e-5."""
    ex = "11.1"
    batches, accumulate = _toy_batches(64), 4

    def build():
        model = _toy_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, opt, EvolvingIsolation(model, isolation_ratio=0.2, mask_interval=4, warmup_steps=4)

    model, opt, iso = build()
    step, moved = iso.step, [0]

    def watched_step(optimizer, closure=None):   # what the student's loop calls: counted and checked
        before = {n: p.detach().clone() for n, p in iso.params.items()}
        out = step(optimizer, closure)
        moved[0] += sum(int((p.detach() != before[n])[iso.isolated[n]].sum()) for n, p in iso.params.items())
        return out
    iso.step = watched_step
    losses = _call(ex, train_accumulating, model, opt, iso, batches, _toy_loss, accumulate)
    steps = len(batches) // accumulate
    _require(iso.num_steps == steps, ex, f"EPI saw {iso.num_steps} optimizer steps; with {len(batches)} micro-batches "
             f"accumulated {accumulate} at a time there are {steps}: call isolation.step(optimizer) once per "
             "optimizer step, after the last micro-batch's backward")
    _require(moved[0] == 0 and len(iso.history) == 3, ex, f"{moved[0]} isolated entries moved; refreshes "
             f"{len(iso.history)} (expected 3)")
    _require(isinstance(losses, (list, tuple)) and len(losses) == steps, ex, f"return one loss per optimizer step "
                                                                            f"({steps}), got {losses!r:.60}")
    _require(float(losses[-1]) < 0.8 * float(losses[0]), ex,
             f"the loss should fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
    ref, ref_opt, ref_iso = build()
    for k in range(steps):
        for batch in batches[k * accumulate:(k + 1) * accumulate]:
            (_toy_loss(ref, batch) / accumulate).backward()
        ref_iso.step(ref_opt)
        ref_opt.zero_grad(set_to_none=True)
    gap = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    _require(gap < 1e-5, ex, f"your weights differ from the reference loop's by up to {gap:.1e}: sum the gradients of "
             "each group of micro-batches (zero them only after the step), in order")
    _correct(ex, f"{steps} optimizer steps from {len(batches)} micro-batches, 0 isolated entries moved, loss "
                 f"{float(losses[0]):.3f} -> {float(losses[-1]):.3f}; the same weights as the reference loop.")


def check_exercise_11_2(checkpoint, restore):
    """``checkpoint(model, optimizer, isolation)`` -> a state (anything ``torch.save`` can write) and ``restore(state,
    model, optimizer, isolation)``, which puts that state into fresh objects. Checked: a toy run trained 12 steps,
    checkpointed, written to bytes and read back, restored into a new model, optimizer and isolation and trained 12
    more ends bit for bit where 24 uninterrupted steps end: same weights, same refreshes, same isolated set."""
    ex = "11.2"
    batches = _toy_batches(24)

    def build():
        model = _toy_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, opt, EvolvingIsolation(model, isolation_ratio=0.2, mask_interval=4, warmup_steps=6)

    def train(model, opt, iso, part):
        for batch in part:
            opt.zero_grad(set_to_none=True)
            _toy_loss(model, batch).backward()
            iso.step(opt)

    whole = build()
    train(*whole, batches)
    first = build()
    train(*first, batches[:12])
    state = _call(ex, checkpoint, *first)
    buffer = io.BytesIO()
    torch.save(state, buffer)          # as if written to disk: nothing shared with the objects it came from
    buffer.seek(0)
    del first
    resumed = build()
    _call(ex, restore, torch.load(buffer, weights_only=False), *resumed)
    train(*resumed, batches[12:])
    model, _, iso = resumed
    _require([h["step"] for h in iso.history] == [h["step"] for h in whole[2].history], ex,
             f"EPI refreshed at steps {[h['step'] for h in iso.history]} after the resume, "
             f"{[h['step'] for h in whole[2].history]} without one: save and restore isolation.state_dict() too "
             "(without it, warm-up starts again)")
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), whole[0].parameters()))
    _require(same, ex, "the weights differ from the uninterrupted run's: save and restore the optimizer's state "
                       "(AdamW's moments and step count) as well as the model's")
    _require(all(torch.equal(iso.isolated[n], m) for n, m in whole[2].isolated.items()), ex,
             "the isolated set differs from the uninterrupted run's: restore the importance scores as well")
    _correct(ex, f"the resumed run ends bit for bit where the uninterrupted one does: refreshes at steps "
                 f"{[h['step'] for h in iso.history]}, the same isolated set, the same weights.")


CHECKS = {name: fn for name, fn in sorted(globals().items()) if name.startswith("check_exercise_")}
"""Every check, by name: the test of the course's exercises (``tests/test_exercises.py``) reads this."""
