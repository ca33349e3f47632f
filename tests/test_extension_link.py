"""xlard._C reaches the C++ runtime torch runs with, as a shared library.

The first GPU run (an H200 machine whose default compiler, an /opt/gcc wrapper, had
only libstdc++.a in its search path) built a _C with a second, static libstdc++ inside:
every error message that formatted a number crashed the process (SIGSEGV in
ostream::_M_insert<long>). setup.py now links the libstdc++ torch loaded; these tests
check the built extension and the ELF reader that xlard.info and the import-time
warning use.
"""
from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from helpers import assert_component_argument_errors
from xlard import _extension

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects are Linux's")


def _readelf_needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


@linux_only
def test_extension_needs_the_shared_cxx_runtime():
    assert _extension.has_ops(), _extension.load_error()
    needed = _extension.needed_libraries(_extension._extension_path())
    assert needed is not None
    assert "libstdc++.so.6" in needed or any(n.startswith("libc++.so") for n in needed), needed
    assert _extension.cxx_runtime().startswith("shared (")
    assert _extension.build_info()["cxx_runtime"] == _extension.cxx_runtime()


@linux_only
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_needed_libraries_matches_readelf():
    libs = [_extension._extension_path(), *sorted(glob.glob(os.path.join(torch.__path__[0], "lib", "libc10.so")))]
    for path in libs:
        assert _extension.needed_libraries(path) == _readelf_needed(path), path


def test_needed_libraries_on_files_that_are_not_shared_objects(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file\n")
    assert _extension.needed_libraries(str(text)) is None
    assert _extension.needed_libraries(str(tmp_path / "missing.so")) is None
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"\xff" * 8)
    assert _extension.needed_libraries(str(truncated)) is None
    # A 32-bit ELF header is not read (the extension is never one).
    elf32 = tmp_path / "elf32.so"
    elf32.write_bytes(b"\x7fELF\x01\x01\x01" + b"\0" * 120)
    assert _extension.needed_libraries(str(elf32)) is None


def test_needed_libraries_reads_a_minimal_shared_object(tmp_path):
    """A hand-made ELF64 file: a string table and a dynamic section naming two libraries."""
    strtab = b"\0libfoo.so.1\0libstdc++.so.6\0"
    dynamic = struct.pack("<qQqQqQqQ", 1, 1, 5, 0, 1, 13, 0, 0)  # NEEDED foo, STRTAB, NEEDED stdc++, NULL
    str_off, dyn_off = 64, 64 + len(strtab)
    sh_off = dyn_off + len(dynamic)
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HH", header, 0x3A, 64, 3)
    sections = (struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                + struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
                + struct.pack("<IIQQQQIIQQ", 0, 6, 0, 0, dyn_off, len(dynamic), 1, 0, 8, 16))
    path = tmp_path / "mini.so"
    path.write_bytes(bytes(header) + strtab + dynamic + sections)
    assert _extension.needed_libraries(str(path)) == ["libfoo.so.1", "libstdc++.so.6"]


def test_cpu_error_messages_with_numbers_do_not_crash():
    """The crash needed a number in the message: these all format one."""
    assert_component_argument_errors("cpu")


def test_a_c_extension_older_than_the_python_code_is_named(monkeypatch):
    """A checkout updated without a rebuild: every CPU op failed with a bare AttributeError of torch.ops."""
    import xlard._extension as ext
    import xlard.ops as ops

    real = torch.ops.xlard

    class Older:
        def __getattr__(self, name):
            if name == "_set_cpu_env":
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(ext, "_cpu_env_given", None)
    monkeypatch.setattr(torch.ops, "xlard", Older(), raising=False)
    with pytest.raises(RuntimeError, match="xlard._C was built from older sources than the xlard Python code"):
        ops.cpu_isa()
