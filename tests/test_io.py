"""xlard._io: atomic writes, regular-file-or-new-path only, the user's umask; the only writer in the code."""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from xlard import _io

from helpers import hold_folder_in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                           (0o002, 0o664, 0o775)])
def test_new_files_and_folders_follow_the_umask(tmp_path, mask, file_mode, folder_mode):
    with umask(mask):
        _io.atomic_write_text(tmp_path / "a.txt", "hi")
        _io.atomic_write_json(tmp_path / "deep" / "b.json", {"x": 1}, make_parents=True)
        _io.atomic_save_safetensors(tmp_path / "w.safetensors", {"t": torch.zeros(2)})
        with _io.atomic_folder(tmp_path / "model") as tmp:
            _io.atomic_write_bytes(tmp / "c.bin", b"\0")
    for f in ("a.txt", "deep/b.json", "w.safetensors", "model/c.bin"):
        assert mode(tmp_path / f) == file_mode, f
    assert mode(tmp_path / "deep") == folder_mode
    assert mode(tmp_path / "model") == folder_mode


def test_an_existing_file_keeps_its_mode_and_gets_the_new_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    _io.atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640
    assert leftovers(tmp_path) == []


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    _io.atomic_write_json(link, [1, 2])
    assert link.is_symlink() and real.read_text() == "[\n  1,\n  2\n]\n"


