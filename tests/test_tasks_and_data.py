"""Tests of task generators, scorers, JSONL loading, schedules and batches.
Run: python -m pytest tests/test_tasks_and_data.py -q"""
import collections
import json
import random
import re

import pytest
import torch

from epi_mini.config import make_config
from epi_mini.data import MixtureStream, Stage, collate, encode_example, make_schedule
from epi_mini.evaluate import EVAL_DIR, constant_answer_floor, eval_floors, load_eval_sets, make_eval_set
from epi_mini.tasks import BUILTIN_TASKS, DataFormatError, Example, load_jsonl, tasks_from_jsonl
from epi_mini.tokenizer import byte_tokenizer

TOK = byte_tokenizer()


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_generators_are_deterministic_and_right_answers_score_one(name):
    task = BUILTIN_TASKS[name]
    a, b = task.examples(50, seed=1), task.examples(50, seed=1)
    assert a == b and a != task.examples(50, seed=2)
    assert len({e.prompt for e in a}) > 10
    for ex in a:
        assert ex.task == name and ex.prompt.endswith("=")
        assert task.score(ex.response, ex) == 1.0       # the reference is always right
        assert task.score("", ex) == 0.0                # an empty answer always wrong
        assert task.score("zz9", ex) == 0.0


def test_every_family_shares_the_format_and_fits_the_cpu_block_size():
    block_size = make_config("cpu").block_size
    for name, task in BUILTIN_TASKS.items():
        for ex in task.examples(2000, seed=0):
            assert re.fullmatch(r"[a-z] [^=\s]+=", ex.prompt), ex        # <tag> <input>=
            assert re.fullmatch(r"[A-Za-z0-9 .]+", ex.response), ex       # letters, digits, spaces, a full stop
            assert len(encode_example(TOK, ex)[0]) <= block_size + 1, ex  # prompt + response + end token
    assert len({t.examples(1, seed=0)[0].prompt[0] for t in BUILTIN_TASKS.values()}) == len(BUILTIN_TASKS)


def test_exact_answers_are_correct():
    rng = random.Random(0)
    kinds, ops, forms = set(), set(), set()
    for _ in range(300):
        ex = BUILTIN_TASKS["math"].sample(rng)
        assert re.fullmatch(r"m \d\+\d-\d=|m \d[+-]\d=", ex.prompt), ex           # a+b-c, a+b or a-b
        assert int(ex.response) == eval(ex.prompt[2:-1]) >= 0                  # never negative
        forms.add(re.sub(r"\d", "", ex.prompt))
        ex = BUILTIN_TASKS["code"].sample(rng)
        assert str(eval(ex.prompt[2:-1])) == ex.response            # the expression is real Python
        kinds.add(re.sub(r"'[a-z]*'|\d", "", ex.prompt))             # e.g. "c max(,,)="
        ex = BUILTIN_TASKS["logic"].sample(rng)
        statements = ex.prompt[2:-1].split(",")
        assert [len(re.findall("[TF]", e)) for e in statements] == [2, 3] and len(ex.response) == 2
        for expr, answer in zip(statements, ex.response):
            py = expr.replace("!", " not ").replace("&", " and ").replace("|", " or ")
            py = py.replace("T", " True ").replace("F", " False ")
            assert answer == ("T" if eval(py) else "F")                 # Python's own precedence agrees
        ex = BUILTIN_TASKS["instruction"].sample(rng)
        op, arg = ex.prompt[2:-1].split(":")
        ops.add(op)
        expected = {"len": lambda w: str(len(w)), "max": lambda w: str(max(int(d) for d in w)),
                    "min": lambda w: str(min(int(d) for d in w)), "up": str.upper, "rev": lambda w: w[::-1]}[op]
        assert ex.response == expected(arg)
    assert len(kinds) == 6 and ops == {"len", "max", "min", "up", "rev"}
    assert forms == {"m +-=", "m +=", "m -="}


