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
        assert "xlard._C is not built" in report, report
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
