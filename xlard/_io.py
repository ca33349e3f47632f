"""Atomic file output: the one place xlard writes files from.

Every file xlard writes (JSONL, JSON, PNG, HTML, safetensors, checkpoints) goes
through :func:`atomic_path`: the data goes to a temporary file in the
destination folder, is flushed to disk, and then replaces the destination with
one ``os.replace``. A reader sees the old file or the complete new one, never a
partial write; an interrupted write (Ctrl-C, an exception, a full disk) leaves
the old file untouched and no temporary file behind.

Three rules hold for every write:

- **Only regular files are replaced.** The destination must be a regular file
  or a path that does not exist yet. A folder, a FIFO, a socket or a device
  (``/dev/full``, ``/dev/null``) is refused: an atomic rename would replace the
  device node itself with a regular file (as root it can). A symbolic link is
  followed: its target is written, and the link stays.
- **Permissions follow the user's umask.** New files are created with mode
  ``0o666`` and folders with ``0o777``, minus the umask (``tempfile.mkstemp``
  and ``mkdtemp`` would make them ``0o600``/``0o700``). A file that already
  exists keeps its permission bits.
- **Durable.** The file is fsynced before the rename and its folder after it.

Folders written as a whole (a saved model, one GenEval prompt folder) use
:func:`atomic_folder`: the files go to a temporary folder beside the target,
which is then renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "check_output_path",
    "check_output_file",
    "unwritable_output",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "atomic_folder",
    "make_folder",
    "check_writable_folder",
    "current_umask",
    "FolderInUseError",
    "folder_lock",
    "holds_folder",
]

_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_output_path(path: str | os.PathLike[str], owner: str = "xlard") -> Path:
    """Check that ``path`` may be (re)written: a regular file or a new path.

    Symbolic links are resolved, so the returned path is where the bytes go.

    Args:
        path: the destination file.
        owner: who is writing, for error messages (e.g. ``"xlard.geneval.write_jsonl"``).

    Returns:
        Path: the resolved destination.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: a part of ``path``'s folder is a file.
        ValueError: ``path`` exists and is a FIFO, socket or device.

    Example:
        >>> check_output_path("results.jsonl")  # doctest: +SKIP
        PosixPath('/home/me/results.jsonl')
    """
    _check_path(owner, path)
    text = os.fspath(path)
    if _opened_stream(text):  # /dev/stdout: a pipe ("cannot write into /proc/123/fd") or the file the shell
        # redirected it to, which the rename replaced (the command's printed table lost)
        raise ValueError(f"{owner}: {path} is a process's open stream (like /dev/stdout), not a file to write; "
                         "give the path of a file (or -, where a command writes to standard output)")
    target = Path(os.path.realpath(text))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        slash = text.endswith(("/", os.sep)) or bool(os.altsep and text.endswith(os.altsep))
        if slash or os.path.basename(text) in (".", ".."):
            # realpath drops the slash: "out/new/" (or "out/new/.") would have become a file named "new"
            end = "a path separator" if slash else repr(os.path.basename(text))
            raise IsADirectoryError(f"{owner}: {path} ends with {end} (a folder); give the path of "
                                    "a file to write") from None
        return target
    except NotADirectoryError:
        raise NotADirectoryError(f"{owner}: cannot write {path}: a part of its folder path is a file, "
                                 "not a folder") from None
    except OSError as exc:  # a name too long, a loop of links, ...: named, not a bare "[Errno 36]"
        raise _reraise(exc, f"{owner}: cannot write {path}") from None
    if stat.S_ISREG(st.st_mode):
        if not os.access(target, os.W_OK):  # the rename would replace it all the same: refused as `>` is
            raise PermissionError(f"{owner}: {path} is write-protected; make it writable "
                                  "(chmod u+w) or give another path")
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{owner}: {path} is a folder; give the path of a file to write")
    raise ValueError(f"{owner}: {path} is {_kind(st.st_mode)}, not a regular file; refusing to replace it "
                     "(give the path of a regular file or of a new one)")


def _opened_stream(text: str) -> bool:
    """Whether ``text`` names one of this process's open descriptors (``/dev/stdout``, ``/dev/fd/1``,
    ``/proc/self/fd/1``), directly or through links."""
    where = os.path.abspath(text)
    for _ in range(40):  # the kernel's own limit on a chain of links
        if _FD_PATH.match(where) or where in ("/dev/stdin", "/dev/stdout", "/dev/stderr"):
            return True
        try:
            link = os.readlink(where)
        except OSError:  # not a link (or gone): the chain ends here
            return _FD_PATH.match(os.path.realpath(text)) is not None
        where = os.path.normpath(os.path.join(os.path.dirname(where), link))
    return False


_FD_PATH = re.compile(r"/dev/fd/|/proc/(self|thread-self|\d+)(/task/\d+)?/fd/")


def check_output_file(path: str | os.PathLike[str], owner: str = "xlard") -> Path:
    """Check, before any work and changing nothing, that a file can be written at ``path`` later: a regular
    file or a new path (:func:`check_output_path`) in a folder that exists and takes new files
    (:func:`check_writable_folder`).

    Returns:
        Path: the resolved destination.

    Raises:
        FileNotFoundError: the folder does not exist (the message says to create it first).
        OSError, ValueError: as :func:`check_output_path` and :func:`check_writable_folder`.
    """
    target = check_output_path(path, owner)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{owner}: cannot write {path}: folder {target.parent} does not exist; "
                                "create it first")
    check_writable_folder(target.parent, owner)
    return target


def unwritable_output(folders: Mapping[str, str | os.PathLike[str] | None] = (),
                      files: Mapping[str, str | os.PathLike[str] | None] = ()) -> str | None:
    """For a script's argument parser: the one-line reason the first output that cannot be written fails
    (``folders``: flag -> a folder it creates or writes into; ``files``: flag -> a file it writes later), or
    None when all can be written. Checks only, before any work; ``None`` values are skipped."""
    checks = [(flag, path, check_writable_folder) for flag, path in dict(folders).items()]
    checks += [(flag, path, check_output_file) for flag, path in dict(files).items()]
    for flag, path, check in checks:
        if path is None:
            continue
        try:
            check(path, flag)
        except (OSError, ValueError) as exc:
            return " ".join(str(exc).split())
    return None


#: The errors of writing itself (a full disk or quota, a file past the size limit, an I/O error, a read-only
#: file system): :func:`atomic_path` names the destination in them.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _full_disk(exc: BaseException, folder: Path) -> bool:
    """Whether a writer's own exception (not an OSError) is a full disk: its words, or a folder (nearly) full."""
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20) and ("inline_container" in text or "write" in text.lower())
    except OSError:
        return False


