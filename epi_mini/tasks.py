"""Five small task families that echo the EPI paper's benchmark, plus tasks from your own JSONL files.

| family        | echoes      | example prompt -> response              | scorer                               |
|---------------|-------------|-----------------------------------------|--------------------------------------|
| `math`        | GSM8K       | ``m 2+9-1=`` -> ``10``                  | exact match                          |
| `code`        | CodeAlpaca  | ``c 'amnty'[::-1]=`` -> ``ytnma``       | exact match                          |
| `logic`       | LogiQA      | ``l T|!F,F&T|!F=`` -> ``TT``            | exact match (chance 1/4)             |
| `instruction` | Alpaca      | ``i max:14177=`` -> ``7``               | exact match                          |
| `chat`        | UltraChat   | ``s cab=`` -> ``ant bee cat.``          | rubric, 4 checks, in [0, 1]          |

Every prompt is ``<tag> <input>=`` and every response is a short string of letters and digits, so the
families share their format, their alphabet and some sub-skills (code and instruction both reverse,
upper-case and measure words and take the largest or smallest digit; math and code both add; chat and
instruction both turn letters of the prompt into letters of the answer). That is on purpose: tasks that
share nothing do not compete for parameters, and without interference there is nothing for isolation to fix.

Each family mixes questions a fresh stage of training learns within a few hundred steps (answers that are
digits or T/F, the format of a chat line) with questions that need generic letter copying or a deeper
evaluation, which a tiny model picks up only after about a thousand steps of mixed training. That keeps
every family off the ceiling under full multi-task SFT and above zero at the end of its own stage of the
shifting schedule (see ``data/README.md`` for the calibration and its numbers).

A task is a seeded generator of (prompt, response) pairs plus a scorer. Scorers take the response the
model generated and the example, and return a score in [0, 1]; wrong answers score 0.
"""
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    response: str


