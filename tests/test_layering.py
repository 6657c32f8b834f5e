"""The core imports torch only: never bnlab.lab, bnlab.diagnostics, bnlab.cli or matplotlib."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import bnlab

SRC = pathlib.Path(bnlab.__file__).parent
CORE_DIRS = ("", "convert", "variants", "kernels")  # '' = top-level modules of bnlab
UPPER = ("bnlab.lab", "bnlab.diagnostics", "bnlab.cli", "matplotlib", "tqdm", "rich")


def _core_files():
    for d in CORE_DIRS:
        folder = SRC / d
        if folder.is_dir():
            for f in sorted(folder.glob("*.py")):
                if f.name not in ("cli.py", "__main__.py", "demo.py"):
                    yield f


def _imports(f: pathlib.Path) -> list[str]:
    return _imports_of(f.read_text(), f)


def _imports_of(code: str, f: pathlib.Path) -> list[str]:
    """Every module name an import statement in ``code`` (file f's) names, anywhere in it (in
    functions too): ``from bnlab import lab`` names bnlab.lab, relative imports are resolved."""
    package = ["bnlab", *f.parent.relative_to(SRC).parts]
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module, *(f"{module}.{a.name}" for a in node.names)]
    return names


def test_the_import_reader_sees_every_spelling() -> None:
    """`from bnlab import lab` and relative imports were read as "bnlab" and nothing."""
    code = ("def g():\n    from bnlab import lab\n    from . import diagnostics\n"
            "    from ..lab import runs\n    import bnlab.cli\n")
    got = set(_imports_of(code, SRC / "variants" / "x.py"))
    assert {"bnlab.lab", "bnlab.variants.diagnostics", "bnlab.lab.runs", "bnlab.cli"} <= got


def test_core_modules_import_nothing_from_upper_layers():
    bad = [f"{f.relative_to(SRC)}: {n}" for f in _core_files() for n in _imports(f)
           if n.startswith(UPPER)]
    assert not bad, bad


def test_importing_bnlab_loads_no_upper_layer():
    # torch itself imports tqdm, so only bnlab's own upper layers and matplotlib are checked here
    upper = tuple(u for u in UPPER if u not in ("tqdm", "rich"))
    code = ("import sys, bnlab, bnlab.stats, bnlab.convert; "
            f"print([m for m in sys.modules if m.startswith({upper!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_diagnostics_import_only_core_and_torch():
    bad = [f"{f.name}: {n}" for f in sorted((SRC / "diagnostics").glob("*.py"))
           for n in _imports(f) if n.startswith(("bnlab.lab", "bnlab.cli", "matplotlib"))]
    assert not bad, bad
