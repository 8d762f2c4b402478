"""The package layering, read from the source: who may import whom.

    errors <- models   <- spmd <- measure <- cli
    errors <- pipeline <- spmd

`pipeline` pipelines any stack of layers, so it knows neither the Transformer (`models`) nor
the trainer (`spmd`); `models` knows only `errors`; nothing imports `cli` (the command lines,
which scripts/ runs). Every import counts, the ones inside functions too: a lazy import that
closes a cycle only hides it from Python's import order. No module imports itself back through
others either (a cycle inside a package). scripts/ holds doors to `tppjax.cli`, no code."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tppjax"

MAY_IMPORT = {  # package -> the packages of tppjax it may import (besides itself)
    "tppjax": set(),  # tppjax/__init__.py: the docstring only
    "errors": set(),
    "models": {"errors"},
    "pipeline": {"errors"},
    "spmd": {"errors", "models", "pipeline"},
    "measure": {"errors", "models", "pipeline", "spmd"},
    "cli": {"errors", "models", "pipeline", "spmd", "measure"},
}
EXCEPTIONS = {  # (importer, imported) module pairs that break a rule today, each with its end
    # schedule_from_data's deadlock check (simulate imports schedules): a cycle inside
    # pipeline/, whose owner removes it.
    ("tppjax.pipeline.schedules", "tppjax.pipeline.simulate"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def package(module: str) -> str:
    """`tppjax.spmd.rules` -> `spmd`; `tppjax` -> `tppjax`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(module: str) -> list[tuple[str, int]]:
    """(imported tppjax module, line) for every import statement in `module`, at any depth.
    `from tppjax.spmd import rules` imports the module `tppjax.spmd.rules`."""
    path = MODULES[module]
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                base = f"{here.rsplit('.', node.level - 1)[0]}.{base}".rstrip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names
                  if name in MODULES and name != module]
    return found


GRAPH = {module: imports(module) for module in MODULES}


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_package_has_a_place_in_the_layers():
    """A new package is placed deliberately, and the table itself has no cycle."""
    assert {package(m) for m in MODULES} == set(MAY_IMPORT)
    placed: set[str] = set()
    while len(placed) < len(MAY_IMPORT):  # peel off the packages whose imports are placed
        ready = {p for p, needs in MAY_IMPORT.items() if p not in placed and needs <= placed}
        assert ready, f"the layer table has a cycle among {set(MAY_IMPORT) - placed}"
        placed |= ready


def test_imports_follow_the_layers():
    """Each import names a module of the same package or of one its package may import."""
    bad = [f"{where(m, line)}: {package(m)} may not import {target} "
           f"(allowed: {', '.join(sorted(MAY_IMPORT[package(m)])) or 'nothing of tppjax'})"
           for m, found in GRAPH.items() for target, line in found
           if package(target) not in MAY_IMPORT[package(m)] | {package(m)}
           and (m, target) not in EXCEPTIONS]
    assert not bad, "imports against the layering (move the code to the layer it needs):\n" + \
        "\n".join(bad)


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str, int]] | None:
    """One cycle of `graph` as its edges (importer, imported, line), or None: a depth-first
    walk that meets a module already on its own trail."""
    done: set[str] = set()

    def visit(module: str, trail: list[tuple[str, str, int]]):
        for target, line in graph[module]:
            steps = [*trail, (module, target, line)]
            back = [i for i, (importer, _, _) in enumerate(steps) if importer == target]
            if back:
                return steps[back[0]:]
            if target not in done and (found := visit(target, steps)):
                return found
        done.add(module)
        return None

    for module in graph:
        if module not in done and (found := visit(module, [])):
            return found
    return None


def test_no_import_cycle_between_modules():
    """Not even inside a package: `a` imports `b` lazily and `b` imports `a` is a cycle too."""
    graph = {m: [(t, line) for t, line in found if (m, t) not in EXCEPTIONS]
             for m, found in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (lazy imports count): " + " -> ".join(
        f"{where(m, line)} imports {t}" for m, t, line in cycle)


def test_find_cycle_finds_one():
    """The detector itself: a lazy import back to the start closes the loop."""
    graph = {"a": [("b", 1)], "b": [("c", 2)], "c": [("b", 3)], "d": []}
    assert find_cycle(graph) == [("b", "c", 2), ("c", "b", 3)]
    assert find_cycle({"a": [("b", 1)], "b": []}) is None


def test_scripts_are_doors_and_only_tppjax_is_installed():
    """A script that runs tppjax code imports one `tppjax.cli` module and defines nothing: the
    code, which the tests import, is in the package (make_hf_fixtures.py and
    torch_dualpipev.py import no tppjax: torch tools). `pip install -e .` puts only `tppjax`
    on the import path, not tests/ or scripts/."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        ours = [name for node in ast.walk(tree)
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if name.split(".")[0] == "tppjax"]
        defined = [node.name for node in tree.body
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        assert not ours or (len(ours) == 1 and ours[0].startswith("tppjax.cli.")
                            and not defined), f"scripts/{path.name}: imports {ours}, defines " \
            f"{defined}; move the code into tppjax (tppjax/cli for the command line)"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"] == {"include": ["tppjax*"]}


def test_pipeline_stays_readable():
    """The reading budget of issue 23: the executor in one file of at most 300 lines, and no
    function in pipeline/ over 60 lines, so each action, the table and the loop read alone."""
    assert len((SOURCE / "pipeline" / "executor.py").read_text().splitlines()) <= 300
    long = [f"{where(m, node.lineno)} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for m, path in MODULES.items() if package(m) == "pipeline"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, "split these functions (60 lines at most):\n" + "\n".join(long)