class Task:
    """A task family: ``sample(rng)`` draws one example; ``score(generated, example)`` grades a generation.

    ``exact`` says whether the scorer is exact match: then, under greedy decoding, the score of an example is
    1 exactly when every response token (and the end token) is the model's argmax given the reference prefix,
    which the evaluator checks with one teacher-forced forward pass instead of generating.
    """
    name: str = ""
    description: str = ""
    exact: bool = True

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def score(self, generated: str, example: Example) -> float:
        return float(generated == example.response)

    def examples(self, n: int, seed: int) -> list[Example]:
        """``n`` examples from a fresh ``random.Random(seed)``: the same seed always gives the same list."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


def _word(rng, lo=3, hi=5):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


class MathTask(Task):
    name, description = "math", "one- and two-step arithmetic a+b, a-b, a+b-c (GSM8K's reasoning, in miniature)"

    def sample(self, rng):
        a, b = rng.randrange(10), rng.randrange(10)
        steps = rng.choice((1, 2, 2))  # a third of the problems take one step, the rest two
        if steps == 1:
            if rng.random() < 0.5:
                return Example(self.name, f"m {a}+{b}=", str(a + b))
            a, b = max(a, b), min(a, b)  # never negative: the answer is always a plain number
            return Example(self.name, f"m {a}-{b}=", str(a - b))
        c = rng.randint(0, min(9, a + b))
        return Example(self.name, f"m {a}+{b}-{c}=", str(a + b - c))


class CodeTask(Task):
    name, description = "code", "evaluate a one-line Python expression (CodeAlpaca's code, in miniature)"
    KINDS = ("rev", "upper", "len", "max", "min", "sum")

    def sample(self, rng):
        kind = rng.choice(self.KINDS)
        if kind == "rev":
            w = _word(rng, 4, 6)
            expr, value = f"'{w}'[::-1]", w[::-1]
        elif kind == "upper":
            w = _word(rng, 4, 6)
            expr, value = f"'{w}'.upper()", w.upper()
        elif kind == "len":
            w = _word(rng, 1, 9)
            expr, value = f"len('{w}')", str(len(w))
        elif kind in ("max", "min"):
            xs = [rng.randrange(10) for _ in range(3)]
            expr, value = f"{kind}({','.join(map(str, xs))})", str((max if kind == "max" else min)(xs))
        else:
            xs = [rng.randrange(10) for _ in range(2)]
            expr, value = f"sum([{','.join(map(str, xs))}])", str(sum(xs))
        return Example(self.name, f"c {expr}=", value)


def _logic_expr(rng, n):
    facts = [rng.choice(["", "", "!"]) + rng.choice("TF") for _ in range(n)]
    ops = [rng.choice("&|") for _ in range(n - 1)]
    expr = facts[0] + "".join(o + f for o, f in zip(ops, facts[1:]))
    # Usual precedence: ! binds tightest, then &, then |: an OR of AND-terms.
    value = any(all((f[-1] == "T") != f.startswith("!") for f in term.split("&")) for term in expr.split("|"))
    return expr, "T" if value else "F"


class LogicTask(Task):
    name, description = "logic", "deduce the truth values of two statements built with and/or/not (LogiQA, in miniature)"

    def sample(self, rng):
        # The answer is drawn first (TT, TF, FT and FF are equally likely: chance is 1/4), then each statement
        # is redrawn until it has the wanted value. The first joins two facts, the second three.
        exprs = []
        for n, want in zip((2, 3), rng.choice(["TT", "TF", "FT", "FF"])):
            expr, value = _logic_expr(rng, n)
            while value != want:
                expr, value = _logic_expr(rng, n)
            exprs.append((expr, value))
        return Example(self.name, f"l {','.join(e for e, _ in exprs)}=", "".join(v for _, v in exprs))


class InstructionTask(Task):
    name, description = "instruction", "transform a word or a number as instructed: len, max, min, up, rev (Alpaca, in miniature)"
    OPS = ("len", "max", "min", "up", "rev")

    def sample(self, rng):
        op = rng.choice(self.OPS)
        if op in ("max", "min"):  # the largest or smallest digit of a number
            w = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 5)))
            out = max(w) if op == "max" else min(w)
        else:
            w = _word(rng, 4, 7)
            out = {"len": str(len(w)), "up": w.upper(), "rev": w[::-1]}[op]
        return Example(self.name, f"i {op}:{w}=", out)


class ChatTask(Task):
    """Open-ended: many responses are right. ``s cab=`` asks for a line of three-letter words, one word per
    given letter, in alphabetical order of their initials, no word twice, then a full stop: ``ant bee cat.``,
    ``arm bus cow.`` and 25 more answers are all right. Scored by a rubric, like a human rating: the mean of
    four checks (format, real words on topic, every letter used once without repeating a word, order). A
    reply that ignores the letters can pass only the format check."""
    name, description = "chat", "write a line of words with the given initials, in alphabetical order (UltraChat's open generation)"
    exact = False
    WORDS = {
        "a": ("ant", "arm", "art"), "b": ("bee", "bus", "bat"), "c": ("cat", "cow", "cup"),
        "d": ("dog", "den", "dew"), "e": ("elk", "egg", "ear"), "f": ("fox", "fig", "fan"),
        "g": ("gum", "gas", "gem"), "h": ("hen", "hat", "hut"), "i": ("ink", "ice", "imp"),
        "j": ("jam", "jet", "jar"), "k": ("kid", "kit", "key"), "l": ("log", "lid", "leg"),
        "m": ("map", "mud", "mop"), "n": ("net", "nut", "nap"), "o": ("owl", "oak", "oil"),
        "p": ("pig", "pen", "pot"), "r": ("rat", "rug", "ram"), "s": ("sun", "sky", "sea"),
        "t": ("tub", "toy", "tea"), "w": ("web", "wig", "wax"), "y": ("yak", "yam", "yew"),
    }
    KNOWN = frozenset(w for ws in WORDS.values() for w in ws)
    MIN_LETTERS, MAX_LETTERS = 3, 6
    DOUBLED = 0.5                    # share of prompts made to give a letter twice (more by chance)

    def sample(self, rng):
        n = rng.randint(self.MIN_LETTERS, self.MAX_LETTERS)
        while True:  # a letter at most twice, so that distinct words always exist
            letters = [rng.choice(tuple(self.WORDS)) for _ in range(n)]
            if rng.random() < self.DOUBLED:  # give one letter twice: it needs two different words
                i, j = rng.sample(range(n), 2)
                letters[j] = letters[i]
            letters = "".join(letters)
            if max(letters.count(c) for c in letters) <= 2:
                break
        words = []
        for c in sorted(letters):
            words.append(rng.choice([w for w in self.WORDS[c] if w not in words]))
        return Example(self.name, f"s {letters}=", " ".join(words) + ".")

    def rubric(self, generated: str, example: Example) -> dict:
        letters = example.prompt[2:-1]
        words = (generated[:-1] if generated.endswith(".") else generated).split(" ")
        initials = "".join(w[:1] for w in words)
        return {
            "one word per letter, then a full stop": generated.endswith(".") and len(words) == len(letters),
            "known words, each starting with a given letter": all(w in self.KNOWN and w[0] in letters for w in words),
            "every letter used once, no word twice": sorted(initials) == sorted(letters) and len(set(words)) == len(words),
            "initials in alphabetical order": initials == "".join(sorted(letters)),
        }

    def score(self, generated, example):
        checks = self.rubric(generated, example)
        return sum(checks.values()) / len(checks)


class FileTask(Task):
    """A task read from a JSONL file (see :func:`load_jsonl`), scored by exact match. Every 10th example
    (at least one) is held out for evaluation; training samples the rest uniformly."""

    def __init__(self, name, examples, source=""):
        if len(examples) < 2:
            raise ValueError(f"task {name!r} from {source} needs at least 2 examples (one is held out), "
                             f"got {len(examples)}")
        self.name, self.description = name, f"examples from {source}"
        self.heldout = list(examples[::10])
        self.pool = [ex for i, ex in enumerate(examples) if i % 10]

    def sample(self, rng):
        return rng.choice(self.pool)


BUILTIN_TASKS = {t.name: t for t in (MathTask(), CodeTask(), LogicTask(), InstructionTask(), ChatTask())}
TASK_NAMES = tuple(BUILTIN_TASKS)


class DataFormatError(ValueError):
    """A malformed line in a JSONL data file; the message names the file and the line number."""


def load_jsonl(path) -> list[Example]:
    """Read ``{"task": str, "prompt": str, "response": str}`` objects, one per line (blank lines skipped).

    Raises ``FileNotFoundError`` for a missing file and :class:`DataFormatError` naming ``file:line`` for a
    line that is not a JSON object, lacks a field, has a field that is not a non-empty string, or has
    unknown fields (a typo such as ``"respone"`` should not pass silently).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fields = ("task", "prompt", "response")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in fields if k not in obj]
            if missing:
                raise DataFormatError(f"{where}: missing field(s) {missing}; each line needs {list(fields)}")
            extra = sorted(set(obj) - set(fields))
            if extra:
                raise DataFormatError(f"{where}: unknown field(s) {extra}; each line has exactly {list(fields)}")
            for k in fields:
                if not isinstance(obj[k], str) or not obj[k]:
                    raise DataFormatError(f"{where}: field {k!r} must be a non-empty string, got {obj[k]!r}")
            out.append(Example(obj["task"], obj["prompt"], obj["response"]))
    return out


def save_jsonl(examples, path):
    """Write examples as JSONL, atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"task": ex.task, "prompt": ex.prompt, "response": ex.response}) + "\n")
    tmp.replace(path)


def tasks_from_jsonl(path) -> dict:
    """One :class:`FileTask` per distinct ``task`` value in a JSONL file."""
    by_task = {}
    for ex in load_jsonl(path):
        by_task.setdefault(ex.task, []).append(ex)
    return {name: FileTask(name, exs, source=str(path)) for name, exs in by_task.items()}
