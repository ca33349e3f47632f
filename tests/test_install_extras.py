"""Declared dependencies match what runs: each install variant of pyproject.toml, simulated.

The development environment has everything installed (scipy, OpenCV, pytest, ...), so an
import that only the test extra provides would pass every other test. Here a subprocess
sees only the modules that ``pip install xlard`` (torch + numpy) or ``pip install
'xlard[method]'`` would bring: the dependency closure is read from the installed
distributions' metadata, and a meta-path filter makes every other top-level module
unfindable (``import scipy`` raises ModuleNotFoundError, ``find_spec`` returns None, as
on a clean install). In that sandbox:

- base: every module of ``xlard`` imports, every op of ``xlard.ops`` runs (checked
  against ``xlard.reference``), ``xlard info`` and ``xlard prompts`` work, and what
  needs the ``method`` extra fails with one line naming it;
- method: each CLI command runs once on the shapes backbone with tiny settings.

A static check covers the code paths no command runs: outside ``xlard/_optional.py``'s
extras, modules import only the standard library, torch, numpy and xlard.
"""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements")
packaging_utils = pytest.importorskip("packaging.utils")
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BASE_IMPORTS = {"torch", "numpy"}  # [project].dependencies, as import names


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``requirements`` pull in, transitively."""
    seen: set[str] = set()
    todo = [(packaging_requirements.Requirement(r), ("",)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = packaging_utils.canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency of a dependency that is not installed here
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        wanted = ("",) + tuple(sorted(req.extras))
        todo.extend((packaging_requirements.Requirement(r), wanted) for r in dist.requires or [])
    return {name for name, _ in seen}


def _visible_modules(extras: tuple[str, ...]) -> list[str]:
    """Top-level import names a clean ``pip install 'xlard[extras]'`` provides (besides the stdlib)."""
    project = _project()
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    missing = [r for r in requirements if not _installed(r)]
    if missing:
        pytest.skip(f"declared dependencies not installed here: {missing}")
    dists = _closure(requirements)
    visible = {"xlard"}
    for module, owners in metadata.packages_distributions().items():
        if any(packaging_utils.canonicalize_name(d) in dists for d in owners):
            visible.add(module)
    return sorted(visible)


def _installed(requirement: str) -> bool:
    try:
        metadata.distribution(packaging_requirements.Requirement(requirement).name)
    except metadata.PackageNotFoundError:
        return False
    return True


# Runs first in the sandboxed interpreter: only the stdlib and the visible modules can be found.
_SANDBOX = textwrap.dedent("""
    import importlib.util, json, sys
    _visible = set(json.loads(sys.argv.pop(1))) | set(sys.stdlib_module_names) | set(sys.builtin_module_names)

    class _OnlyDeclared:
        # Wraps a finder: a module outside the install's closure is not found (None), as on a clean install.
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            # sysconfig's per-platform data module is stdlib but not in sys.stdlib_module_names.
            if top not in _visible and not top.startswith("_sysconfigdata"):
                return None
            find = getattr(self.finder, "find_spec", None)
            return None if find is None else find(name, path, target)

        def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the meta path too
            find = getattr(self.finder, "find_distributions", None)
            return iter(()) if find is None else find(*args, **kwargs)

        def invalidate_caches(self):
            invalidate = getattr(self.finder, "invalidate_caches", None)
            if invalidate is not None:
                invalidate()

    sys.meta_path[:] = [_OnlyDeclared(f) for f in sys.meta_path]
    assert importlib.util.find_spec("scipy") is None and importlib.util.find_spec("cv2") is None
    assert importlib.util.find_spec("pytest") is None
