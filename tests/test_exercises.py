"""Every lesson notebook ends with checked exercises, and every exercise has a reference solution that runs.

    python -m pytest tests/test_exercises.py -q

An exercise, in a lesson notebook, is a markdown cell with the heading ``### Exercise NN.k — title`` (NN: the
notebook's number, k = 1, 2, ... in order), then a *stub* code cell the student fills in and a *check* code cell
that calls ``check_exercise_NN_k(...)`` from :mod:`epi_mini.exercises`. Both start with ``# NBVAL_SKIP``: an
unfilled stub must not fail the test command. Its solution, in ``notebooks/solutions/<the same name>.ipynb``, has the
same heading, the filled-in stub and the same check call, and none of its cells is skipped, so the README's test
command (``python -m pytest --nbval-lax --nbval-current-env``, whose ``testpaths`` include ``notebooks``) runs every
solution and every check. This file checks that structure; nbval runs the solutions themselves.
"""
import copy
import fnmatch
import json
import re
from pathlib import Path

import pytest

from epi_mini import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
LESSONS = ("01_tiny_gpt", "02_the_base_model", "03_tasks_and_mixtures", "04_forgetting", "05_importance_drift",
           "06_static_isolation", "07_epi", "08_ablations", "11_epi_in_your_loop")
HEADING = re.compile(r"^### Exercise (\d\d)\.(\d+) — (\S.*)$", re.M)
CALL = re.compile(r"^check_exercise_(\d\d)_(\d+)\(.*\)\s*$", re.M)
UNFILLED = re.compile(r'NotImplementedError\("your code here"\)|=\s*\.\.\.\s*(#.*)?$', re.M)


def read(path):
    return json.loads(Path(path).read_text())["cells"]


def text(cell):
    return "".join(cell["source"])


def skipped(cell):
    """Does nbval skip this cell (a first line ``# NBVAL_SKIP``, or the ``nbval-skip`` tag)?"""
    first = (text(cell).lstrip().splitlines() or [""])[0].strip()
    return first == "# NBVAL_SKIP" or "nbval-skip" in cell.get("metadata", {}).get("tags", [])


def exercises_in(cells):
    """The exercises of a notebook, in order: dicts with ``number`` ("NN.k"), ``title``, ``markdown`` (the cell with
    the heading) and ``code`` (the code cells up to the next exercise heading)."""
    found = []
    for cell in cells:
        headings = HEADING.findall(text(cell)) if cell["cell_type"] == "markdown" else []
        if len(headings) > 1:
            raise AssertionError(f"one exercise heading per cell: {headings}")
        if headings:
            nn, k, title = headings[0]
            found.append({"number": f"{nn}.{k}", "title": title.strip(), "markdown": text(cell), "code": []})
        elif found and cell["cell_type"] == "code":
            found[-1]["code"].append(cell)
    return found


def calls(cell):
    return CALL.findall(text(cell))


def check_lines(cell):
    return [line.strip() for line in text(cell).splitlines() if CALL.match(line.strip())]


def problems(name, lesson, solution):
    """Everything wrong with the exercises of lesson notebook ``name`` (its cells) and their solutions (the cells of
    its solution notebook, or None when there is none); an empty list when all is well."""
    out = []
    nn = name[:2]
    ours = exercises_in(lesson)
    if len(ours) < 2:
        out.append(f"{name}: {len(ours)} exercise(s), at least 2 wanted")
    numbers = [e["number"] for e in ours]
    if numbers != [f"{nn}.{k}" for k in range(1, len(ours) + 1)]:
        out.append(f"{name}: exercises numbered {numbers}, expected {nn}.1, {nn}.2, ... in order")
    if ours and not ("NBVAL_SKIP" in ours[0]["markdown"] and f"solutions/{name}.ipynb" in ours[0]["markdown"]):
        out.append(f"{name}: the first exercise should say that its cells carry NBVAL_SKIP and where the solutions "
                   f"are (solutions/{name}.ipynb)")
    for e in ours:
        where = f"{name}, exercise {e['number']}"
        checks = [i for i, c in enumerate(e["code"]) if calls(c)]
        if len(checks) != 1:
            out.append(f"{where}: {len(checks)} check cells, expected 1")
            continue
        if not any(not calls(c) for c in e["code"][:checks[0]]):
            out.append(f"{where}: no stub cell before its check cell")
        if calls(e["code"][checks[0]]) != [tuple(e["number"].split("."))]:
            out.append(f"{where}: its check cell calls {calls(e['code'][checks[0]])}, not its own check")
        out += [f"{where}: a cell without # NBVAL_SKIP on its first line: {text(c)[:60]!r}"
                for c in e["code"] if not skipped(c)]
        # ... and the skip-execution tag, so `jupyter nbconvert --execute` (re-running the lesson) skips it too
        out += [f"{where}: a cell without the skip-execution tag: {text(c)[:60]!r}"
                for c in e["code"] if "skip-execution" not in c.get("metadata", {}).get("tags", [])]
    if solution is None:
        return out + [f"{name}: no solution notebook solutions/{name}.ipynb"]
    theirs = exercises_in(solution)
    if [(e["number"], e["title"]) for e in theirs] != [(e["number"], e["title"]) for e in ours]:
        out.append(f"solutions/{name}: exercises {[(e['number'], e['title']) for e in theirs]}, the lesson has "
                   f"{[(e['number'], e['title']) for e in ours]}")
    out += [f"solutions/{name}: a skipped cell: {text(c)[:60]!r}" for c in solution if c["cell_type"] == "code"
            and skipped(c)]
    for e, s in zip(ours, theirs):
        where = f"solutions/{name}, exercise {e['number']}"
        lesson_calls = [line for c in e["code"] for line in check_lines(c)]
        solution_calls = [line for c in s["code"] for line in check_lines(c)]
        if solution_calls != lesson_calls:
            out.append(f"{where}: check call {solution_calls}, the lesson's is {lesson_calls}")
        filled = [c for c in s["code"] if not calls(c)]
        if not filled:
            out.append(f"{where}: no filled-in stub before the check")
        out += [f"{where}: an unfilled stub: {m.group(0)!r}" for c in filled for m in UNFILLED.finditer(text(c))]
    return out


