"""The source distribution carries everything the extension build reads (headers, the
included kernel bodies, the Triton kernels), so building from an sdist works like
building from a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to know which files are the project's")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if os.path.isfile(os.path.join(ROOT, line))]


def _copy(tracked, src) -> None:
    for rel in tracked:  # a copy: setup.py writes its build record next to the sources
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), src / rel)


def test_sdist_carries_every_source_the_build_reads(tmp_path):
    tracked = _tracked_files()
    src = tmp_path / "src"
    _copy(tracked, src)
    for folder in ("benches", "tests"):  # a checkout that ran the benchmarks and the tests holds their bytecode
        (src / folder / "__pycache__").mkdir(exist_ok=True)
        (src / folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    env = dict(os.environ, XLARD_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = list((tmp_path / "dist").glob("xlard-*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    # the build's sources, and what a user of the sdist runs: the whole test suite (its helpers and data were
    # missing: 19 collection errors), the configs the README names, the scripts, the benchmarks (the report's test
    # and scripts/gpu_check.sh import them: "No module named 'benches'")
    needed = [rel for rel in tracked if rel.startswith(("csrc/", "kernels/", "tests/", "configs/", "scripts/",
                                                        "benches/")) or rel in (
        "setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "requirements-dev.txt")]
    missing = sorted(rel for rel in needed if rel not in names)
    assert not missing, f"the sdist lacks {missing}"
    assert not any(name.endswith(".so") for name in names), "a built extension leaked into the sdist"
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names), "bytecode in the sdist"


def test_a_wheel_carries_the_package_data_and_the_triton_kernels_without_warnings(tmp_path):
    """What a non-editable ``pip install .`` puts into site-packages (build_py: the Python files and package
    data, without compiling): every shipped weight file and the Triton kernels as ``xlard._kernels``, and
    setuptools has nothing to warn about (it printed a "Package would be ignored" notice per data folder
    and a deprecation of pyproject's license table, on every build)."""
    tracked = _tracked_files()
    src = tmp_path / "src"
    _copy(tracked, src)
    out = tmp_path / "lib"
    env = dict(os.environ, XLARD_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "build_py", "-d", str(out)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("Package would be ignored", "is absent from the `packages` configuration", "deprecated"):
        assert text not in proc.stderr + proc.stdout, (text, proc.stderr[-3000:])
    built = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    data = [rel for rel in tracked if rel.startswith("xlard/data/") and not rel.endswith(".py")]
    assert data, "no package data tracked"
    missing = sorted(rel for rel in data if rel not in built)
    assert not missing, f"a wheel would lack {missing}"
    kernels = [rel for rel in tracked if rel.startswith("kernels/") and rel.endswith(".py")]
    assert kernels and all("xlard/_kernels/" + rel.split("/", 1)[1] in built for rel in kernels), sorted(built)
    assert not any("__pycache__" in rel for rel in built)
    assert "xlard/py.typed" in built, "a wheel would lack the PEP 561 marker: users' type checkers ignore xlard"


def _annotated_api():
    """(name, function) of what a user calls from their own typed code: the ops and their references, the
    corrector's and projector's public methods, the corrector folder's load/save."""
    import importlib
    import inspect

    ops = importlib.import_module("xlard.ops")
    out = []
    for module in ("xlard.ops", "xlard.reference"):
        mod = importlib.import_module(module)
        out += [(f"{module}.{n}", getattr(mod, n)) for n in ops.__all__
                if inspect.isfunction(getattr(mod, n, None)) and n != "provider"]
    from xlard import evaluation, models

    for cls in (models.ResidualCorrector, models.LatentRewardProjector):
        out += [(f"{cls.__name__}.{n}", f) for n, f in vars(cls).items()
                if inspect.isfunction(f) and not n.startswith("_")]
    out += [(f"xlard.evaluation.{n}", getattr(evaluation, n))
            for n in ("save_corrector_dir", "load_corrector_dir", "load_backbone_for")]
    return out


def test_the_public_api_is_annotated_for_type_checkers():
    """xlard ships ``py.typed``, so a user's mypy/pyright reads these signatures: every argument and the
    result carries an annotation, and every annotation resolves (a misspelt or unimported name would only
    show as an error in the user's checker)."""
    import inspect
    import typing

    api = _annotated_api()
    assert len(api) >= 35, [name for name, _ in api]
    from xlard import _args, ops

    assert set(typing.get_args(ops.Mode)) == set(_args.MODES)  # every mode the ops take (otsu was left out)
    for name, fn in api:
        sig = inspect.signature(fn)
        bare = [p for p, v in sig.parameters.items() if p != "self" and v.annotation is inspect.Parameter.empty]
        assert not bare, f"{name}: arguments {bare} have no annotation"
        assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return annotation"
        module = sys.modules[fn.__module__]
        hints = typing.get_type_hints(fn, vars(module) | _checking_names(module))
        assert "return" in hints and set(sig.parameters) - {"self"} <= set(hints), (name, hints)


def _checking_names(module) -> dict:
    """The names a module imports only under ``typing.TYPE_CHECKING`` (annotations may use them)."""
    import ast
    import importlib

    names = {}
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    src = importlib.import_module(stmt.module)
                    names.update({a.asname or a.name: getattr(src, a.name) for a in stmt.names})
                elif isinstance(stmt, ast.Import):
                    names.update({a.asname or a.name.split(".")[0]: importlib.import_module(a.name.split(".")[0])
                                  for a in stmt.names})
    return names


def test_setup_sh_names_a_python_that_is_too_old(tmp_path):
    """An older Python failed in pip's resolver ("Cannot install torch==2.13.0"), and its .venv was kept."""
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -V ]; then echo 'Python 3.9.18'; exit 0; fi\nexit 1\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh")], env={"PATH": "/usr/bin:/bin",
                         "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "xlard needs Python 3.10 or newer" in out.stderr and "Python 3.9.18" in out.stderr, out.stderr


def test_a_missing_compiler_is_one_line(tmp_path):
    """Without a C++ compiler the build printed some 240 lines of torch and ninja output, the cause buried."""
    tracked = _tracked_files()
    src = tmp_path / "src"
    _copy([rel for rel in tracked if not rel.startswith(("tests/", "docs/", "benches/", "xlard/data/"))], src)
    env = dict(os.environ, XLARD_WITH_CUDA="0", CXX="/nonexistent/c++")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "xlard needs a C++ compiler to build its kernels, and '/nonexistent/c++' (from CXX) was not found" \
        in proc.stderr
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value, outcome", [
    ("garbage", "TORCH_CUDA_ARCH_LIST: expected compute capabilities separated by ';' (e.g. \"8.0;9.0\""),
    ("8.0;sm_80", "got '8.0;sm_80', which torch"),
    ("Hopper+PTX", "Unknown CUDA arch (9.0+PTX+PTX)"),  # torch expands the name with its own +PTX
    ("native", "native builds for this machine's GPUs, and it has none"),
    ("", "8.0;9.0"),  # set but empty: the default (torch read it as "detect the GPU" and failed: IndexError)
    (" 8.0;9.0 ", "8.0;9.0"),  # spaces around: torch read them and refused "Unknown CUDA arch ()"
    ("8.6+PTX 9.0a", "8.6+PTX 9.0a"),
    ("Hopper", "Hopper"),
])
def test_cuda_arch_list_is_checked_before_the_build(tmp_path, value, outcome):
    """A bad TORCH_CUDA_ARCH_LIST was a 48-line torch traceback ("Unknown CUDA arch (garbage)") after the build had
    recorded it. Checked here on a CPU torch made to look like a CUDA build (no GPU or CUDA torch needed)."""
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "xlard").mkdir()
    (tmp_path / "csrc").mkdir()
    code = ("import torch; torch.version.cuda = '13.0'\n"
            "from torch.utils import cpp_extension; cpp_extension.CUDA_HOME = '/usr/local/cuda'\n"
            "import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLARD_WITH_CUDA="1", TORCH_CUDA_ARCH_LIST=value))
    record = tmp_path / "xlard" / "_build_config.py"
    if outcome.startswith(("TORCH_CUDA_ARCH_LIST", "got", "Unknown", "native")):
        assert proc.returncode == 1 and outcome in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not record.exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"'cuda_arch_list': {outcome!r}" in record.read_text()
