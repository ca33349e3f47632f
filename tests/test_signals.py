"""xlard._signals: Ctrl-C and SIGTERM end the command line and the scripts in one line (exit 130 / 143)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from xlard._signals import Terminated, run_script, sigterm_interrupts


def test_run_script_turns_ctrl_c_and_sigterm_into_one_line(capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
        pytest.fail("SIGTERM did not interrupt")

    assert run_script("s.py", ctrl_c, " (rerun)") == 130
    assert capsys.readouterr().err == "s.py: interrupted; every file written is complete (rerun)\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert run_script("s.py", sigterm) == 143
    assert capsys.readouterr().err == "s.py: terminated (SIGTERM); every file written is complete\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert run_script("s.py", lambda: None) == 0 and run_script("s.py", lambda: 3) == 3


def test_usage_errors_and_debugging_pass_through(monkeypatch):
    def usage():
        raise SystemExit(2)

    with pytest.raises(SystemExit) as e:
        run_script("s.py", usage)
    assert e.value.code == 2
    monkeypatch.setenv("XLARD_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        run_script("s.py", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_a_callers_sigterm_handler_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert issubclass(Terminated, KeyboardInterrupt)