def _looks_like_a_write_error(exc: BaseException) -> bool:
    """A writer's own error that may stand for a full disk, quota or size limit (torch's zip writer: "unexpected
    pos", "basic_ios::clear: iostream error"; safetensors: "StorageFull"); other errors pass through as they are."""
    text = str(exc).lower()
    return any(word in text for word in ("inline_container", "unexpected pos", "iostream", "basic_ios",
                                         "storagefull", "no space", "os error", "write", "i/o"))


def describe_load_error(exc: BaseException) -> str:
    """One line on why a saved file could not be read (for "X is damaged (...)" messages): its type and the first
    line of its text, cut at 160 characters; a file that is no torch.save output (weights_only's unpickling error,
    whose text goes on to suggest weights_only=False) says so."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return "UnpicklingError: not a file torch.save wrote"
    from xlard._args import short_reason

    return f"{type(exc).__name__}: {short_reason((str(exc).strip().splitlines() or [''])[0], 160)}"


def _write_limit(tmp: Path) -> OSError | None:
    """After a writer failed with its own error: the OSError writing 1 MiB more to its file meets when a full disk,
    a quota or a file-size limit stopped it (None when writing goes on)."""
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return probe if probe.errno in _WRITE_ERRNOS else None
    return None


def _reraise(exc: OSError, message: str, fix: str = "") -> OSError:
    """``exc`` as the same OSError subclass with ``message`` (which names the destination, not a temporary
    name), the system's reason and ``fix`` appended; the errno is kept, so a full disk stays a system error."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    new = type(exc)(f"{message}: {reason}{fix}")
    new.errno = exc.errno
    return new