def test_logic_answers_are_balanced_so_chance_is_a_quarter():
    counts = collections.Counter(e.response for e in BUILTIN_TASKS["logic"].examples(4000, seed=0))
    assert set(counts) == {"TT", "TF", "FT", "FF"}
    assert all(0.22 < n / 4000 < 0.28 for n in counts.values()), counts


def test_chat_rubric_gives_partial_credit():
    task = BUILTIN_TASKS["chat"]
    assert not task.exact
    ex = Example("chat", "s cab=", "ant bee cat.")
    assert task.score("arm bus cow.", ex) == 1.0        # any known words with the right initials
    assert task.score("ant bee cat", ex) == 0.75        # no full stop
    assert task.score("cat ant bee.", ex) == 0.75       # the given letters, but not in alphabetical order
    assert task.score("ant bee cab.", ex) == 0.75       # "cab" is not a known word
    assert task.score("ant bee.", ex) == 0.25           # a word short: only "known words" holds
    assert task.score("gum oil sky.", ex) == 0.25       # ignoring the letters passes only the format check
    assert task.score("fox", ex) == 0.0
    twice = Example("chat", "s aba=", "ant art bee.")
    assert task.score("arm art bus.", twice) == 1.0
    assert task.score("ant ant bee.", twice) == 0.75    # a repeated letter needs two different words
    assert task.score("ant bee.", twice) == 0.25


def test_chat_prompt_space_is_far_larger_than_its_heldout_set():
    task = BUILTIN_TASKS["chat"]
    drawn = task.examples(5000, seed=0)
    assert len({e.prompt for e in drawn}) > 0.95 * len(drawn)        # almost never the same prompt twice
    doubled = sum(len(set(e.prompt[2:-1])) < len(e.prompt[2:-1]) for e in drawn) / len(drawn)
    assert 0.55 < doubled < 0.75                                     # most prompts give some letter twice
    held = {e.prompt for e in make_eval_set(task)}
    assert sum(e.prompt in held for e in drawn) < 0.01 * len(drawn)  # redrawing held-out prompts is rare
    for ex in drawn[:500]:                                          # the reference obeys its own rubric
        assert all(task.rubric(ex.response, ex).values()), ex


def test_committed_eval_sets_match_the_generators():
    for name, task in BUILTIN_TASKS.items():
        committed = load_jsonl(EVAL_DIR / f"{name}.jsonl")
        assert committed == make_eval_set(task), f"data/eval/{name}.jsonl is stale: python -m epi_mini.evaluate"
        assert len({e.prompt for e in committed}) == len(committed)


def test_data_readme_quotes_the_floor_of_each_committed_set():
    rows = re.findall(r"^\| `(\w+)\.jsonl` \| (\d+) \|.*\| ([\d.]+) \|$",
                      (EVAL_DIR.parent / "README.md").read_text(), re.M)
    assert [name for name, _, _ in rows] == list(BUILTIN_TASKS), rows
    for name, n, quoted in rows:
        committed = load_jsonl(EVAL_DIR / f"{name}.jsonl")
        assert len(committed) == int(n)
        assert f"{constant_answer_floor(BUILTIN_TASKS[name], committed):.3f}" == quoted, name
    # what the tables of python -m epi_mini mark: the floor of the set a run is scored on (here: all of it)
    assert {t: f"{f:.3f}" for t, f in eval_floors(tuple(BUILTIN_TASKS)).items()} == {n: q for n, _, q in rows}


def test_the_floor_is_that_of_the_examples_a_run_is_scored_on():
    logic = BUILTIN_TASKS["logic"]
    first = load_jsonl(EVAL_DIR / "logic.jsonl")[:8]
    assert eval_floors(("logic",), 8)["logic"] == constant_answer_floor(logic, first)
    one = [Example("logic", "l T&F,T|F|F=", "FT")] * 3 + [Example("logic", "l F,T=", "FT")]
    assert constant_answer_floor(logic, one) == 1.0          # one answer right everywhere: the floor is the ceiling


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"task": "t", "prompt": "p"}', "missing field"),
    ('{"task": "t", "prompt": "p", "respone": "r"}', "missing field"),
    ('{"task": "t", "prompt": "p", "response": "r", "extra": 1}', "unknown field"),
    ('{"task": "t", "prompt": "", "response": "r"}', "non-empty string"),
    ('{"task": "t", "prompt": "p", "response": 3}', "non-empty string"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"task": "t", "prompt": "a=", "response": "b"}\n\n' + line + "\n")
    with pytest.raises(DataFormatError, match=rf"mine.jsonl:3: .*{message}"):
        load_jsonl(path)


