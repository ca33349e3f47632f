"""The ``xlard`` console script and ``python -m xlard``: the command line (:mod:`xlard.cli`), loaded inside the
interrupt handling, so that Ctrl-C or SIGTERM while Python is still importing it ends in the same one line and
exit code (130 / 143) as later on, not in a traceback."""
from __future__ import annotations

import os
import sys

from xlard._signals import interrupted_line, sigterm_interrupts


def main() -> int:
    """Import :mod:`xlard.cli` and run it; returns the exit code."""
    try:
        with sigterm_interrupts():
            from xlard.cli import main as run
    except KeyboardInterrupt as exc:
        if os.environ.get("XLARD_TRACEBACK") == "1":
            raise
        line, code = interrupted_line("xlard", exc)
        print(line, file=sys.stderr)
        return code
    return run()
