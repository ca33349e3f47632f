"""The README and docs/ are the front door: their links resolve inside the repository, their
Python examples run, their command lines parse, and the README's layout names every module."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [README] + sorted((ROOT / "docs").glob("*.md"))

_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_EXTERNAL = ("http://", "https://", "mailto:")


def _links(path: Path) -> list[str]:
    text = path.read_text()
    return _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)


def _blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


def _section(path: Path, title: str) -> str:
    text = path.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{path.name} has no '## {title}' section"
    return match.group(1)


def test_markdown_files_exist():
    assert README.is_file()
    assert {p.name for p in MARKDOWN} >= {"README.md", "method.md", "benchmarks.md", "ops.md", "shapes.md"}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_in_the_repository(path):
    links = _links(path)
    broken = []
    for target in links:
        if target.startswith(_EXTERNAL) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        if ROOT not in resolved.parents or not resolved.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links outside the repository or to nothing: {broken}"
    if path == README:
        assert {"docs/method.md", "docs/benchmarks.md", "docs/ops.md"} <= set(links)


def test_the_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [the spec](../shared/spec/method.md), [ops](docs/ops.md) and [web](https://x.org)\n")
    assert _links(page) == ["../shared/spec/method.md", "docs/ops.md", "https://x.org"]


def test_nothing_cites_files_outside_the_repository():
    # Built from parts so that this file does not match itself.
    outside = re.compile(re.escape("../" + "shared") + "|" + re.escape("shared" + "/spec") + "|"
                         + re.escape("/" + "work/"))
    files = MARKDOWN + sorted((ROOT / "xlard").rglob("*.py")) + sorted((ROOT / "scripts").glob("*"))
    cited = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files if p.is_file()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not cited, "\n".join(cited)


def test_readme_quickstart_is_the_first_bash_block_with_two_commands():
    first = _blocks(README, "bash")[0].strip().splitlines()
    assert len(first) == 2
    assert "pytest" in first[1]  # .ci/run reads the test command from this line


@pytest.mark.parametrize("index", range(len(_blocks(README, "python"))))
def test_readme_python_examples_run(index, tmp_path):
    code = _blocks(README, "python")[index]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr[-4000:]}"
    if "write_html_report(" in code:
        assert (tmp_path / "report.html").stat().st_size > 1000
        # the explanation the README quotes is the one the (seeded) example prints
        (quoted,) = re.findall(r"for example `(count [^`]+)`", README.read_text())
        assert quoted in proc.stdout, proc.stdout


def test_shapes_doc_python_example_runs(tmp_path):
    """docs/shapes.md's evaluation example (the shipped backbone's images, the exact evaluator's table)."""
    from xlard.shapes import backbone

    if not backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    (code,) = _blocks(ROOT / "docs" / "shapes.md", "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "overall" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("a photo of a square ")


def test_readme_has_python_examples_for_the_ops_and_the_method():
    blocks = _blocks(README, "python")
    assert any("xlard.ops as ops" in b for b in blocks)
    assert any("ExplainableRewards" in b and "ResidualCorrector" in b and "DiffusersBackbone" in b for b in blocks)


def test_readme_command_lines_parse_and_cover_every_command():
    from xlard import cli

    parser = cli.build_parser()
    commands = set()
    lines = [line for block in _blocks(README, "bash") for line in block.splitlines() if line.startswith("xlard ")]
    assert lines
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")
        commands.add(argv[0])
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert commands == set(subcommands), f"README lacks: {set(subcommands) - commands}"


def _layout_paths(text: str) -> set[str]:
    """Paths named by an indented tree (4-space-indented markdown code block), one entry per line."""
    paths, stack = set(), []  # stack of (indent, path)
    for line in text.splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = parent + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def test_the_layout_parser_nests_by_indentation():
    tree = "    a/   x\n      b.py  y\n      c/\n        d.py\n    e.py\n"
    assert _layout_paths(tree) == {"a", "a/b.py", "a/c", "a/c/d.py", "e.py"}


def test_readme_layout_names_every_module():
    named = _layout_paths(_section(README, "Layout"))
    package = ROOT / "xlard"
    expected = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if "__pycache__" in rel.parts or path.name == "_build_config.py":  # written by setup.py
            continue
        if path.name == "__init__.py" and path.parent != package:
            expected.add(str(rel.parent))  # a subpackage is named by its folder
        else:
            expected.add(str(rel))
    for folder in ("csrc", "kernels", "benches", "tests", "scripts", "docs"):
        expected.add(folder)
    missing = sorted(expected - named)
    assert not missing, f"README's Layout section does not name: {missing}"
