"""Every module of the package imports: a broken import in a rarely run entry point
(python -m migd.bench.load, advertised in the README) must fail the suite, not a user."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import migd

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(migd.__path__, prefix=f"{migd.__name__}.")
)


def test_the_walk_finds_the_modules_the_readme_names() -> None:
    named = {"migd.bench.load", "migd.bench.disk", "migd.io.threads", "migd.__main__"}
    assert named <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_of_the_package_imports(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not name.endswith(".__main__"):
        importlib.import_module(name)
        return
    # A __main__ module runs its command when imported: ask it for its help, which
    # exits 0 once everything it imports resolves.
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(name)
    assert exited.value.code == 0
    assert "usage" in capsys.readouterr().out