def test_a_fifo_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO.*not a regular file"):
        _io.atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []
    # ...also through a symlink that points at it
    (tmp_path / "to-pipe").symlink_to(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        _io.atomic_write_bytes(tmp_path / "to-pipe", b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_is_refused_and_left_alone(tmp_path):
    # A private copy of /dev/null's node: if the refusal ever broke, the test would replace
    # this node in tmp_path, never the system's device.
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(ValueError, match="character device"):
        _io.atomic_write_text(node, "x")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _io.atomic_write_text(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.atomic_write_text(tmp_path / "missing" / "a.txt", "x")


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="not JSON-serializable"):
        _io.atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_the_temporary_file_keeps_the_suffix(tmp_path):
    with _io.atomic_path(tmp_path / "img.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.exists()
        tmp.write_bytes(b"png")
    assert (tmp_path / "img.png").read_bytes() == b"png"


def test_atomic_folder_refuse_merge_replace(tmp_path):
    target = tmp_path / "m"
    with _io.atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with pytest.raises(FileExistsError, match="already holds files"):
        with _io.atomic_folder(target) as tmp:
            (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "1"
    with _io.atomic_folder(target, existing="merge") as tmp:
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2" and (target / "b").read_text() == "1"
    with _io.atomic_folder(target, existing="replace") as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    with pytest.raises(RuntimeError):
        with _io.atomic_folder(target, existing="replace") as tmp:
            (tmp / "d").write_text("4")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert leftovers(tmp_path) == []
    # merge onto a folder where one destination is a FIFO: refused before any file is replaced
    os.mkfifo(target / "z")
    with pytest.raises(ValueError, match="FIFO"):
        with _io.atomic_folder(target, existing="merge") as tmp:
            (tmp / "c").write_text("new")
            (tmp / "z").write_text("new")
    assert (target / "c").read_text() == "3" and stat.S_ISFIFO(os.lstat(target / "z").st_mode)
    os.unlink(target / "z")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        with _io.atomic_folder(tmp_path / "file"):
            pass


def _writes_outside_io(path: Path) -> list[str]:
    """Calls that replace or create files by hand: tempfile.mkstemp/mkdtemp, os.replace/rename."""
    banned = {("tempfile", "mkstemp"), ("tempfile", "mkdtemp"), ("tempfile", "NamedTemporaryFile"),
              ("os", "replace"), ("os", "rename")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in banned:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.value.id}.{node.func.attr}")
    return found


def test_check_writable_folder_changes_nothing_and_names_what_is_wrong(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b"
    assert _io.check_writable_folder(deep, "--out") == deep
    assert list(tmp_path.iterdir()) == []  # nothing created, the probe removed
    assert _io.check_writable_folder(tmp_path, "--out") == tmp_path and list(tmp_path.iterdir()) == []
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out: .*f exists and is not a folder"):
        _io.check_writable_folder(a_file, "--out")
    with pytest.raises(NotADirectoryError, match=r"--out: .*f/x cannot be created: .*f is not a folder"):
        _io.check_writable_folder(a_file / "x", "--out")
    real = _io._new_temp_folder
    monkeypatch.setattr(_io, "_new_temp_folder", lambda parent, name: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if Path(parent) == tmp_path else real(parent, name))
    with pytest.raises(PermissionError, match=r"--out: cannot create .*a/b in .* \(?Permission denied") as info:
        _io.check_writable_folder(deep, "--out")
    assert info.value.errno == 13 and "choose a folder you can write to" in str(info.value)
    with pytest.raises(PermissionError, match=r"--out: cannot write into .*: Permission denied"):
        _io.check_writable_folder(tmp_path, "--out")


def test_write_errors_name_the_destination_not_the_temporary(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_io, "_new_temp_file", refuse)
    with pytest.raises(PermissionError) as info:
        _io.atomic_write_text(tmp_path / "out.json", "{}", owner="--json")
    assert str(info.value) == f"--json: cannot write {tmp_path / 'out.json'}: Permission denied"
    assert info.value.errno == 13
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=r"^--out: cannot create folder .*new: Permission denied$"):
        _io.make_folder(tmp_path / "new", "--out")
    with pytest.raises(NotADirectoryError, match="a part of its folder path is a file"):
        (tmp_path / "f").write_text("x")
        _io.check_output_path(tmp_path / "f" / "out.json", "--json")


def test_every_file_write_goes_through_xlard_io():
    files = [p for p in sorted((ROOT / "xlard").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
             if p.name != "_io.py"]
    assert files
    offenders = [hit for p in files for hit in _writes_outside_io(p)]
    assert offenders == [], "write files with xlard._io (atomic_path / atomic_write_*), not by hand"


# --------------------------------------------------------------------------------------------
# Output folder locks


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_folder_lock_refuses_a_second_process_and_is_reentrant_within_one(tmp_path):
    folder = tmp_path / "out"
    proc = hold_folder_in_subprocess(folder)
    try:
        with pytest.raises(_io.FolderInUseError, match=r"--out: .*out is in use by another running xlard process"):
            with _io.folder_lock(folder, "--out"):
                pass
        assert isinstance(_io.FolderInUseError("x"), ValueError)  # the CLI's one-line usage error, exit 2
    finally:
        proc.communicate("", timeout=60)
    assert not folder.exists()  # the other process made it and left it empty: removed with its lock
    with _io.folder_lock(folder, "--out"):
        with _io.folder_lock(folder / ".." / "out", "again"):  # the same folder, same process: fine
            (folder / "a.txt").write_text("x")
    with _io.folder_lock(folder, "--out"):  # released: free again
        pass


def test_folder_lock_removes_only_a_folder_it_made_that_stayed_empty(tmp_path):
    with _io.folder_lock(tmp_path / "new" / "out", "x"):
        assert (tmp_path / "new" / "out").is_dir()
    assert not (tmp_path / "new" / "out").exists()  # a run that failed before writing leaves nothing
    with _io.folder_lock(tmp_path / "kept", "x") as folder:
        (folder / "f").write_text("x")
    assert (tmp_path / "kept" / "f").is_file()
    (tmp_path / "mine").mkdir()
    with _io.folder_lock(tmp_path / "mine", "x"):
        pass
    assert (tmp_path / "mine").is_dir()  # not made by the lock: kept even though empty


def test_holds_folder_finds_the_argument(tmp_path):
    seen = []

    @_io.holds_folder("args.out", "--out")
    def command(args):
        seen.append([str(p) for p in _io._LOCKS])
        return 7

    class Args:
        out = str(tmp_path / "o")

    assert command(Args()) == 7 and seen == [[os.path.realpath(tmp_path / "o")]] and not _io._LOCKS
    (tmp_path / "file").write_text("x")
    Args.out = str(tmp_path / "file")
    assert command(Args()) == 7 and seen[-1] == []  # a file: left to the command to refuse


def test_json_is_strict_nan_and_infinity_as_null(tmp_path):
    """json.dumps writes a bare NaN, which strict parsers (JavaScript's JSON.parse) reject."""
    data = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": (float("nan"), "x")}}
    assert _io.dumps(data, sort_keys=True) == '{"a": null, "b": [null, null, 1.5], "c": {"d": [null, "x"]}}'
    path = _io.atomic_write_json(tmp_path / "x.json", data)

    def strict(name):
        raise ValueError(name)

    assert json.loads(path.read_text(), parse_constant=strict)["b"] == [None, None, 1.5]


def test_trim_jsonl_cuts_after_the_last_row_it_keeps(tmp_path):
    from xlard import _io

    log = tmp_path / "m.jsonl"
    assert _io.trim_jsonl(log, lambda r: True) == 0 and not log.exists()  # no file: nothing to do
    log.write_text('{"step": 1}\n{"event": "checkpoint", "step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert _io.trim_jsonl(log, lambda r: r.get("event") == "checkpoint" and r["step"] == 1) == 3
    assert log.read_text() == '{"step": 1}\n{"event": "checkpoint", "step": 1}\n'
    assert _io.trim_jsonl(log, lambda r: r.get("step") == 9) == 0  # no such row: unchanged
    assert log.read_text() == '{"step": 1}\n{"event": "checkpoint", "step": 1}\n'


def test_a_long_file_name_is_written(tmp_path):
    name = "L" * 250 + ".png"
    with _io.atomic_path(tmp_path / name) as tmp:
        assert tmp.suffix == ".png" and len(tmp.name.encode()) <= 255
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x" and leftovers(tmp_path) == []


def test_a_trailing_slash_is_a_folder_not_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="ends with a path separator"):
        _io.check_output_path(f"{tmp_path}/new/")
    with pytest.raises(IsADirectoryError):
        with _io.atomic_path(f"{tmp_path}/new/", make_parents=True) as tmp:
            tmp.write_bytes(b"x")
    assert not (tmp_path / "new").exists()


def test_merge_never_leaves_a_half_old_half_new_folder(tmp_path, monkeypatch):
    """An interruption while merging left the new config.json beside the old weights (merge replaced file by
    file); now the folder is swapped whole and the old folder's other files are moved in afterwards."""
    target = tmp_path / "model"
    with _io.atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("old")
        (tmp / "weights").write_text("old")
        (tmp / "README.md").write_text("mine")
    real = os.replace
    calls = []

    def failing(a, b):
        calls.append((a, b))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_folder(target, existing="merge") as tmp:
            (tmp / "config.json").write_text("new")
            (tmp / "weights").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "old", "weights": "old",
                                                                  "README.md": "mine"}
    with _io.atomic_folder(target, existing="merge") as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "weights").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "new", "weights": "new",
                                                                  "README.md": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or .old folder left


def test_atomic_folder_names_the_destination_on_a_system_error(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with _io.atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")

    def denied(a, b):
        raise PermissionError(13, "Permission denied", str(a))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError, match=r"^me: cannot write folder .*model: Permission denied$"):
        with _io.atomic_folder(target, owner="me", existing="merge") as tmp:
            (tmp / "a").write_text("new")
    monkeypatch.undo()
    assert (target / "a").read_text() == "old"


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """A full disk was a bare "[Errno 28] No space left on device" (which of --json and --results?), and torch.save's
    own error for it ("[enforce fail at inline_container.cc] unexpected pos") a traceback from xlard train."""
    import errno
    import shutil
    from collections import namedtuple

    target = tmp_path / "out.json"
    with pytest.raises(OSError, match=r"--json: cannot write .*out.json: No space left on device") as e:
        with _io.atomic_path(target, owner="--json") as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert e.value.errno == errno.ENOSPC and not target.exists() and list(tmp_path.iterdir()) == []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    from xlard.train.checkpoint import save_atomic

    def full_save(obj, path):
        Path(path).write_bytes(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60800 vs 60688")

    monkeypatch.setattr(torch, "save", full_save)
    with pytest.raises(OSError, match=r"checkpoint: cannot write .*ckpt.pt: No space left on device \(RuntimeError"):
        save_atomic({"a": 1}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []  # the partial temporary is gone
    with pytest.raises(ValueError, match="not a disk problem"):  # another error of a writer passes through as it is
        with _io.atomic_path(tmp_path / "x.json"):
            raise ValueError("not a disk problem")


def test_a_file_size_limit_while_torch_save_writes_is_named_in_one_line(tmp_path):
    """A real limit (RLIMIT_FSIZE, as `ulimit -f`): torch's zip writer said "unexpected pos" and xlard train ended in
    a traceback, since the disk was not full; a full disk looked "not full" once the partial checkpoint (over 1 MiB)
    had been deleted. The writer's file is now probed while it still holds its space."""
    import subprocess
    import sys

    script = (
        "import resource, sys, torch\n"
        "from xlard.train.checkpoint import save_atomic\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        "    save_atomic({'w': torch.zeros(1 << 20)}, sys.argv[1])\n"
        "except OSError as e:\n"
        "    print(e.errno, e)\n"
        "from xlard import _io\n"
        "try:\n"  # another error of a writer near the limit passes through as it is (the probe would hit the limit)
        "    with _io.atomic_path(sys.argv[1] + '.x') as tmp:\n"
        "        open(tmp, 'wb').write(bytes(1000))\n"
        "        raise ValueError('not a disk problem')\n"
        "except ValueError as e:\n"
        "    print('passed through:', e, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt.pt")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import errno
    code, _, message = out.stdout.strip().partition(" ")
    assert int(code) == errno.EFBIG, out.stdout
    assert re.search(r"checkpoint: cannot write .*ckpt\.pt: File too large \(RuntimeError", message), message
    assert list(tmp_path.iterdir()) == []  # no partial file left
    assert "passed through: not a disk problem" in out.stderr


@pytest.mark.parametrize("existing", ["merge", "replace"])
def test_atomic_folder_keeps_the_modes_of_what_it_replaces(tmp_path, existing):
    """merge and replace swapped in a folder made with the umask's mode: a chmod 700 model folder came back
    0755 and a 0600 weights file 0644 (atomic_path keeps a file's mode)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_text("old")
    (folder / "sub").mkdir()
    (folder / "sub" / "part.bin").write_text("old")
    os.chmod(folder, 0o700)
    os.chmod(folder / "weights.bin", 0o600)
    os.chmod(folder / "sub" / "part.bin", 0o640)
    with _io.atomic_folder(folder, existing=existing) as tmp:
        (tmp / "weights.bin").write_text("new")
        if existing == "replace":  # (merge takes files at the top level only)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "part.bin").write_text("new")
        (tmp / "fresh.json").write_text("{}")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "weights.bin").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder / "sub" / "part.bin").st_mode) == 0o640
    assert (folder / "sub" / "part.bin").read_text() == ("new" if existing == "replace" else "old")
    assert stat.S_IMODE(os.stat(folder / "fresh.json").st_mode) == 0o666 & ~_io.current_umask()
    assert (folder / "weights.bin").read_text() == "new"


def test_remove_temporaries_leaves_a_users_own_dot_tmp_files(tmp_path):
    """Every render/generate/eval start deleted any ``.tmp-*`` entry: a user's .tmp-notes.txt and .tmp-scratch/."""
    (tmp_path / ".tmp-notes.txt").write_text("mine")
    (tmp_path / ".tmp-scratch").mkdir()
    (tmp_path / ".tmp-scratch" / "x").write_text("mine")
    _io.atomic_write_text(tmp_path / "a.png", "done")
    ours = _io._new_temp_file(tmp_path, "b.png")  # ours, as a killed write leaves them
    _io._new_temp_folder(tmp_path, "model")
    assert _io.is_temporary(ours.name) and not _io.is_temporary(".tmp-notes.txt")
    _io.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes.txt", ".tmp-scratch", "a.png"]
    assert (tmp_path / ".tmp-scratch" / "x").read_text() == "mine"


def test_trim_jsonl_keeps_a_row_holding_a_line_separator(tmp_path):
    """splitlines() also broke at U+2028 (legal inside a JSON string): the row kept was rewritten in two pieces."""
    path = tmp_path / "m.jsonl"
    rows = [{"step": 1, "note": "a\u2028b\u0085c"}, {"step": 2}, {"step": 3}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert _io.trim_jsonl(path, lambda row: row["step"] <= 2) == 1
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line] == rows[:2]


def test_standard_streams_and_dot_names_are_refused_as_outputs(tmp_path):
    """--json /dev/stdout either failed with "cannot write into /proc/123/fd" (a pipe) or replaced the file the
    shell redirected stdout to (the printed table lost); "new/." became a file named "new"."""
    for name in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        with pytest.raises(ValueError, match=f"{name} is a process's open stream .*give the path of a file"):
            _io.check_output_path(name, "--json")
    link = tmp_path / "out.json"
    link.symlink_to("/dev/stdout")
    with pytest.raises(ValueError, match="open stream"):
        _io.check_output_path(link, "--json")
    for name in ("new/.", "new/..", "."):  # (as strings: pathlib drops a trailing ".")
        with pytest.raises(IsADirectoryError, match="folder"):
            _io.check_output_path(f"{tmp_path}/{name}" if name != "." else name, "OUT")
    assert not (tmp_path / "new").exists()


def test_a_write_protected_file_is_refused_not_replaced(tmp_path, monkeypatch):
    """A chmod 444 output was replaced by the rename (a shell's `>` refuses it). The tests may run as root, for
    whom every file is writable: the protection is simulated at os.access."""
    path = tmp_path / "keep.json"
    path.write_text("precious")
    real = os.access
    monkeypatch.setattr(_io.os, "access", lambda p, mode, **kw: False if Path(p) == path.resolve() and mode == os.W_OK
                        else real(p, mode, **kw))
    with pytest.raises(PermissionError, match="keep.json is write-protected; make it writable"):
        _io.atomic_write_text(path, "new")
    assert path.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


@pytest.mark.parametrize("where", [".", "sub"])
def test_saving_over_the_working_folder_moves_the_process_into_the_new_one(tmp_path, monkeypatch, where):
    """save_pretrained(".") swapped the folder and left the process in the deleted old one: os.getcwd() failed and
    from_pretrained(".") found no files."""
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    monkeypatch.chdir(folder / where)
    with _io.atomic_folder(folder, existing="merge") as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.path.samefile(os.getcwd(), folder / where)
    assert (folder / "config.json").read_text() == "{}" and (folder / "notes.txt").read_text() == "mine"
    assert Path("config.json" if where == "." else "../config.json").is_file()


def test_replacing_a_folder_holding_the_working_subfolder_moves_the_process_to_the_folder(tmp_path, monkeypatch):
    """'replace' drops the old subfolders: the process was left in a deleted one."""
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "old.txt").write_text("x")
    monkeypatch.chdir(folder / "sub")
    with _io.atomic_folder(folder, existing="replace") as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.path.samefile(os.getcwd(), folder) and not (folder / "sub").exists()
