"""DESIGN.md habits: no file in src/ over 400 lines, no function over 60; the analysis package has one
module per instrument (options, run, report section) composed by a small CLI."""
import ast
from pathlib import Path

import pytest

import vitlab.analysis

ROOT = Path(vitlab.analysis.__file__).parent
SRC = ROOT.parent
FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_file_and_function_sizes(path):
    src = path.read_text()
    assert src.count("\n") <= 400, f"{path.name}: {src.count(chr(10))} lines"
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 60, f"{path.name}: {node.name} has {n} lines"


def test_every_instrument_module_offers_options_run_and_report():
    import argparse

    from vitlab.analysis import cli, instruments
    names = set()
    for m in instruments.modules():
        assert callable(m.add_arguments) and callable(m.run) and callable(m.report), m.__name__
        names.update(m.NAMES)
        assert m.report({}, "unused", {}) == []  # nothing to report without runs
    assert names == set(instruments.INSTRUMENTS)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--only", "hessian", "--hessian-k", "3", "--corruptions", "fog"])
    assert (args.hessian_k, args.corruptions) == (3, ["fog"])
    assert instruments.selected_keys(["fourier", "hessian"], []) == ["features", "hessian"]
    assert instruments.selected_keys(None, ["oversmoothing", "fourier", "robustness"]) == \
        ["attention", "calibration", "lipschitz", "landscape", "hessian"]
