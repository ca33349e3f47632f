"""Every ``>>>`` example in xlard's docstrings runs as written: one test per module, through ``doctest.testmod``.

Each module's examples run in a fresh temporary working directory (an example that writes a file by a relative
name would otherwise write into the checkout), with temporary folders they make inside the test's own, and with
the Hugging Face hub offline. A module is skipped only when an optional dependency is not installed
(``pip install 'xlard[method]'`` not done) and that is what failed: its import, or the first failing example of
every docstring that fails. With every optional package installed nothing is skipped; any other failure fails the
test with doctest's own report.
"""
from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import io
import pkgutil
import re
import tempfile

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


def _not_installed() -> dict[str, str]:
    """Top-level module -> "dist (pip install ...)" of each optional dependency that is not installed."""
    return {top: f"{dist} (pip install 'xlard[{extra}]')" for top, (dist, extra) in EXTRAS.items()
            if importlib.util.find_spec(top) is None}


def _missing_optional(text: str, absent: dict[str, str]) -> str | None:
    """The absent optional dependency this error text names, or None (a real failure)."""
    for match in _MISSING.finditer(text):
        if match.group(1) is not None:
            top = match.group(1).partition(".")[0]
        else:  # require() names the distribution
            top = next((t for t, (dist, _) in EXTRAS.items() if dist == match.group(2)), "")
        if top in absent:
            return absent[top]
    return None


def _only_missing_dependencies(report: str, absent: dict[str, str]) -> list[str] | None:
    """The absent optional packages when the first failing example of every failing docstring failed because one
    is absent (its later examples then fail too, on the names the import would have bound), else None."""
    first: dict[str, str] = {}
    for block in report.split(_BLOCK_SEPARATOR):
        where = _WHERE.search(block)
        if where is not None and "Failed example:" in block:
            first.setdefault(where.group(1), block)
    reasons = [_missing_optional(block, absent) for block in first.values()]
    return None if not reasons or None in reasons else sorted(set(reasons))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("XLARD_CPU_BUFFER_CACHE_MB", raising=False)  # an example shows the default cache at work
    work, scratch = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the folders examples make go away with tmp_path
    absent = _not_installed()
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        reason = _missing_optional(f"{type(exc).__name__}: {exc}", absent)
        if reason is None:
            raise
        pytest.skip(f"{name} needs {reason}")
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = doctest.testmod(module, optionflags=OPTIONFLAGS, report=True)
    if result.failed:
        text = report.getvalue()
        missing = _only_missing_dependencies(text, absent) if absent else None
        if missing:
            pytest.skip(f"{name}: examples need {', '.join(missing)}")
        pytest.fail(f"{result.failed} of {result.attempted} docstring examples of {name} failed:\n{text}",
                    pytrace=False)
    # nothing an example wrote landed in the working directory
    assert not any(work.iterdir()), f"examples of {name} wrote {sorted(p.name for p in work.iterdir())} " \
                                    "into the working directory"
