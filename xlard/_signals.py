"""Ctrl-C and SIGTERM for xlard's command line and scripts.

SIGTERM (``kill``, ``timeout``, a batch scheduler's preemption, torchrun stopping its workers) is raised as
:class:`Terminated`, a KeyboardInterrupt, so that the cleanup Ctrl-C runs (temporary files removed, folder
locks released) runs for it too; :func:`run_script` ends either in one line on stderr and exit code 130
(Ctrl-C) or 143 (SIGTERM). ``XLARD_TRACEBACK=1`` re-raises instead (for debugging xlard itself).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

__all__ = ["Terminated", "sigterm_interrupts", "interrupted_line", "run_script", "import_held"]


class Terminated(KeyboardInterrupt):
    """SIGTERM while :func:`sigterm_interrupts` is active, raised like Ctrl-C's KeyboardInterrupt."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (a second SIGTERM during
    the cleanup kills at once). Left alone where SIGTERM already has a handler of its caller's, or off the
    main thread (where Python cannot set one); the default handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM") \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def import_held(names) -> None:
    """Import the modules ``names`` with SIGINT and SIGTERM held back until they are in; a signal that came meanwhile
    is delivered right after (as KeyboardInterrupt / :class:`Terminated`, at a point Python can handle it).

    An interrupt raised inside torch's extension import ended in ``std::terminate`` (exit -6, a C++ stack, a
    temporary folder left), and numpy turns one inside its own into an ImportError that read as a broken numpy
    install. Off the main thread, or without ``pthread_sigmask``, the modules are imported as usual.
    """
    import importlib

    names = [n for n in names if n not in sys.modules]
    if not names:
        return
    held = {signal.SIGINT} | ({signal.SIGTERM} if hasattr(signal, "SIGTERM") else set())
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        for name in names:
            importlib.import_module(name)
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def interrupted_line(prog: str, exc: KeyboardInterrupt, hint: str = "") -> tuple[str, int]:
    """The one line and the exit code of an interrupted command: 130 for Ctrl-C, 143 for SIGTERM."""
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    return f"{prog}: {what}; every file written is complete{hint}", 143 if isinstance(exc, Terminated) else 130


def run_script(prog: str, main: Callable[[], int | None], hint: str = "") -> int:
    """``main()`` with SIGTERM as :class:`Terminated`; Ctrl-C or SIGTERM end in one line on stderr (``hint``
    appended, e.g. how to resume) and exit code 130 or 143. Returns ``main()``'s exit code (0 for None)."""
    try:
        with sigterm_interrupts():
            return int(main() or 0)
    except KeyboardInterrupt as exc:
        if os.environ.get("XLARD_TRACEBACK") == "1":
            raise
        line, code = interrupted_line(prog, exc, hint)
        print(line, file=sys.stderr)
        return code
    except (USER_ERRORS + (OSError,)) as exc:
        # a mistake the user can fix (a bad value, a missing or unreadable file, a folder another run holds):
        # one line and exit 2, as the command line does, not a traceback; any other OSError is the system's
        # (a full disk, a model that cannot be fetched): the same line, exit 1
        if os.environ.get("XLARD_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1


#: Exceptions that carry a message for the user (see :func:`run_script`); XLARD_TRACEBACK=1 shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)
