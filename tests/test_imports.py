"""Imports point one way (DESIGN.md): ``errors, registry, constants <- layers <- models <- (data,
engine, analysis, interop) <- (pretrain, bench, studies) <- cli``; no cycles between vitlab's packages, nothing imports
"upward", and ``engine`` never imports ``analysis``.  Every import counts, also those inside
functions (lazy imports still tie the layers together)."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "vitlab"

# unit -> level; a unit may import units of its own level or lower (siblings: see NO_SIBLING)
LEVELS = {"errors": 0, "registry": 0, "constants": 0, "plotting": 0, "runtime": 0,
          "layers": 1, "models": 2,
          "data": 3, "engine": 3, "analysis": 3, "interop": 3,
          "pretrain": 4, "compat": 4, "bench": 4, "studies": 4, "cli": 5, "__main__": 5, "__init__": 6}
FORBIDDEN = {("engine", "analysis"), ("data", "engine"), ("data", "analysis"), ("interop", "engine"),
             ("interop", "analysis"), ("bench", "studies")}  # nothing but the CLI imports the studies
FORBIDDEN |= {(unit, "compat") for unit in LEVELS} | {("compat", "analysis")}  # compat is a leaf: nothing imports it


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else parts[:1] + ["__init__"]
    return ".".join(parts)


def imports(path: pathlib.Path):
    """vitlab modules imported anywhere in ``path`` (absolute and relative imports)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "vitlab":
                    yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitlab":
            if node.module == "vitlab":
                for a in node.names:  # "from vitlab import layers" imports the sub-package
                    yield f"vitlab.{a.name}", node.lineno
            else:
                yield node.module, node.lineno


def edges():
    for path in sorted(SRC.rglob("*.py")):
        src = unit_of(module_name(path))
        for target, line in imports(path):
            dst = unit_of(target)
            if dst != src:
                yield src, dst, f"{path.relative_to(SRC)}:{line} imports {target}"


def test_every_module_has_a_level():
    units = {unit_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert units <= set(LEVELS), f"give these a level: {sorted(units - set(LEVELS))}"


def test_no_upward_or_forbidden_imports():
    bad = [where for src, dst, where in edges()
           if dst in LEVELS and (LEVELS[dst] > LEVELS[src] or (src, dst) in FORBIDDEN)]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_cycles_between_units():
    graph = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
    seen, stack = set(), []

    def visit(u):
        if u in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(u):] + [u]))
        if u in seen:
            return
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            visit(v)
        stack.pop()
        seen.add(u)

    for u in sorted(graph):
        visit(u)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The walker finds imports inside functions (so the tests above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vitlab.analysis import lipschitz\n")
    assert [t for t, _ in imports(f)] == ["vitlab.analysis"]