def make_folder(path: str | os.PathLike[str], owner: str = "xlard") -> Path:
    """Create ``path`` and its parents (umask permissions); an existing folder is fine.

    Raises:
        NotADirectoryError: ``path`` or a parent exists and is not a folder.
        OSError: the folder cannot be created (its message names ``owner`` and ``path``; the type says why:
            ``PermissionError``, ``FileNotFoundError`` for a place that takes no new folders, ...).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():  # '' was taken as '.', the working folder
        raise ValueError(f"{owner}: a folder must be a non-empty path, got {path!r}")
    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{owner}: {path} exists and is not a folder")
    except OSError as exc:
        if isinstance(exc, NotADirectoryError):
            raise
        raise _reraise(exc, f"{owner}: cannot create folder {path}") from None  # a name too long, ...
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{owner}: cannot create folder {path}: a parent is not a folder") from None
    except OSError as exc:
        raise _reraise(exc, f"{owner}: cannot create folder {path}") from None
    return folder


def check_writable_folder(path: str | os.PathLike[str], owner: str = "xlard") -> Path:
    """Check, changing nothing, that ``path`` is a folder this process can write into or create.

    Meant for a command's outputs before any work: the nearest part of ``path`` that exists must be a
    folder in which a new folder can be made; a probe folder is created there and removed at once (named
    like the atomic writes' temporaries, ``.tmp-*``, which the commands clear away).

    Returns:
        Path: ``path`` made absolute.

    Raises:
        NotADirectoryError: ``path`` or its nearest existing parent is not a folder.
        OSError: nothing can be created there (the message names ``owner``, the path and the reason).

    Example:
        >>> check_writable_folder("runs/demo", "--out")  # doctest: +SKIP
        PosixPath('/home/me/runs/demo')
    """
    _check_path(owner, path)
    target = Path(os.path.abspath(os.fspath(path)))
    try:  # lexists() below reads a name too long as "absent": named now, not a bare "[Errno 36]" later
        os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise _reraise(exc, f"{owner}: cannot use {path}") from None
    existing = target
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():  # a dangling link read "exists and is not a folder"
        raise NotADirectoryError(f"{owner}: {path} {'is' if existing == target else 'lies in'} a dangling link "
                                 f"({existing} -> {os.readlink(existing)}); give a folder path")
    if not existing.is_dir():
        where = "exists and is not a folder" if existing == target else f"cannot be created: {existing} is not a folder"
        raise NotADirectoryError(f"{owner}: {path} {where}")
    try:
        probe = _new_temp_folder(existing, "probe")
    except OSError as exc:
        what = f"cannot write into {path}" if existing == target else f"cannot create {path} in {existing}"
        raise _reraise(exc, f"{owner}: {what}", "; choose a folder you can write to") from None
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return target


class FolderInUseError(ValueError):
    """Another process writes into the output folder now (see :func:`folder_lock`)."""


# This process's locks: the folder's real path -> [descriptor, depth, created by the lock].
_LOCKS: dict[str, list] = {}


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str], owner: str = "xlard") -> Iterator[Path]:
    """Hold an exclusive lock on an output folder while writing into it, so that two runs into one folder
    (a command started twice, two terminals, a job scheduled twice) cannot mix their files.

    The folder is created if needed and locked with ``flock`` on its own descriptor (no lock file is left
    in it); the system drops the lock when the process ends, however it ends, so a killed run never leaves
    a stale lock. Re-entrant within a process (a command that holds the folder calls a library function that
    locks it again). A folder this lock created and that is still empty when it is released is removed
    again. Where ``flock`` is missing or refused (Windows, some network filesystems) the lock is skipped.

    Raises:
        FolderInUseError: another process holds the folder (the message names ``owner`` and the folder).
        OSError: the folder cannot be created (as :func:`make_folder`).

    Example:
        >>> with folder_lock("runs/demo", "--out"):    # doctest: +SKIP
        ...     write_everything()
    """
    folder = Path(path)
    key = os.path.realpath(folder)
    held = _LOCKS.get(key)
    if held is not None:
        held[1] += 1
    else:
        created = not folder.exists()
        make_folder(folder, owner)
        fd = _lock_descriptor(folder, owner, created)
        held = _LOCKS[key] = [fd, 1, created]
    try:
        yield folder
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _LOCKS[key]
            if held[0] is not None:
                os.close(held[0])  # releases the flock
            if held[2]:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty


def holds_folder(argument: str, owner: str):
    """Decorator: run the function holding :func:`folder_lock` on the folder its argument ``argument`` names
    (``"out"``, or ``"args.out"`` for an attribute of an argument). A path that exists and is not a folder is
    left to the function, which refuses it with its own message."""
    name, _, attribute = argument.partition(".")

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            value = bound.arguments[name]
            folder = Path(getattr(value, attribute) if attribute else value)
            if folder.exists() and not folder.is_dir():
                return fn(*args, **kwargs)
            with folder_lock(folder, owner):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def _lock_descriptor(folder: Path, owner: str, created: bool) -> int | None:
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise FolderInUseError(f"{owner}: {folder} is in use by another running xlard process (it holds the "
                               "folder's lock); wait for that run to finish or stop it, or choose another "
                               "folder") from None
    except OSError:  # flock not supported here (some network filesystems): no lock
        os.close(fd)
        return None
    return fd


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on folders: best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc path first)
    os.umask(mask)
    return mask


def pairs_once(pairs: list[tuple[str, Any]], message: str = "duplicate key {key}") -> dict[str, Any]:
    """A JSON object's pairs as a dict, for ``json.loads(..., object_pairs_hook=...)``: a key given twice raises
    ``ValueError(message.format(key=repr(key)))`` (``json.loads`` alone keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(message.format(key=repr(key)))
        out[key] = value
    return out


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}-")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of the atomic writes' temporaries (``.tmp-<8 hex digits>-<name>``)."""
    return _TEMPORARY.match(name) is not None


def remove_temporaries(folder: str | os.PathLike[str]) -> None:
    """Delete the ``.tmp-*`` files and folders the atomic writes left in ``folder`` when a run was killed
    mid-write (SIGKILL): never complete, each as large as what it was writing. Call it only while holding the
    folder (:func:`folder_lock`), so that no other writer's temporaries go."""
    for tmp in Path(folder).glob(".tmp-*"):  # (a missing folder globs nothing)
        if not is_temporary(tmp.name):  # a user's own ".tmp-notes.txt" is not ours
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _new_temp_file(folder: Path, name: str) -> Path:
    # The temporary name keeps the destination's suffix: writers such as cv2.imwrite pick the
    # format from it. Mode 0o666 goes through the umask (mkstemp would force 0o600).
    # A name near the file system's 255-byte limit leaves no room for the prefix: keep its suffix and as much
    # of the stem as fits (the temporary name is never seen; the destination keeps its full name).
    room = 255 - len(".tmp-12345678-".encode())
    if len(os.fsencode(name)) > room:
        suffix = "".join(Path(name).suffixes[-2:])
        if len(os.fsencode(suffix)) > 32:
            suffix = ""
        stem = os.fsencode(name)[:room - len(os.fsencode(suffix))].decode(errors="ignore")
        name = stem + suffix
    for _ in range(100):
        tmp = folder / f".tmp-{secrets.token_hex(4)}-{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, owner: str = "xlard",
                make_parents: bool = False) -> Iterator[Path]:
    """A temporary path to write to; on a clean exit it atomically replaces ``path``.

    The temporary file exists (empty) when the block starts, lies in the
    destination's folder and ends with the destination's name (same suffix).
    On an exception (KeyboardInterrupt included) it is removed and ``path`` is
    left as it was.

    Args:
        path: the destination file (see :func:`check_output_path`).
        owner: who is writing, for error messages.
        make_parents: create missing parent folders (else a missing folder is an error).

    Yields:
        Path: where to write.

    Raises:
        FileNotFoundError: the folder does not exist and ``make_parents`` is False.
        IsADirectoryError, ValueError: see :func:`check_output_path`.

    Example:
        >>> with atomic_path("weights.pt") as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    target = check_output_path(path, owner)
    folder = target.parent
    if make_parents:
        make_folder(folder, owner)
    elif not folder.is_dir():
        raise FileNotFoundError(f"{owner}: cannot write {path}: folder {folder} does not exist")
    old_mode = None
    with contextlib.suppress(FileNotFoundError):
        old_mode = stat.S_IMODE(os.stat(target).st_mode)
    try:
        tmp = _new_temp_file(folder, target.name)
    except OSError as exc:
        raise _reraise(exc, f"{owner}: cannot write {path}") from None
    try:
        yield tmp
        _fsync_file(tmp)
        # Some writers (safetensors) replace the file we created with one of mode 0o600: set it again.
        os.chmod(tmp, old_mode if old_mode is not None else 0o666 & ~current_umask())
        # Re-checked just before the rename: the destination may have changed while we wrote.
        check_output_path(target, owner)
        os.replace(tmp, target)
    except BaseException as exc:
        # torch.save's zip writer ("[enforce fail at inline_container.cc] unexpected pos", "basic_ios::clear:
        # iostream error") and safetensors ("IoError ... StorageFull") report a full disk, a quota or a file-size
        # limit as their own errors (a traceback without the word). Asked while the partial file still holds its
        # space (deleting it first freed the disk of a checkpoint over 1 MiB, which then looked "not full").
        limit = None
        if isinstance(exc, Exception) and not isinstance(exc, OSError) and _looks_like_a_write_error(exc):
            limit = _write_limit(tmp)
            if limit is None and _full_disk(exc, folder):
                limit = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:  # a bare "[Errno 28]" named no file
            raise _reraise(exc, f"{owner}: cannot write {path}") from None
        if limit is not None:
            from xlard._args import short_reason  # (torch, which _args imports, only on this error)

            raise _reraise(limit, f"{owner}: cannot write {path}",
                           f" ({type(exc).__name__}: {short_reason(exc, 160)})") from None
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, owner: str = "xlard",
                       make_parents: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the resolved path.

    Example:
        >>> atomic_write_bytes("image.png", png)  # doctest: +SKIP
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{owner}: data must be bytes, got {type(data).__name__}")
    with atomic_path(path, owner=owner, make_parents=make_parents) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return check_output_path(path, owner)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, owner: str = "xlard",
                      make_parents: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the resolved path.

    Example:
        >>> atomic_write_text("report.html", html)  # doctest: +SKIP
    """
    if not isinstance(text, str):
        raise TypeError(f"{owner}: text must be a str, got {type(text).__name__}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: named before anything is written (the old file stays)
        raise ValueError(f"{owner}: cannot write {path}: the text holds {text[exc.start]!r} at character "
                         f"{exc.start + 1}, which is not a Unicode character (a lone surrogate)") from None
    return atomic_write_bytes(path, data, owner=owner, make_parents=make_parents)


def trim_jsonl(path: str | os.PathLike[str], upto: Callable[[dict], bool], *, owner: str = "xlard") -> int:
    """Cut a JSONL log after its last row for which ``upto(row)`` holds (rewritten atomically); returns how many
    rows were dropped. A resumed run replays the steps after its checkpoint, and their first rows, logged before
    the interruption, stood twice in the log with other values. Without such a row (or without the file) nothing
    changes; a line that is not a JSON object (a cut last line) counts as a row ``upto`` rejects.

    Example:
        >>> trim_jsonl(work / "metrics.jsonl", lambda row: row.get("step", 0) <= checkpoint_step)  # doctest: +SKIP
    """
    if not callable(upto):
        raise TypeError(f"{owner}: trim_jsonl's upto must be a function row -> bool, got {type(upto).__name__}")
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may stand inside a string
    if lines and not lines[-1]:
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    last = -1
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and upto(row):
            last = i
    if last < 0 or last == len(lines) - 1:
        return 0
    atomic_write_text(path, "".join(line + "\n" for line in lines[:last + 1]), owner=owner)
    return len(lines) - 1 - last


#: The manifest in every output folder the command line writes: which command and settings made it, and
#: whether it finished (``xlard eval --folder`` refuses an unfinished one).
MANIFEST_NAME = "xlard-run.json"

#: The paired evaluation's default folder (``xlard eval --corrector/--correct``); ``eval --backbone``'s images go
#: to ``xlard-eval``: two defaults, so that running both as documented does not mix them in one folder.
PAIRED_EVAL_OUT = "xlard-eval-paired"

#: The files that mark each kind of xlard output folder (the first present names the run).
_RUN_MARKERS = ((MANIFEST_NAME, None), ("pairs.jsonl", "eval (with a corrector)"), ("demo.json", "demo"),
                ("ckpt-*.pt", "train"), ("metrics.jsonl", "train"))


def _holds(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds a file ``name`` (a glob pattern when it has a ``*``)."""
    return any(folder.glob(name)) if "*" in name else (folder / name).is_file()


def other_run(folder: str | os.PathLike[str], mine: str | tuple[str, ...]) -> str | None:
    """The xlard command whose outputs ``folder`` holds, when it is not ``mine`` (None: none, or mine), as
    messages name it (:func:`run_label`).

    ``mine``: ``"generate"``, ``"render"``, ``"eval"`` (the images of ``eval --backbone``), ``"eval (with a
    corrector)"``, ``"demo"`` or ``"train"``, or a tuple of commands whose outputs are the same kind (render
    and ``eval --backbone`` both write GenEval prompt folders, which ``--overwrite`` replaces). A command
    writing into a folder of another one mixed the two runs' files and replaced the other's manifest, so
    neither could be resumed or read.
    """
    mine = (mine,) if isinstance(mine, str) else tuple(mine)
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name, command in _RUN_MARKERS:
        if not _holds(folder, name):
            continue
        if command is None:  # the manifest of generate, render and eval --backbone names its command
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None  # unreadable: the command's own checks say so
            command = data.get("command") if isinstance(data, dict) else None
            if not isinstance(command, str):
                return None
        return None if command in mine else run_label(command)
    return None


def run_label(command: Any) -> Any:
    """How a message names a command :func:`other_run` returns or a manifest records: ``eval`` is the images of
    ``eval --backbone`` (the paired evaluation is ``eval (with a corrector)``), where a user who ran both would
    read "xlard eval" as either; anything else (another command, a manifest's None) as it is."""
    return "eval --backbone" if command == "eval" else command


#: Files that say what a folder belongs to (glob patterns allowed), for :func:`claim_folder`.
_KNOWN_FILES = (
    ("xlard_corrector.json", "a corrector"),
    ("model_index.json", "a diffusers pipeline"),
    ("model.safetensors", "a saved model"),
    ("ckpt-*.pt", "the checkpoints of `xlard train`"),
    ("checkpoint.pt", "the checkpoint of scripts/train_shapes_understanding.py"),
    ("data.pt", "the sampled data of scripts/train_shapes_latent_eyes.py"),
    ("metrics.jsonl", "training metrics"),
    (MANIFEST_NAME, "the outputs of `xlard generate`, `render` or `eval`"),
    ("pairs.jsonl", "the outputs of `xlard eval` with a corrector"),
    ("demo.json", "the outputs of `xlard demo`"),
    ("config.json", "a config.json"),
)


def claim_folder(folder: str | os.PathLike[str], flag: str, own: tuple[str, ...],
                 config_keys: tuple[str, ...] | None = None) -> None:
    """Refuse ``folder`` as an output of a tool that writes the files ``own`` when it holds another's files.

    A training script's ``--out`` or work folder given the folder of a corrector, a training run or another
    script replaced that folder's files (a corrector's weights, a run's config.json) or appended to its
    metrics, and left neither usable. ``own`` names the files the tool itself writes (patterns of
    :data:`_KNOWN_FILES`); with ``config_keys``, a ``config.json`` counts as the tool's own only when they are all
    in its ``"model"`` entry (the tool's model config). Files of no known kind (notes, reports) are left alone.

    Raises:
        ValueError: naming ``flag``, the folder and what it holds.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name, what in _KNOWN_FILES:
        if not _holds(folder, name):
            continue
        if name == "config.json" and name in own and config_keys is not None:
            try:
                data = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            model = data.get("model") if isinstance(data, dict) else None
            if isinstance(model, dict) and all(k in model for k in config_keys):
                continue
            what = ("a config.json that is not JSON (damaged? remove it to write here)" if data is None else
                    "a config.json of something else (a training run's or another model's)")
        elif name in own:
            continue
        raise ValueError(f"{flag}: {folder} holds {what} ({name}); writing here would replace or mix with "
                         "its files: choose another folder")


def short_json(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for a message (keys sorted, a path's own letters rather than \\uXXXX), cut at ``limit``."""
    text = json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def changed_setting(name: str, old: Any, new: Any, limit: int = 60) -> str:
    """``name old -> new`` for a message that refuses a resume with other settings, each value as JSON cut at
    ``limit`` characters ("differ: seed" said which setting, not what it was)."""
    def shown(value: Any) -> str:
        return "(absent)" if value is None else short_json(value, limit)

    return f"{name} {shown(old)} -> {shown(new)}"


def _check_path(owner: str, path: Any) -> None:
    """A path argument: TypeError for another type, ValueError for an empty one (a usage mistake, which the
    scripts and the command line report in one line)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a non-empty str or PathLike, got {path!r}")
    if not str(os.fspath(path)).strip():
        raise ValueError(f"{owner}: the path is empty; give a file or folder name")
    if "\x00" in str(os.fspath(path)):  # os refuses it as a bare "embedded null byte"
        raise ValueError(f"{owner}: the path {show_controls(str(os.fspath(path)))!r} holds a NUL character")


_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def show_controls(text: str) -> str:
    """``text`` with the characters a terminal acts on (C0/C1 controls, bidi overrides) shown as escapes: printed
    raw, ESC [2J cleared the screen and a right-to-left override reversed the rest of the line."""
    return _TERMINAL_CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as None: JSON has no NaN (``json.dumps`` writes a bare ``NaN``,
    which strict parsers, JavaScript's ``JSON.parse`` among them, reject). Readers treat null as "undefined",
    as for the training metrics."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``: strict JSON, NaN and infinity as null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, owner: str = "xlard",
                      make_parents: bool = False, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the resolved path.

    Raises:
        ValueError: ``obj`` is not JSON-serializable (nothing is written).

    Example:
        >>> atomic_write_json("summary.json", {"overall": 0.5})  # doctest: +SKIP
    """
    try:
        text = dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{owner}: not JSON-serializable ({exc})") from None
    return atomic_write_text(path, text, owner=owner, make_parents=make_parents)


def atomic_save_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None, *, owner: str = "xlard",
                            make_parents: bool = False) -> Path:
    """``safetensors.torch.save_file`` to ``path``, atomically; returns the resolved path."""
    from safetensors.torch import save_file

    with atomic_path(path, owner=owner, make_parents=make_parents) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return check_output_path(path, owner)


def _new_temp_folder(parent: Path, name: str) -> Path:
    for _ in range(100):
        tmp = parent / f".tmp-{secrets.token_hex(4)}-{name}"
        try:
            os.mkdir(tmp, 0o777)  # through the umask (mkdtemp would force 0o700)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary folder in {parent}")


def _keep_modes(new: Path, old: Path) -> None:
    """Give every file under ``new`` that replaces a file of ``old`` (same relative path) the old file's mode."""
    for folder, _, files in os.walk(new):
        for name in files:
            path = Path(folder, name)
            before = old / path.relative_to(new)
            with contextlib.suppress(OSError):
                st = os.lstat(before)
                if stat.S_ISREG(st.st_mode) and not path.is_symlink():
                    os.chmod(path, stat.S_IMODE(st.st_mode))


def _cwd_inside(folder: Path) -> str | None:
    """The process's working folder when it is ``folder`` or inside it (else None): after the folder is swapped,
    the same path names the new folder, and the process moves there (it stayed in the deleted old one)."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    here, there = os.path.realpath(cwd), os.fspath(folder)
    return cwd if here == there or here.startswith(there.rstrip(os.sep) + os.sep) else None


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], *, owner: str = "xlard",
                  existing: str = "refuse") -> Iterator[Path]:
    """A temporary folder to fill; on a clean exit it becomes ``path`` in one rename.

    When ``path`` does not exist (or is an empty folder) it appears with all its
    files at once. When it is a folder with files, ``existing`` decides:
    ``"refuse"`` raises ``FileExistsError``; ``"replace"`` moves the old
    folder aside, renames the new one into place and then deletes the old one
    (a reader may briefly find no folder, never a mixed one); ``"merge"`` does
    the same and then moves the old folder's entries that the new one does not
    hold into it (kept; the new folder's top-level names must be file paths
    there), so a model is never left half old, half new. On an exception
    the temporary folder is removed and ``path`` is untouched. The folder
    written is a new one at the same path: this process, when it works inside
    it, is moved into the new one (into the same subfolder when the new one
    holds it, else into the folder itself); another process (a shell) inside
    it must enter it again. The temporary folder lies beside ``path``, so its parent
    folder must be writable.

    Args:
        path: the destination folder; its parents are created.
        owner: who is writing, for error messages.
        existing: ``"refuse"``, ``"merge"`` or ``"replace"`` (see above).

    Yields:
        Path: the temporary folder to write into.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        FileExistsError: ``path`` holds files and ``existing`` is ``"refuse"``.

    Example:
        >>> with atomic_folder("runs/corrector", existing="merge") as tmp:  # doctest: +SKIP
        ...     atomic_save_safetensors(tmp / "model.safetensors", state)
    """
    if existing not in ("refuse", "merge", "replace"):
        raise ValueError(f"{owner}: existing must be 'refuse', 'merge' or 'replace', got {existing!r}")
    target = Path(os.path.realpath(os.fspath(path)))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{owner}: {path} exists and is not a folder")
    make_folder(target.parent, owner)
    try:
        tmp = _new_temp_folder(target.parent, target.name)
    except OSError as exc:
        raise _reraise(exc, f"{owner}: cannot write folder {path}") from None
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                _fsync_file(child)
        try:
            try:
                os.rename(tmp, target)  # a missing or empty target: the whole folder appears at once
            except OSError:
                if not target.is_dir():
                    raise
                if existing == "refuse":
                    raise FileExistsError(f"{owner}: {path} already holds files") from None
                new_names = {child.name for child in tmp.iterdir()}
                if existing == "merge":
                    for name in sorted(new_names):  # every destination checked before anything moves
                        check_output_path(target / name, owner)
                folder_mode = stat.S_IMODE(os.stat(target).st_mode)
                _keep_modes(tmp, target)  # a replaced file keeps its mode, as atomic_path keeps it
                inside = _cwd_inside(target)  # this process's working folder, in the folder being swapped
                # The whole folder is swapped (two renames), never replaced file by file: an interruption or a
                # failing write between two files left a new config.json beside the old weights, a folder that
                # no longer loaded. "merge" then moves the old folder's other entries into the new one.
                old = _new_temp_folder(target.parent, target.name + ".old")
                try:
                    os.replace(target, old)  # onto the fresh empty folder: a rename, nothing copied
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.rmdir(old)
                    raise
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.replace(old, target)
                    raise
                if existing == "merge":  # an interruption here leaves them in the .old folder beside it, not lost
                    for child in sorted(old.iterdir()):
                        if child.name not in new_names:
                            os.rename(child, target / child.name)
                    _fsync_folder(target)
                with contextlib.suppress(OSError):  # a chmod 700 model folder stays private
                    os.chmod(target, folder_mode)
                if inside is not None:  # save_pretrained(".") left the process in the deleted old folder
                    try:
                        os.chdir(inside)
                    except OSError:  # a subfolder the new folder does not hold ("replace"): the folder itself
                        with contextlib.suppress(OSError):
                            os.chdir(target)
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            if exc.errno is None:  # ours (FileExistsError, IsADirectoryError above): already says what and where
                raise
            raise _reraise(exc, f"{owner}: cannot write folder {path}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_folder(target.parent)


def read_json(path: str | os.PathLike[str], *, owner: str = "xlard", max_bytes: int = 1 << 20,
              what: str = "a file xlard wrote") -> Any:
    """A small JSON file's content; a file that is too large, not JSON or nested too deeply is one ValueError.

    Args:
        path: the file to read.
        owner: who is reading, for error messages.
        max_bytes: larger files are refused before they are read.
        what: what the file should be, for error messages.

    Raises:
        ValueError: as above, naming the file.
        FileNotFoundError: the file does not exist.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: expected the path of {what} (str or path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():  # was a raw IsADirectoryError
        raise ValueError(f"{owner}: {path} is a folder; expected {what} (a JSON file)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{owner}: {path} is {size} bytes; {what} is under {max_bytes} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{owner}: {path} is not valid JSON ({e})") from None
    except RecursionError:  # deeply nested arrays/objects exhaust the parser's stack
        raise ValueError(f"{owner}: {path} is nested too deeply to be {what}") from None