""")


def _run_sandboxed(extras: tuple[str, ...], body: str, tmp_path: Path, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "XLARD_", "PYTEST"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    code = _SANDBOX + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(_visible_modules(extras))], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def test_the_sandbox_hides_what_the_install_lacks():
    base = set(_visible_modules(()))
    method = set(_visible_modules(("method",)))
    assert {"torch", "numpy", "xlard"} <= base
    assert not {"scipy", "cv2", "pytest", "hypothesis", "diffusers", "PIL", "triton"} & base
    assert {"diffusers", "transformers", "safetensors", "tqdm", "PIL"} <= method
    assert not {"scipy", "cv2", "pytest", "hypothesis"} & method


def test_base_install_imports_everything_and_runs_every_op(tmp_path):
    body = """
        import importlib, os, pkgutil, torch
        import xlard, xlard.ops as ops, xlard.reference as ref
        from xlard import cli

        for mod in pkgutil.walk_packages(xlard.__path__, "xlard."):
            if mod.name not in ("xlard._C", "xlard.__main__"):  # __main__ would run the CLI
                importlib.import_module(mod.name)

        g = torch.Generator().manual_seed(0)
        maps = torch.rand(2, 3, 9, 11, generator=g)
        cents = torch.rand(2, 4, 2, generator=g)
        rel = torch.tensor([[0, 1, ops.LEFT_OF], [2, 3, ops.ABOVE]])
        feats, cols = torch.randn(2, 12, 8, generator=g), torch.randn(3, 8, generator=g)
        z0, delta, noise = (torch.randn(2, 4, 5, 6, generator=g) for _ in range(3))
        log_std = torch.full((4,), -1.0)
        calls = {
            "label_components": lambda f: f(maps),
            "count_components": lambda f: f(maps, min_area=2),
            "component_stats": lambda f: f(maps, max_components=4),
            "attention_centroids": lambda f: f(maps),
            "position_scores": lambda f: f(cents, rel),
            "color_scores": lambda f: f(feats, cols),
            "residual_correction": lambda f: f(z0, delta, 0.5),
            "gaussian_log_prob": lambda f: f(noise, delta, log_std),
            "sample_correction": lambda f: f(z0, delta, log_std, noise, 0.5),
        }
        public = {n for n in ops.__all__ if callable(getattr(ops, n)) and n != "provider"}
        helpers = {"cpu_buffer_cache_bytes", "empty_cpu_buffer_cache", "cpu_isa"}
        assert public - helpers == set(calls), f"ops without a base-install check: {public - helpers - set(calls)}"
        for name, call in calls.items():
            got, want = call(getattr(ops, name)), call(getattr(ref, name))
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        assert ops.empty_cpu_buffer_cache() >= 0 and ops.cpu_buffer_cache_bytes() >= 0
        assert ops.cpu_isa() in ("baseline", "avx2", "avx512")

        assert cli.main(["info"]) == 0
        assert cli.main(["prompts", "p.jsonl", "-n", "6"]) == 0
        print("CLI-RENDER-EXIT", cli.main(["render", "out", "--prompts", "p.jsonl", "--quiet"]))
        print("CLI-RENDER-MADE-OUT", os.path.exists("out"))  # the missing pillow is named before any work

        from xlard.explain import save_png
        from xlard.shapes import backbone
        from xlard.backbones import DiffusersBackbone
        from xlard.models import CorrectorConfig, ResidualCorrector
        corrector = ResidualCorrector(CorrectorConfig.preset("tiny", latent_channels=4, text_dim=8, pooled_dim=8))
        checks = [lambda: save_png("x.png", torch.zeros(3, 4, 4)), backbone.load_pipeline,
                  lambda: DiffusersBackbone.from_pretrained(backbone.backbone_path()),
                  lambda: corrector.save_pretrained("corrector")]
        for check in checks:
            try:
                check()
            except ImportError as exc:
                print("MISSING", str(exc))
            else:
                raise SystemExit(f"{check} ran without the method extra")
        for name in ("scipy", "cv2", "PIL", "diffusers", "transformers", "triton"):
            assert name not in sys.modules, name
    """
    proc = _run_sandboxed((), body, tmp_path)
    missing = [line for line in proc.stdout.splitlines() if line.startswith("MISSING")]
    assert len(missing) == 4, proc.stdout
    for line in missing:
        assert line.endswith("pip install 'xlard[method]'"), line
    assert "CLI-RENDER-EXIT 2" in proc.stdout and "CLI-RENDER-MADE-OUT False" in proc.stdout
    render_error = [line for line in proc.stderr.splitlines() if line.startswith("xlard render: error:")]
    assert render_error and render_error[0].endswith("pip install 'xlard[method]'"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_method_install_runs_every_cli_command(tmp_path):
    body = """
        import json
        from pathlib import Path
        from xlard import cli

        tiny = ["--backbone", "shapes", "--steps", "2"]
        commands = [
            ["info", "--json"],
            ["prompts", "p.jsonl", "-n", "6", "--seed", "1"],
            ["render", "truth", "--prompts", "p.jsonl"],
            ["eval", "--folder", "truth", "--json", "truth.json", "--quiet"],
            ["generate", "a photo of a red circle", "a photo of two blue squares", "--out", "gen", "--batch", "1",
             *tiny],
            ["eval", "--prompts", "p.jsonl", "--images", "flat", "--quiet"],
            ["eval", "--prompts", "p2.jsonl", "--out", "evalgen", "--json", "gen.json", "--quiet", *tiny],
            ["generate", "a photo of a red circle", "--backbone", "shapes", "--correct", "--out", "gencorr",
             "--quiet"],
            ["demo", "--out", "demo", "--items-per-tag", "1", "--steps", "1", "--per-tag", "1", "--seeds", "0",
             "--quiet",
             "--set", "distill.epochs=1", "--set", "distill.decoder_epochs=1", "--set", "ppo.prompts_per_step=2",
             "--set", "ppo.group_size=2"],
        ]
        for argv in commands:
            if argv[:2] == ["eval", "--prompts"] and "--images" in argv:
                Path("flat").mkdir()
                for i, png in enumerate(sorted(Path("truth").glob("*/samples/0000.png"))):
                    (Path("flat") / f"{i:03d}.png").write_bytes(png.read_bytes())
                Path("p2.jsonl").write_text("".join(Path("p.jsonl").read_text().splitlines(True)[:2]))
            print("RUN", argv[0], flush=True)
            assert cli.main(argv) == 0, argv
        assert json.loads(Path("truth.json").read_text())["overall"] == 1.0
        assert sorted(p.name for p in Path("gen").glob("*.png")) == ["0000_seed0.png", "0001_seed1.png"]
        assert len(list(Path("evalgen").glob("*/samples/0000.png"))) == 2
        assert 0.0 <= json.loads(Path("gen.json").read_text())["overall"] <= 1.0
        assert len(list(Path("gencorr").glob("*.png"))) == 3  # corrected, base, LAM
        assert json.loads(Path("demo/demo.json").read_text())["complete"] is True
        for name in ("scipy", "cv2", "pytest", "triton"):
            assert name not in sys.modules, name
        print("ALL-OK")
    """
    proc = _run_sandboxed(("method",), body, tmp_path)
    assert "ALL-OK" in proc.stdout
    # generate's progress bar counts batches (2 prompts in batches of 1: 2 batches), and says so.
    generate_err = proc.stderr
    assert "2/2" in generate_err and "batch" in generate_err, generate_err[-2000:]
    assert "img/s" not in generate_err and "s/img" not in generate_err
    assert "6/6" in generate_err and ("prompt/s" in generate_err or "s/prompt" in generate_err)  # render: folders


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.partition(".")[0], id(node) not in lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.partition(".")[0], id(node) not in lazy))
    return found


def test_every_import_is_stdlib_a_base_dependency_or_a_declared_extra():
    from xlard import _optional

    project = _project()
    declared = {extra: {packaging_utils.canonicalize_name(packaging_requirements.Requirement(r).name)
                        for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    for module, (dist, extra) in _optional.EXTRAS.items():
        assert packaging_utils.canonicalize_name(dist) in declared[extra], (module, dist, extra)
    base = {packaging_utils.canonicalize_name(packaging_requirements.Requirement(r).name)
            for r in project["dependencies"]}
    assert base == BASE_IMPORTS

    allowed_everywhere = set(sys.stdlib_module_names) | BASE_IMPORTS | {"xlard", "__future__"}
    problems = []
    files = sorted((ROOT / "xlard").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for module, at_top in _imports(path):
            if module in allowed_everywhere:
                continue
            rel = path.relative_to(ROOT)
            if module not in _optional.EXTRAS:
                problems.append(f"{rel}: imports {module}, which no extra of pyproject.toml declares")
            elif at_top:
                problems.append(f"{rel}: imports {module} at module level; import it on use "
                                "(xlard._optional.require) so the base install can import the module")
    for path in sorted((ROOT / "kernels").glob("*.py")):  # xlard._kernels: loaded only when Triton is asked for
        problems += [f"{path.relative_to(ROOT)}: imports {m}" for m, _ in _imports(path)
                     if m not in allowed_everywhere | {"triton"}]
    assert not problems, "\n".join(problems)


def test_missing_message_is_one_line_naming_the_extra():
    from xlard import _optional

    message = _optional.missing_message("PIL.Image", "xlard.explain.save_png",
                                        ModuleNotFoundError("No module named 'PIL'", name="PIL"))
    assert message == "xlard.explain.save_png needs pillow: pip install 'xlard[method]'"
    inner = _optional.missing_message("diffusers", "x", ModuleNotFoundError("No module named 'regex'", name="regex"))
    assert inner.startswith("x needs diffusers: pip install 'xlard[method]' (diffusers is installed but")
    assert "\n" not in inner
    with pytest.raises(ImportError, match=r"^xlard.test needs triton: pip install 'xlard\[triton\]'"):
        _optional.require("triton.definitely_not_a_module_of_triton", "xlard.test")


def test_require_drops_only_the_torchvision_notice(monkeypatch):
    """Loading a pipeline without torchvision printed transformers' notice that image processors fall back to
    PIL before every command's first line; require() drops that message and no other."""
    import logging

    from xlard import _optional

    logger = logging.getLogger("transformers.utils.import_utils")
    monkeypatch.setattr(logger, "filters", [])  # as before anything required diffusers
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # earlier tests may have quieted transformers (xlard --quiet does)
    try:
        notice = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                  "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning(notice)
        assert records == [notice]  # nothing drops it before require()
        _optional.require("json", "xlard.test")  # not diffusers/transformers: no filter
        logger.warning(notice)
        assert len(records) == 2
        _optional.require("transformers", "xlard.test")
        _optional.require("diffusers", "xlard.test")
        assert logger.filters == [_optional._NOTICE_FILTER]  # added once
        logger.warning(notice)
        logger.warning("Could not import module 'X'.")
        assert records[2:] == ["Could not import module 'X'."]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_diffusers_loads_skip_the_accelerate_recommendation(monkeypatch):
    import importlib.util

    import torch

    pytest.importorskip("diffusers")
    from xlard.backbones import diffusers_backbone as db

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    kwargs = db.diffusers_load_kwargs(torch.float16)
    assert kwargs.pop("low_cpu_mem_usage") is False
    assert kwargs == db.diffusers_dtype_kwargs(torch.float16)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "accelerate" else real(name, *a))
    assert "low_cpu_mem_usage" not in db.diffusers_load_kwargs(torch.float16)  # accelerate's default stands