def test_jsonl_tasks_hold_out_every_tenth_example(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"task": "echo", "prompt": f"e {i}=", "response": str(i)}) + "\n"
                            for i in range(30)))
    task = tasks_from_jsonl(path)["echo"]
    assert [e.response for e in task.heldout] == ["0", "10", "20"]
    assert len(task.pool) == 27 and not set(task.heldout) & set(task.pool)
    assert load_eval_sets({"echo": task})["echo"] == task.heldout
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_collate_masks_exactly_the_response_and_end_token():
    ex = Example("math", "m 1+2-0=", "3")
    batch = collate([encode_example(TOK, ex), encode_example(TOK, Example("x", "ab=", "cdef"))], TOK, 40)
    ids, n_prompt = encode_example(TOK, ex)
    assert batch.x.shape == batch.y.shape == batch.loss_mask.shape == (2, 8 + 1 + 1 - 1)  # 8 prompt + "3" + end, shifted by one
    targets = batch.y[0][batch.loss_mask[0] == 1].tolist()
    assert targets == TOK.encode("3") + [TOK.eot_id]
    assert TOK.decode(batch.y[1][batch.loss_mask[1] == 1].tolist()) == "cdef"
    assert batch.loss_mask[1].sum() == 5 and (batch.y[1][batch.loss_mask[1] == 0][-1] == TOK.pad_id)
    with pytest.raises(ValueError, match="block_size"):
        collate([encode_example(TOK, ex)], TOK, 4, ["math"])


def test_schedules_and_replay_weights():
    s = make_schedule("shifting", 10)
    assert [st.name for st in s.stages] == ["math+code", "logic+instruction", "chat"]
    assert s.boundaries == [10, 20, 30] and s.tasks == list(BUILTIN_TASKS)
    w = s.sampling_weights(2)
    assert w["chat"] == pytest.approx(0.8) and w["math"] == pytest.approx(0.05)
    assert sum(w.values()) == pytest.approx(1.0)
    assert s.without_replay().sampling_weights(2) == {"chat": 1.0}
    assert make_schedule("multitask", 10).total_steps == 30
    assert [st.name for st in make_schedule("sequential", 5).stages] == list(BUILTIN_TASKS)
    assert make_schedule("two_task", 5, tasks=["code", "math"]).tasks == ["code", "math"]
    assert s.first_stage() == {"math": 0, "code": 0, "logic": 1, "instruction": 1, "chat": 2}
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zigzag", 10)
    with pytest.raises(ValueError, match="replay"):
        Stage("s", {"math": 1.0}, 10, replay=1.5)


def test_stream_is_a_pure_function_of_seed_and_step_and_skips_heldout():
    s = make_schedule("shifting", 10)
    held = {e.prompt for e in make_eval_set(BUILTIN_TASKS["chat"])}
    mk = lambda seed: MixtureStream(s, BUILTIN_TASKS, TOK, 64, 40, seed=seed, exclude=held)  # noqa: E731
    a, b = mk(0), mk(0)
    assert torch.equal(a.batch(25).x, b.batch(25).x) and torch.equal(a.batch(3).x, mk(0).batch(3).x)
    assert not torch.equal(a.batch(25).x, mk(1).batch(25).x)
    assert set(a.batch(3).tasks) <= {"math", "code"}
    chats = [e for step in range(20, 30) for e in a.examples(step) if e.task == "chat"]
    assert chats and not any(e.prompt in held for e in chats)
    # Ranks of a distributed run take disjoint slices of the same global batch.
    assert a.batch(25, rank=1, world_size=2).tasks == a.batch(25).tasks[1::2]
