"""Loads the compiled extension ``xlard._C`` and reports what it contains.

Importing this module never fails: a missing or broken ``_C`` is recorded and
reported by :func:`require_ops`, the one place that turns it into an error.
"""
from __future__ import annotations

import importlib
import os
import struct
import sys
import threading
import warnings

import torch

_BUILD_HINT = "pip install --no-build-isolation -e ."


def _fix_hint(package_file: str = __file__) -> str:
    """How to get a working ``_C``: rebuild in a checkout (setup.py beside the package), reinstall otherwise."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    mismatch = _torch_mismatch()
    if os.path.isfile(os.path.join(root, "setup.py")):
        return f"{mismatch}build it with `{_BUILD_HINT}` from the project root ({root})"
    # xlard is on no package index: "pip install xlard" finds nothing; rebuild from the sources it came from
    return (f"{mismatch}rebuild xlard against this torch from its checkout or source distribution: `pip install "
            "--force-reinstall --no-deps --no-build-isolation <path to the checkout or the .tar.gz>`")


def _torch_mismatch() -> str:
    """"built against torch X, running torch Y; " when the two differ (the usual reason a built _C fails to load)."""
    try:
        from xlard import _build_config
    except ImportError:
        return ""
    built = _build_config.BUILD.get("torch")
    if built and built != torch.__version__:
        return f"it was built against torch {built} and this is torch {torch.__version__}: "
    return ""


def _truncated_elf(path: str) -> str | None:
    """Why a 64-bit little-endian ELF file is shorter than its own headers say (None when it is not): loading a
    truncated shared object maps pages past the end of the file and the process dies of a bus error, with no
    message (a copy cut short, a full disk during the install)."""
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = fh.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            phoff, shoff = struct.unpack_from("<QQ", header, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", header, 0x36)
            need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
            if len(table) == phentsize * phnum and phentsize >= 56:
                for i in range(phnum):
                    offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
                    filesz, = struct.unpack_from("<Q", table, i * phentsize + 32)
                    need = max(need, offset + filesz)
    except (OSError, struct.error):
        return None
    return f"{path} is {size} bytes but its headers need {need}: a truncated or damaged file" if size < need else None


_load_error: BaseException | None = None
try:
    import importlib.util

    _spec = importlib.util.find_spec("xlard._C")
    _why = _truncated_elf(_spec.origin) if _spec is not None and _spec.origin else None
    if _why is not None:
        raise ImportError(_why)
    importlib.import_module("xlard._C")
except (ImportError, OSError) as exc:  # no compiled extension, a damaged one, or an ABI mismatch
    _load_error = exc


def _compiled_kernels() -> dict[str, frozenset[str]]:
    """The ``xlard::`` kernels ``_C`` registered per dispatch key, read once at load time.

    Read before any Python registration: where ``_C`` has no CUDA kernel, the Triton
    launchers are registered as the ``xlard::<op>`` CUDA kernels later on, and those
    must not count as compiled ones.
    """
    found = {}
    for key in ("CPU", "CUDA"):
        names = torch._C._dispatch_get_registrations_for_dispatch_key(key) if _load_error is None else []
        found[key] = frozenset(n[len("xlard::"):] for n in names if n.startswith("xlard::"))
    return found


_COMPILED = _compiled_kernels()


def needed_libraries(path: str) -> list[str] | None:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object, in order;
    None when ``path`` is not one (another platform's format, a truncated file).

    Reads the header, the section table, the dynamic section and its string table
    only (an import checks ``_C``, which can be large with CUDA device code)."""
    try:
        with open(path, "rb") as fh:
            def read(offset: int, size: int) -> bytes:
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise ValueError("truncated")
                return data

            header = fh.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            table = read(shoff, shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
            for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
                if sh_type != 6:  # SHT_DYNAMIC
                    continue
                dynamic = read(offset, size)
                strtab = read(sections[link][4], sections[link][5])
                names = []
                for pos in range(0, size, entsize or 16):
                    tag, value = struct.unpack_from("<qQ", dynamic, pos)
                    if tag == 0:  # DT_NULL
                        break
                    if tag == 1:  # DT_NEEDED
                        names.append(strtab[value:strtab.index(b"\0", value)].decode("utf-8", "replace"))
                return names
    except (OSError, struct.error, IndexError, ValueError):
        return None
    return None  # no dynamic section: not a shared object


def _extension_path() -> str | None:
    module = sys.modules.get("xlard._C")
    return getattr(module, "__file__", None) if module is not None else None


def cxx_runtime() -> str:
    """How ``_C`` reaches the C++ runtime: 'shared (<soname>)', 'static' or 'unknown'.

    A ``_C`` linked with a static libstdc++ (a compiler whose search path has only
    libstdc++.a, as the GPU machine's /opt/gcc wrapper had on the first GPU run) holds a
    second C++ runtime beside the one torch runs with; formatting a number into an error
    message then crashes the process. setup.py links the runtime torch loaded to prevent it.
    """
    path = _extension_path()
    needed = needed_libraries(path) if path else None
    if needed is None:
        return "unknown"
    shared = [n for n in needed if n.startswith(("libstdc++.so", "libc++.so"))]
    return f"shared ({shared[0]})" if shared else "static"


if _load_error is None and sys.platform.startswith("linux") and cxx_runtime() == "static":
    warnings.warn(
        f"xlard._C ({_extension_path()}) was linked with a static C++ runtime: an error message "
        "from its kernels can crash the process. Rebuild it with a compiler that has a shared "
        f"libstdc++ (set CXX and CC, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc), then {_BUILD_HINT}",
        RuntimeWarning, stacklevel=2)


def has_ops() -> bool:
    """Whether ``xlard._C`` loaded and registered the ``xlard::`` ops."""
    return _load_error is None and hasattr(torch.ops.xlard, "count_components")


def load_error() -> BaseException | None:
    """The exception raised while loading ``xlard._C``, if any."""
    return _load_error


def require_ops() -> None:
    """Raise a RuntimeError naming the fix when the compiled ops are missing."""
    if not has_ops():
        raise RuntimeError(f"xlard's compiled extension xlard._C is not available ({_load_error!r}); {_fix_hint()}")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``xlard._C`` compiled a kernel of ``xlard::<op>`` for ``dispatch_key`` ("CPU", "CUDA").

    Kernels registered from Python (the Triton launchers serving ``xlard::`` on CUDA
    when ``_C`` has none) do not count. A plain set lookup, so ``torch.compile`` traces it.
    """
    return has_ops() and op in _COMPILED.get(dispatch_key, ())


#: The environment variables the CPU kernels follow (docs/ops.md), and what they were last given.
_CPU_ENV = ("XLARD_CPU_ISA", "XLARD_CPU_BUFFER_CACHE_MB")
_cpu_env_given: tuple | None = None
_cpu_env_lock = threading.Lock()


def sync_cpu_env() -> None:
    """Hand ``XLARD_CPU_ISA`` and ``XLARD_CPU_BUFFER_CACHE_MB`` to the CPU kernels when ``os.environ`` changed them.

    The kernels never call ``getenv`` themselves: with the GIL released, a ``getenv`` racing an
    ``os.environ[...] = ...`` on another thread crashed the process. Here, under the GIL, the
    variables are read on every call of an op (two dictionary lookups) and passed on only when
    they changed.
    """
    global _cpu_env_given
    now = tuple(os.environ.get(name) for name in _CPU_ENV)
    if now == _cpu_env_given:
        return
    with _cpu_env_lock:
        if now != _cpu_env_given:
            try:
                hand_over = torch.ops.xlard._set_cpu_env
            except AttributeError:  # a _C built from older sources than this Python code
                raise RuntimeError(f"xlard._C was built from older sources than the xlard Python code (it has no "
                                   f"_set_cpu_env op); {_fix_hint()}") from None
            hand_over(*now)
            _cpu_env_given = now


def build_info() -> dict:
    """What was compiled into ``_C``: torch version, CUDA support, compile flags."""
    info = {"loaded": has_ops(), "error": None if _load_error is None else repr(_load_error)}
    if has_ops():
        info["cuda_kernels"] = has_kernel("count_components", "CUDA")
        info["cxx_runtime"] = cxx_runtime()
        try:  # the vector level of the CPU correction kernels (XLARD_CPU_ISA caps it)
            sync_cpu_env()  # XLARD_CPU_ISA as os.environ holds it now
            info["cpu_isa"] = torch.ops.xlard._cpu_isa()
        except (AttributeError, RuntimeError, ValueError) as err:
            info["cpu_isa"] = f"unavailable: {err}"
    try:
        from xlard import _build_config  # written by setup.py at build time

        info.update(_build_config.BUILD)
    except ImportError:
        pass
    return info