def solution_cells(name):
    path = SOLUTIONS / f"{name}.ipynb"
    return read(path) if path.exists() else None


@pytest.mark.parametrize("name", LESSONS)
def test_every_lesson_ends_with_checked_exercises_and_their_solutions(name):
    assert problems(name, read(NOTEBOOKS / f"{name}.ipynb"), solution_cells(name)) == []


def test_every_check_is_used_once_and_says_what_it_checks():
    used = [f"check_exercise_{nn}_{k}" for name in LESSONS for e in exercises_in(read(NOTEBOOKS / f"{name}.ipynb"))
            for c in e["code"] for nn, k in calls(c)]
    assert sorted(used) == sorted(exercises.CHECKS), "every check in epi_mini/exercises.py belongs to one exercise"
    assert all(len((fn.__doc__ or "").split()) >= 10 for fn in exercises.CHECKS.values())


def test_every_solution_notebook_belongs_to_a_lesson_and_is_collected():
    assert sorted(p.stem for p in SOLUTIONS.glob("*.ipynb")) == sorted(LESSONS)
    pytest_options = (ROOT / "pyproject.toml").read_text().split("[tool.pytest.ini_options]")[1].split("\n[")[0]
    assert '"notebooks"' in re.search(r"^testpaths = (.*)$", pytest_options, re.M).group(1)
    assert "norecursedirs" not in pytest_options      # pytest's default leaves notebooks/solutions/ in
    ignored = re.search(r"collect_ignore_glob = (\[.*\])", (ROOT / "conftest.py").read_text()).group(1)
    for path in SOLUTIONS.glob("*.ipynb"):
        assert not any(fnmatch.fnmatch(str(path.relative_to(ROOT)), g) for g in json.loads(ignored)), path


def test_the_structure_check_fails_when_an_exercise_breaks_the_rules():
    name = "04_forgetting"
    lesson, solution = read(NOTEBOOKS / f"{name}.ipynb"), solution_cells(name)
    assert problems(name, lesson, solution) == []
    assert "no solution notebook" in " ".join(problems(name, lesson, None))

    def last_exercise_cells(cells):       # the markdown, stub and check of the lesson's last exercise
        start = max(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and HEADING.search(text(c)))
        return start, cells[start:start + 3]

    # An exercise added to the lesson without a solution:
    start, cells = last_exercise_cells(lesson)
    added = copy.deepcopy(cells)
    n = len(exercises_in(lesson)) + 1
    added[0]["source"] = [f"### Exercise 04.{n} — One more\n"]
    added[2]["source"] = [line.replace(f"04_{n - 1}", f"04_{n}") for line in added[2]["source"]]
    assert any("exercises" in p for p in problems(name, lesson + added, solution))
    # A stub the test command would run, unfilled:
    unskipped = copy.deepcopy(lesson)
    unskipped[start + 1]["source"] = unskipped[start + 1]["source"][2:]
    assert any("NBVAL_SKIP" in p for p in problems(name, unskipped, solution))
    # A solution that checks something else, a skipped solution cell, a solution left unfilled:
    wrong = copy.deepcopy(solution)
    for c in wrong:
        c["source"] = [line.replace("check_exercise_04_2(rises)", "check_exercise_04_2({})") for line in c["source"]]
    assert any("check call" in p for p in problems(name, lesson, wrong))
    skip = copy.deepcopy(solution)
    code = [c for c in skip if c["cell_type"] == "code"]
    code[-1]["source"] = ["# NBVAL_SKIP\n"] + code[-1]["source"]
    assert any("skipped" in p for p in problems(name, lesson, skip))
    unfilled = copy.deepcopy(solution)
    stub = [c for c in unfilled if c["cell_type"] == "code" and "def my_bwt" in text(c)][0]
    stub["source"] = ["def my_bwt(R, first_stage):\n", '    raise NotImplementedError("your code here")\n']
    assert any("unfilled" in p for p in problems(name, lesson, unfilled))
