"""Scoring a model on the held-out evaluation sets.

Exact-match tasks need no generation: under greedy decoding the model reproduces the reference response
exactly when, at every response position, the reference token is the argmax given the reference prefix
(by induction over positions). So one teacher-forced forward pass scores a whole set. Open-ended tasks
(``task.exact == False``) are scored on real greedy generations with the task's own scorer.

The evaluation sets live in ``data/eval/<task>.jsonl``; they are generated once by
:func:`write_eval_sets` (``python -m epi_mini.evaluate``) and committed, so every run, notebook and result
is measured on the same examples.
"""
import functools
import random
import sys
import zlib
from pathlib import Path

import torch

from .data import collate, encode_example
from .tasks import BUILTIN_TASKS, FileTask, load_jsonl, save_jsonl, tasks_from_jsonl

EVAL_DIR = Path(__file__).resolve().parent.parent / "data" / "eval"
EVAL_SIZES = {}  # task -> its set's size, where it is not the default (chat had 64 until its one stage's noise
DEFAULT_EVAL_SIZE = 200  # decided a headline: every family now has 200)


def make_eval_set(task, n=None):
    """``n`` examples of a built-in task with distinct prompts, from a seed derived from the task's name."""
    n = n or EVAL_SIZES.get(task.name, DEFAULT_EVAL_SIZE)
    rng = random.Random(zlib.crc32(f"eval/{task.name}".encode()))
    out, seen = [], set()
    while len(out) < n:
        ex = task.sample(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def write_eval_sets(folder=EVAL_DIR):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in BUILTIN_TASKS.values():
        save_jsonl(make_eval_set(task), folder / f"{task.name}.jsonl")


def load_eval_sets(tasks, size=0, folder=EVAL_DIR):
    """task name -> list of examples (the first ``size`` of each set; 0 = all). ``tasks``: name -> Task."""
    out = {}
    for name, task in tasks.items():
        if isinstance(task, FileTask):
            examples = task.heldout
        else:
            path = Path(folder) / f"{name}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"evaluation set {path} is missing; regenerate the committed sets with "
                                        "`python -m epi_mini.evaluate`")
            examples = load_jsonl(path)
        out[name] = examples[:size] if size else examples
    return out


def constant_answer_floor(task, examples) -> float:
    """The floor of a held-out set: the score of the one answer, among the set's reference answers, that does
    best on the whole set -- what a model reaches without reading the prompt (for logic, about chance)."""
    answers = {e.response for e in examples}
    return max(sum(task.score(answer, e) for e in examples) for answer in answers) / len(examples)


@functools.lru_cache(maxsize=None)
def eval_floors(task_names, eval_size=0, task_files=()) -> dict:
    """task -> :func:`constant_answer_floor` of the held-out set a run with these settings is scored on (its first
    ``eval_size`` examples; 0 = all); ``task_files``: the run's JSONL task files. Arguments are tuples (cached)."""
    tasks = dict(BUILTIN_TASKS)
    for path in task_files:
        tasks.update(tasks_from_jsonl(path))
    sets = load_eval_sets({t: tasks[t] for t in task_names}, eval_size)
    return {t: constant_answer_floor(tasks[t], examples) for t, examples in sets.items()}


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts, max_new_tokens=32):
    """Greedy continuations of ``prompts`` (up to the end token), batched by prompt length."""
    device = next(model.parameters()).device
    by_length = {}
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p)
        by_length.setdefault(len(ids), []).append((i, ids))
    out = [None] * len(prompts)
    for length, rows in by_length.items():
        idx = torch.tensor([ids for _, ids in rows], device=device)
        budget = min(max_new_tokens, model.config.block_size - length)
        gen = model.generate(idx, budget, temperature=0, end_token=tokenizer.eot_id)[:, length:]
        for (i, _), row in zip(rows, gen.tolist()):
            row = row[: row.index(tokenizer.eot_id)] if tokenizer.eot_id in row else row
            out[i] = tokenizer.decode(row)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, eval_sets, tasks):
    """Mean score per task in [0, 1]: name -> float. The model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {}
    for name, examples in eval_sets.items():
        task = tasks[name]
        if task.exact:
            batch = collate([encode_example(tokenizer, e) for e in examples], tokenizer, model.config.block_size)
            logits, _ = model(batch.x.to(device), batch.y.to(device))
            hit = (logits.argmax(-1) == batch.y.to(device)) | (batch.loss_mask.to(device) == 0)
            scores[name] = float(hit.all(dim=1).float().mean())
        else:
            longest = max(len(tokenizer.encode(e.response)) for e in examples) + 1
            generated = greedy_responses(model, tokenizer, [e.prompt for e in examples], longest + 8)
            scores[name] = sum(task.score(g, e) for g, e in zip(generated, examples)) / len(examples)
    model.train(was_training)
    return scores


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else EVAL_DIR
    write_eval_sets(folder)
    print(f"wrote {len(BUILTIN_TASKS)} evaluation sets to {folder}")
