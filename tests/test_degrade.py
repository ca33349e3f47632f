"""Degrade loudly: without the compiled extension, import still works and ops name the fix."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_missing_extension_gives_a_clear_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["xlard._C"] = None  # what an unbuilt checkout looks like
        import torch
        import xlard.ops as ops
        from xlard import info
        report = info.format_report(info.collect())
        assert "xlard._C is not available" in report, report
        try:
            ops.count_components(torch.rand(2, 4, 4))
        except RuntimeError as exc:
            assert "pip install --no-build-isolation -e ." in str(exc), exc
            print("OK")
        else:
            raise SystemExit("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_unknown_provider_and_bad_env_are_named(monkeypatch):
    import pytest
    import torch

    import xlard.ops as ops
    from xlard import _backends

    with pytest.raises(ValueError, match="provider"):
        with ops.provider("opencl"):
            pass
    monkeypatch.setenv("XLARD_CUDA_PROVIDER", "rocm")
    with pytest.raises(ValueError, match="XLARD_CUDA_PROVIDER"):
        _backends.requested_provider("cuda")
    with ops.provider("cuda"):  # a CUDA provider cannot serve CPU tensors: said, not silently ignored
        with pytest.raises(RuntimeError, match="provider 'cuda'"):
            ops.count_components(torch.rand(3, 3))


def test_info_prints_each_reason_once():
    from xlard import info

    data = info.collect()
    report = info.format_report(data)
    reasons = {why for row in data["providers"] for why in row["status"].values() if why is not None}
    assert reasons, "this machine should lack some provider (no GPU in CI)"
    for why in reasons:
        assert report.count(why) == 1, why
    rows = [line for line in report.splitlines() if line.startswith("count_components")]
    assert rows and all(": ok" in line or ": no [" in line for line in rows)


def test_ops_layer_modules_import_without_a_cycle():
    """ops -> _backends -> _triton_ops -> ops was a cycle; the registration helpers now
    live in xlard._registration, which imports no other xlard module (lazy imports count)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "xlard"
    names = ("ops", "_backends", "_triton_ops", "_registration", "_extension", "_args")
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "xlard":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xlard."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("xlard."))
        graph[name] = deps & set(names)
    assert graph["_registration"] == set()
    seen, stack = set(), set()

    def visit(n):
        assert n not in stack, f"import cycle through {n}: {graph}"
        if n in seen:
            return
        stack.add(n)
        for d in graph[n]:
            visit(d)
        stack.discard(n)
        seen.add(n)

    for n in names:
        visit(n)


def test_a_truncated_extension_is_named_instead_of_a_bus_error(tmp_path):
    """Loading a shared object cut short maps pages past its end: the process died of SIGBUS with no message."""
    import glob

    import pytest

    from xlard import _extension

    found = glob.glob(str(__import__("pathlib").Path(_extension.__file__).parent / "_C*.so"))
    if not found:
        pytest.skip("no compiled xlard._C here")
    data = open(found[0], "rb").read()
    assert _extension._truncated_elf(found[0]) is None
    cut = tmp_path / "_C.so"
    cut.write_bytes(data[: len(data) // 3])
    assert "a truncated or damaged file" in _extension._truncated_elf(str(cut))
    (tmp_path / "plain.so").write_bytes(b"not an elf")
    assert _extension._truncated_elf(str(tmp_path / "plain.so")) is None  # the import names that one itself


def test_the_fix_named_depends_on_a_checkout_or_an_install(tmp_path):
    from xlard import _extension

    checkout = tmp_path / "repo"
    (checkout / "xlard").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    assert "-e ." in _extension._fix_hint(str(checkout / "xlard" / "_extension.py"))
    site = tmp_path / "site-packages"
    (site / "xlard").mkdir(parents=True)
    # xlard is on no index: "pip install xlard" found nothing; the fix names the checkout or sdist path
    hint = _extension._fix_hint(str(site / "xlard" / "_extension.py"))
    assert "rebuild xlard against this torch from its checkout or source distribution" in hint
    assert "<path to the checkout or the .tar.gz>" in hint


def test_the_fix_names_a_torch_other_than_the_build_one(monkeypatch):
    """A _C built against another torch failed to load with a bare undefined-symbol error."""
    import torch

    from xlard import _build_config, _extension

    monkeypatch.setitem(_build_config.BUILD, "torch", "2.12.0+cpu")
    assert f"built against torch 2.12.0+cpu and this is torch {torch.__version__}" in _extension._fix_hint()
    monkeypatch.setitem(_build_config.BUILD, "torch", torch.__version__)
    assert "built against" not in _extension._fix_hint()


def test_info_shows_a_bad_provider_setting_in_the_report(monkeypatch):
    from xlard import info

    monkeypatch.setenv("XLARD_CUDA_PROVIDER", "bogus")
    report = info.format_report(info.collect())
    assert "setting: XLARD_CUDA_PROVIDER: expected 'cuda' or 'triton', got 'bogus'" in report
    assert "count_components" in report
