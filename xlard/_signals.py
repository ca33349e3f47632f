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


#: Seconds the main thread has to take a Ctrl-C or SIGTERM (Python runs a signal's handler only between
#: bytecodes) before :func:`sigterm_interrupts`' watchdog ends the process; ``XLARD_INTERRUPT_GRACE_S``
#: overrides it (0 turns the watchdog off).
INTERRUPT_GRACE_S = 10.0


def _grace_seconds() -> float:
    text = os.environ.get("XLARD_INTERRUPT_GRACE_S")
    if text is None:
        return INTERRUPT_GRACE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # NaN, negative, infinite: the default, not a hang
        print(f"xlard: XLARD_INTERRUPT_GRACE_S must be a number of seconds >= 0, got {text!r}; using "
              f"{INTERRUPT_GRACE_S:g}", file=sys.stderr)
        return INTERRUPT_GRACE_S
    return value


class _Watchdog:
    """Ends the process when a Ctrl-C or SIGTERM is not taken by the main thread within the grace period.

    A process blocked inside a C call that retries on EINTR (a distributed run's rendezvous waiting up to
    30 minutes for a process that never comes, a collective waiting on a frozen peer) never returns to the
    interpreter, so the handler never ran: ``timeout``, ``kill`` and Ctrl-C did nothing. Python's own C-level
    handler writes each signal's number to the wakeup fd at once; this thread reads it, and if the main
    thread's handler has not run ``grace`` seconds later, says so and exits with 130 / 143 (complete files
    stay complete; a temporary ``.tmp-*`` being written may be left, as after ``kill -9``)."""

    def __init__(self, grace: float):
        self.grace = grace
        self.taken = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        if self.previous != -1:  # someone else's wakeup fd (an event loop): theirs stays, no watchdog
            signal.set_wakeup_fd(self.previous)
            self.close_fds()
            self.thread = None
            return
        self.thread = threading.Thread(target=self._watch, name="xlard-interrupt-watchdog", daemon=True)
        self.thread.start()

    def took(self) -> None:
        """Called by the handlers in the main thread: this signal was taken."""
        with self.cond:
            self.taken += 1
            self.cond.notify_all()

    def _watch(self) -> None:
        seen = 0
        while True:
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            if not data:  # the write end closed: the block is over
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                seen += 1
                with self.cond:
                    if self.cond.wait_for(lambda: self.taken >= seen or self.stopped, timeout=self.grace):
                        if self.stopped and self.taken < seen:  # the block ended: Python's own handler has it
                            return
                        continue
                name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
                print(f"xlard: {name} was not taken within {self.grace:g} s: the process is blocked in a call that "
                      f"does not return (e.g. waiting for another process of a distributed run); exiting now. "
                      f"Complete files are intact; a temporary .tmp-* file may be left",
                      file=sys.stderr, flush=True)
                os._exit(143 if signum == signal.SIGTERM else 130)

    def close_fds(self) -> None:
        for fd in (self.write_fd, self.read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        if self.thread is None:
            return
        signal.set_wakeup_fd(-1)
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            os.close(self.write_fd)  # the reader sees the end of the pipe
        self.thread.join(timeout=1.0)
        with contextlib.suppress(OSError):
            os.close(self.read_fd)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (a second SIGTERM during
    the cleanup kills at once). Left alone where SIGTERM already has a handler of its caller's, or off the
    main thread (where Python cannot set one); the default handler is restored afterwards.

    A watchdog thread ends the process (exit 130 / 143, one line on stderr) when a Ctrl-C or SIGTERM is not
    taken within :data:`INTERRUPT_GRACE_S` seconds because the main thread is blocked in a call that does not
    return (see :class:`_Watchdog`)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM") \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    grace = _grace_seconds()
    watchdog = None
    if grace > 0 and hasattr(os, "set_blocking"):
        try:
            watchdog = _Watchdog(grace)
        except (OSError, ValueError):  # no pipe for the wakeup fd here (Windows wants a socket): Python's handling
            watchdog = None
    own_sigint = watchdog is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if watchdog is not None:
            watchdog.took()
        raise Terminated()

    def interrupted(signum, frame):  # Python's default Ctrl-C, telling the watchdog it was taken
        watchdog.took()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    if own_sigint:
        signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if own_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if watchdog is not None:
            watchdog.stop()


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
