"""`make mutants` cannot rot silently: every planted bug still matches the code exactly
once, and every test it names still exists (the run itself is not part of `make test`)."""

from __future__ import annotations

import ast

from .mutants import MUTANTS, ROOT, check_patches


def test_every_mutant_applies_exactly_once():
    assert check_patches(ROOT, MUTANTS) == []


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


def test_every_test_a_mutant_names_exists():
    missing = []
    for m in MUTANTS:
        for spec in m.tests:
            path, _, name = spec.partition("::")
            name = name.split("[")[0]  # a parametrized test's id: its function's name
            if not (ROOT / path).is_file():
                missing.append(f"{m.name}: no file {path}")
                continue
            if name:
                tree = ast.parse((ROOT / path).read_text())
                functions = {
                    node.name
                    for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
                if name not in functions:
                    missing.append(f"{m.name}: no test {name} in {path}")
    assert missing == []


def test_a_patch_whose_text_is_gone_is_reported():
    from .mutants import Mutant

    stale = Mutant("stale", "migd/state/paths.py", "text that is not there", "", ())
    moved = Mutant("moved", "migd/paths.py", "PathPolicy", "", ())
    assert check_patches(ROOT, [stale, moved]) == [
        "stale: original text found 0 times in migd/state/paths.py",
        "moved: no file migd/paths.py",
    ]
