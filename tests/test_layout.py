"""The shape of the house: modules import only modules below them, EPI's file stays the method alone.
Run: python -m pytest tests/test_layout.py -q

The layering below is the project's reading order from the bottom up. A module may import only modules that
come before it in this list; an import of a later one would be an arrow back up (and, sooner or later, an
import loop). Every module of the package must be in the list, so a new file has to be placed consciously.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "epi_mini"

LAYERS = [
    "model", "tokenizer", "tasks", "data", "evaluate", "metrics",        # the lab: model, data, scores
    "compact", "inputs", "isolation", "epi", "adaptive", "drift",         # the method and its measurements
    "strategy", "baselines", "methods",                                   # update strategies, by name
    "config", "checkpoint", "pretrain", "plots", "train", "runner",       # the base, the training loop, its runs
    "hf",                                                                 # EPI in Hugging Face's Trainer (optional)
    "experiments", "report", "course", "exercises", "cli",                # protocols, their report, notebooks, CLI
    "distributed.comm", "distributed.selection", "distributed.fsdp", "distributed.checkpoint", "distributed.ddp",
    "distributed.launch",
    "__init__", "__main__", "distributed.__init__", "distributed.__main__",
]


def project_imports(path, root=PACKAGE):
    """The epi_mini modules a file imports (absolute or relative, at any depth of the file, so imports
    inside functions count too), as names like "epi" or "distributed.ddp"."""
    here = path.relative_to(root).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(here[:-1])[: len(here) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("epi_mini"):
                parts = node.module.split(".")[1:]
            else:
                continue
            names = [".".join(parts + [a.name]) for a in node.names] if not node.module or not parts else [".".join(parts)]
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("epi_mini."))
    return found


def module_name(path):
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_module_is_placed_and_imports_only_modules_below_it():
    files = sorted(PACKAGE.rglob("*.py"))
    names = [module_name(f) for f in files]
    assert sorted(names) == sorted(LAYERS), f"place new modules in LAYERS: {sorted(set(names) ^ set(LAYERS))}"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for f in files:
        me = module_name(f)
        for target in project_imports(f):
            target = target if target in rank else target.rsplit(".", 1)[0]  # "from .x import y": module x
            target = {"distributed": "distributed.__init__", "": "__init__"}.get(target, target)
            assert target in rank, f"{me} imports {target!r}, which is not a module of the package"
            if rank[target] >= rank[me]:
                upward.append(f"{me} -> {target}")
    assert not upward, "imports that point up (or sideways into a later module): " + ", ".join(upward)


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    """The old loop hid in a function body: train.fit imported methods, which imported train."""
    probe = tmp_path / "distributed" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import torch\nfrom ..epi import top_fraction\n"
                     "def f():\n    from ..train import fit\n    import epi_mini.methods\n    from . import ddp\n")
    assert project_imports(probe, root=tmp_path) == {"epi", "train", "methods", "distributed.ddp"}


def test_epi_is_the_method_alone():
    source = (PACKAGE / "epi.py").read_text()
    assert len(source.splitlines()) <= 320
    defined = [n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for elsewhere in ("jaccard", "rank_correlation", "layer_share", "group_by_overlap", "core_region",
                      "StaticIsolation", "DriftRecorder"):
        assert elsewhere not in defined, f"{elsewhere} belongs in drift.py or baselines.py, not epi.py"


def test_no_function_or_class_is_defined_twice_in_the_package():
    seen = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in tree.body:  # top-level definitions; methods may share names across classes
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                seen.setdefault(node.name, []).append(module_name(f))
    twice = {name: where for name, where in seen.items() if len(where) > 1}
    allowed = {"main", "build_parser"}  # each entry point has its own, by design (cli and distributed.launch)
    assert not {k: v for k, v in twice.items() if k not in allowed}, twice
