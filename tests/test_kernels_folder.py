"""The repository's ``kernels/`` folder (installed as ``xlard._kernels``) must not shadow the
``kernels`` distribution that transformers imports when Python runs in a checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_kernels(extra_path: Path | None) -> str:
    code = ("import sys; sys.path.insert(0, {root!r}); {extra}"
            "import kernels; print(kernels.__file__, getattr(kernels, 'MARK', None))").format(
        root=str(REPO), extra=f"sys.path.append({str(extra_path)!r}); " if extra_path else "")
    # -S: no site-packages, so only the paths given here can hold a `kernels`
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_an_installed_kernels_distribution_wins(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'the distribution'\n")
    out = _import_kernels(tmp_path / "site")
    assert out == f"{fake / '__init__.py'} the distribution"


def test_without_one_the_folder_stays_importable():
    out = _import_kernels(None)
    assert out == f"{REPO / 'kernels' / '__init__.py'} None"
