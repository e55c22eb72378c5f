"""The layering of pipeline/ as a contract: every import of the project's own modules, at any depth
(inside functions too: a lazy import is still a dependency), goes to the module's own layer or a lower
one, and train/, eval/ and doctor (one layer) never import each other.

LAYERS, lowest first. A name is a module (pipeline/<name>.py) or a package (pipeline/<name>/ with
everything in it); modules of one package may import each other freely. A module on a layer may import
the other modules of its layer, except those named together in INDEPENDENT. Every module of pipeline/
must be placed here: a new module gets its layer when it is added.

    foundation   errors redaction uris fingerprint words layout optimizers   plain helpers, no I/O of their own
    sources      sources                                                     what each dataset is (SourceSpec)
    config       config                                                      the typed Config (iterates sources)
    storage      storage logs tracking                                       where bytes go, log files, MLflow
    runtime      status ownership raycluster capacity                        state records, the output lock, Ray
    data         download prepare neardup                                    the data stages
    lm           lm                                                          the model floor (pipeline/lm/)
    stages       train eval doctor                                           independent of each other
    views        report serve                                                read what the stages wrote
    entry        cli __main__                                                the command line

Imports under ``if TYPE_CHECKING:`` are left out: they are never executed (annotations only).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pipeline"

LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"errors", "redaction", "uris", "fingerprint", "words", "layout", "optimizers"}),
    ("sources", {"sources"}),
    ("config", {"config"}),
    ("storage", {"storage", "logs", "tracking"}),
    ("runtime", {"status", "ownership", "raycluster", "capacity"}),
    ("data", {"download", "prepare", "neardup"}),
    ("lm", {"lm"}),
    ("stages", {"train", "eval", "doctor"}),
    ("views", {"report", "serve"}),
    ("entry", {"cli", "__main__"}),
]
INDEPENDENT = {"train", "eval", "doctor"}
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a pipeline module in the file, at any depth. `from pipeline.x
    import y` counts as pipeline.x.y when y is a module of its own, else as pipeline.x."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if _exists(sub) else target))
    return out


def owner(module: str) -> str:
    """The LAYERS name a module belongs to: pipeline.train.loop -> train; the bare package -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def all_modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def edges() -> list[tuple[str, int, str, str, str]]:
    """(file, line, importer's owner, imported module, its owner) for every cross-owner import."""
    out = []
    for path in all_modules():
        me = owner(_module_name(path))
        for line, target in imports_of(path):
            them = owner(target)
            if them and them != me:
                out.append((str(path.relative_to(ROOT.parent)), line, me, target, them))
    return out


def violations() -> list[str]:
    out = []
    for f, line, me, target, them in edges():
        if them not in LAYER_OF:
            continue   # reported by test_every_module_has_a_layer
        if LAYER_OF[them] > LAYER_OF[me]:
            out.append(f"{f}:{line}: {me} ({LAYERS[LAYER_OF[me]][0]}) imports {target} ({LAYERS[LAYER_OF[them]][0]}, a higher layer)")
        elif me in INDEPENDENT and them in INDEPENDENT:
            out.append(f"{f}:{line}: {me} imports {target}: {', '.join(sorted(INDEPENDENT))} are independent of each other")
    return out


def test_every_module_has_a_layer():
    unplaced = sorted({owner(_module_name(p)) for p in all_modules()} - set(LAYER_OF) - {""})
    assert not unplaced, f"modules of pipeline/ without a layer in tests/unit/test_layers.py's LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer_and_the_stages_are_independent():
    bad = violations()
    assert not bad, "layer contract broken (tests/unit/test_layers.py):\n" + "\n".join(bad)


@pytest.mark.parametrize("layer, forbidden", [
    ("lm", {"train", "eval", "doctor", "cli", "report", "serve"}),
    ("train", {"eval", "doctor"}),
    ("eval", {"train", "doctor"}),
    ("doctor", {"train", "eval"}),
])
def test_the_floor_and_the_stages(layer, forbidden):
    """The issue's contract, spelled out (the layers above imply it; this names it)."""
    bad = [f"{f}:{line}: imports {target}" for f, line, me, target, them in edges() if me == layer and them in forbidden]
    assert not bad, f"{layer} must not import {sorted(forbidden)}:\n" + "\n".join(bad)


def test_the_walk_sees_imports_at_any_depth_and_resolves_them(tmp_path, monkeypatch):
    """The checker itself: an import inside a function, a relative import and `from pipeline import x`
    are all found and resolved; an import under TYPE_CHECKING is not."""
    pkg = tmp_path / "pipeline"
    (pkg / "lm").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("")
    (pkg / "config.py").write_text("")
    (pkg / "lm" / "__init__.py").write_text("")
    (pkg / "lm" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import y\n"
        "from pipeline import config\n"
        "if TYPE_CHECKING:\n    from pipeline.eval import z\n"
        "def f():\n    from pipeline.train import loop\n    import pipeline.doctor\n")
    (pkg / "lm" / "y.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", pkg)
    got = sorted(t for _, t in imports_of(pkg / "lm" / "x.py"))
    assert got == ["pipeline.config", "pipeline.doctor", "pipeline.lm.y", "pipeline.train.loop"]
    assert sorted(v.split(": ", 1)[1] for v in violations()) == [
        "lm (lm) imports pipeline.doctor (stages, a higher layer)",
        "lm (lm) imports pipeline.train.loop (stages, a higher layer)"]
