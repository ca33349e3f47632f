"""Every ``>>>`` example in xlard's docstrings runs as written: one test per module, through ``doctest.testmod``.

Each module's examples run in a fresh temporary working directory (an example that writes a file by a relative
name would otherwise write into the checkout) with the Hugging Face hub offline. A module whose optional
dependency is missing (``pip install 'xlard[method]'`` not done) is skipped with the reason, at import or when an
example needs the package; any other failure fails the test with doctest's own report.
"""
from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import re

import pytest

import xlard
from xlard._optional import EXTRAS

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = ["xlard"] + [m.name for m in pkgutil.walk_packages(xlard.__path__, "xlard.")]
    return sorted(n for n in names if not (n == "xlard.data" or n.startswith("xlard.data.")
                                           or n.rsplit(".", 1)[-1] == "__main__"))


MODULES = _modules()

_BLOCK_SEPARATOR = "*" * 70
# the failure's docstring, from doctest's 'File "...", line N, in xlard.x.f'
_WHERE = re.compile(r'^File ".*", line (?:\d+|\?), in (\S+)$', re.MULTILINE)
# a missing package: an import in the example itself, or xlard._optional.require's one-line message
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'|ImportError: .* needs (\S+): pip install "
                      r"'xlard\[(\w+)\]'")


def _missing_optional(block: str) -> str | None:
    """The optional dependency whose absence made this failure, or None (a real failure)."""
    for match in _MISSING.finditer(block):
        if match.group(1) is not None:
            top = match.group(1).partition(".")[0]
            if top in EXTRAS:
                dist, extra = EXTRAS[top]
                return f"{dist} (pip install 'xlard[{extra}]')"
        else:
            return f"{match.group(2)} (pip install 'xlard[{match.group(3)}]')"
    return None


def _only_missing_dependencies(report: str) -> list[str] | None:
    """The missing optional packages when every failing docstring failed because one is missing (its later
    examples then fail too, on the names the import would have bound), else None."""
    by_docstring: dict[str, list[str]] = {}
    for block in report.split(_BLOCK_SEPARATOR):
        where = _WHERE.search(block)
        if where is not None and "Failed example:" in block:
            by_docstring.setdefault(where.group(1), []).append(block)
    missing = []
    for blocks in by_docstring.values():
        reasons = [r for r in map(_missing_optional, blocks) if r is not None]
        if not reasons:
            return None
        missing += reasons
    return sorted(set(missing)) or None


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # importorskip's rule, for a package outside xlard only
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "xlard":
            raise
        pytest.skip(f"{name} needs {exc.name}, which is not installed: {exc}")
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = doctest.testmod(module, optionflags=OPTIONFLAGS, report=True)
    if result.failed:
        text = report.getvalue()
        missing = _only_missing_dependencies(text)
        if missing:
            pytest.skip(f"{name}: examples need {', '.join(missing)}")
        pytest.fail(f"{result.failed} of {result.attempted} docstring examples of {name} failed:\n{text}",
                    pytrace=False)
    # nothing an example wrote landed outside the temporary folders it made
    assert not any(tmp_path.iterdir()), f"examples of {name} wrote {sorted(p.name for p in tmp_path.iterdir())} " \
                                        "into the working directory"
