"""Five small task families that echo the EPI paper's benchmark, plus tasks from your own JSONL files.

| family        | echoes      | example prompt -> response            | scorer                      |
|---------------|-------------|---------------------------------------|-----------------------------|
| `math`        | GSM8K       | ``m 12+7-5=`` -> ``14``               | exact match                 |
| `code`        | CodeAlpaca  | ``c 'abc'[::-1]=`` -> ``cba``         | exact match                 |
| `logic`       | LogiQA      | ``l T&!F|F&T=`` -> ``T``              | exact match (chance 1/2)    |
| `instruction` | Alpaca      | ``i dbl:abc=`` -> ``aabbcc``          | exact match                 |
| `chat`        | UltraChat   | ``s fox,red=`` -> ``red fox ran home.`` | rubric, 4 checks, in [0, 1] |

Every prompt is ``<tag> <input>=`` and every response is a short string of letters and digits, so the
families share their format, their alphabet and some sub-skills (code and instruction both reverse and
upper-case strings; math and code both do arithmetic). That is on purpose: tasks that share nothing do not
compete for parameters, and without interference there is nothing for isolation to fix.

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
    name, description = "math", "two-step arithmetic a+b-c (GSM8K's multi-step reasoning, in miniature)"

    def sample(self, rng):
        a, b = rng.randrange(10), rng.randrange(10)
        c = rng.randint(0, min(9, a + b))  # never negative: the answer is always a plain number
        return Example(self.name, f"m {a}+{b}-{c}=", str(a + b - c))


class CodeTask(Task):
    name, description = "code", "evaluate a one-line Python expression (CodeAlpaca's code, in miniature)"

    def sample(self, rng):
        kind = rng.randrange(5)
        if kind == 0:
            w = _word(rng)
            expr, value = f"'{w}'[::-1]", w[::-1]
        elif kind == 1:
            w = _word(rng, 2, 3)
            expr, value = f"'{w}'*2", w * 2
        elif kind == 2:
            w = _word(rng, 1, 9)
            expr, value = f"len('{w}')", str(len(w))
        else:
            xs = [rng.randrange(10) for _ in range(3)]
            fn = "max" if kind == 3 else "min"
            expr, value = f"{fn}({xs[0]},{xs[1]},{xs[2]})", str(max(xs) if kind == 3 else min(xs))
        return Example(self.name, f"c {expr}=", value)


class LogicTask(Task):
    name, description = "logic", "deduce the truth value of stated facts joined by and/or/not (LogiQA, in miniature)"

    def sample(self, rng):
        facts = [rng.choice(["", "", "!"]) + rng.choice("TF") for _ in range(4)]
        ops = [rng.choice("&|") for _ in range(3)]
        expr = facts[0] + "".join(o + f for o, f in zip(ops, facts[1:]))
        # Usual precedence: ! binds tightest, then &, then |: an OR of AND-terms.
        value = any(all((f[-1] == "T") != f.startswith("!") for f in term.split("&")) for term in expr.split("|"))
        return Example(self.name, f"l {expr}=", "T" if value else "F")


class InstructionTask(Task):
    name, description = "instruction", "transform a word as instructed: rev, up, dbl (Alpaca, in miniature)"

    def sample(self, rng):
        w = _word(rng, 3, 5)
        op = rng.choice(["rev", "up", "dbl"])
        out = {"rev": w[::-1], "up": w.upper(), "dbl": "".join(c + c for c in w)}[op]
        return Example(self.name, f"i {op}:{w}=", out)


class ChatTask(Task):
    """Open-ended: many responses are right. ``s fox,red=`` asks for a four-word sentence
    ``<adjective> <noun> <verb> <place>.`` whose first two words are the given ones; the verb and the place
    are the writer's free choice. Scored by a rubric (mean of four checks), like a human rating."""
    name, description = "chat", "write a short sentence about a given animal (UltraChat's open generation)"
    exact = False
    NOUNS = ("fox", "cat", "dog", "owl", "bee", "cow", "pig", "ant", "elk", "rat", "bat", "hen", "yak",
             "eel", "ram", "emu")
    ADJECTIVES = ("red", "tan", "big", "old", "shy", "odd", "wet", "sly", "fat", "tiny", "calm", "wild",
                  "bold", "dry", "hot", "new")
    VERBS = ("ran", "sat", "hid", "sang", "slept", "ate")
    PLACES = ("home", "away", "here", "there", "inside", "outside")

    def sample(self, rng):
        noun, adj = rng.choice(self.NOUNS), rng.choice(self.ADJECTIVES)
        verb, place = rng.choice(self.VERBS), rng.choice(self.PLACES)
        return Example(self.name, f"s {noun},{adj}=", f"{adj} {noun} {verb} {place}.")

    def rubric(self, generated: str, example: Example) -> dict:
        noun, adj = example.prompt[2:-1].split(",")
        words = generated[:-1].split(" ") if generated.endswith(".") else generated.split(" ")
        words += [""] * (4 - len(words))
        return {
            "opens with the adjective and noun": words[:2] == [adj, noun],
            "a verb third": words[2] in self.VERBS,
            "a place fourth": words[3] in self.PLACES,
            "exactly four words and a full stop": generated.endswith(".") and len(words) == 4,
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
