"""xlard._signals: Ctrl-C and SIGTERM end the command line and the scripts in one line (exit 130 / 143)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xlard._signals import Terminated, run_script, sigterm_interrupts

ROOT = Path(__file__).resolve().parents[1]


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


def test_run_script_reports_a_users_mistake_in_one_line(capsys, monkeypatch):
    """xlard's own refusals (a folder another run holds, a config that differs on --resume, a bad value found
    after parsing) were tracebacks with exit 1 in the scripts."""
    from xlard import _io

    def raises(exc):
        return lambda: (_ for _ in ()).throw(exc)

    assert run_script("s.py", raises(ValueError("--resume: the config differs\nin ['seed']"))) == 2
    assert capsys.readouterr().err == "s.py: error: --resume: the config differs in ['seed']\n"
    assert run_script("s.py", raises(_io.FolderInUseError("--out: x is in use by another running xlard process"))) == 2
    assert run_script("s.py", raises(FileNotFoundError("no folder at /x"))) == 2
    assert run_script("s.py", raises(OSError(28, "No space left on device"))) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "s.py: error: [Errno 28] No space left on device"
    with pytest.raises(_io.FolderInUseError):  # the escape hatch for debugging
        monkeypatch.setenv("XLARD_TRACEBACK", "1")
        run_script("s.py", raises(_io.FolderInUseError("x")))
    with pytest.raises(TypeError):  # a programming error stays a traceback
        monkeypatch.delenv("XLARD_TRACEBACK")
        run_script("s.py", raises(TypeError("bug")))


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


def test_an_interrupt_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first tenth of a second (Python still importing xlard.cli) printed a traceback from the
    console script's import; the entry point imports it inside the handling."""
    import builtins
    import sys

    from xlard import _entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "xlard.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "xlard.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert _entry.main() == 130
    assert capsys.readouterr().err == "xlard: interrupted; every file written is complete\n"


def test_the_console_script_and_python_m_use_the_entry_point():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (scripts,) = re.findall(r"\[project\.scripts\]\n(.*?)\n\n", (root / "pyproject.toml").read_text(), re.S)
    assert scripts.strip() == 'xlard = "xlard._entry:main"'  # (tomllib is 3.11+; the floor is 3.10)
    assert "from xlard._entry import main" in (root / "xlard" / "__main__.py").read_text()


def test_a_signal_during_an_extension_import_waits_until_it_is_in(tmp_path):
    """Ctrl-C inside torch's import aborted the process (std::terminate, exit -6); inside numpy's it became an
    ImportError. import_held imports with SIGINT/SIGTERM held back and delivers them after."""
    (tmp_path / "slow_extension.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.2)\nDONE = True\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from xlard._signals import import_held\n"
            "try:\n"
            "    import_held(['slow_extension'])\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted after the import:', sys.modules['slow_extension'].DONE)\n")
    # Ctrl-C at its default in the children, whatever the test runner's (a background job ignores it)
    default_sigint = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, **default_sigint)
    assert out.stdout.strip() == "interrupted after the import: True", (out.stdout, out.stderr)
    # Without holding, the interrupt lands inside the import, which never completes.
    plain = code.replace("from xlard._signals import import_held\n", "import importlib\n").replace(
        "import_held(['slow_extension'])", "importlib.import_module('slow_extension')").replace(
        "sys.modules['slow_extension'].DONE", "'slow_extension' in sys.modules")
    out = subprocess.run([sys.executable, "-c", plain, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         **default_sigint)
    assert out.stdout.strip() == "interrupted after the import: False", (out.stdout, out.stderr)


def test_the_command_line_imports_numpy_and_torch_held(monkeypatch, capsys, tmp_path):
    from xlard import cli

    seen = []
    monkeypatch.setattr(cli, "import_held", lambda names: seen.append(tuple(names)))
    assert cli.main(["prompts", str(tmp_path / "p.jsonl"), "-n", "2"]) == 0
    assert cli.main(["info"]) == 0
    assert seen == [("numpy",), ("numpy", "torch")]


def test_every_script_says_how_to_continue_when_interrupted():
    """docs/cli.md: the scripts end on Ctrl-C with one line saying how to continue; four said only that every
    file written is complete."""
    import ast
    from pathlib import Path

    calls = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_script":
                calls[path.name] = len(node.args) + len(node.keywords)
    assert len(calls) >= 8, calls
    assert [name for name, n in calls.items() if n < 3] == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_ends_a_process_blocked_waiting_for_its_distributed_peers(signum, code):
    """A process of a distributed run whose peers never come waits in torch's rendezvous, a C loop that retries on
    EINTR for 30 minutes: the Python handler never ran, so Ctrl-C, kill and timeout did nothing. The watchdog ends
    it one grace period after the signal, in one line, with the exit code of the signal."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               XLARD_INTERRUPT_GRACE_S="1")
    code_text = ("import sys, torch.distributed as dist\n"
                 "from xlard._signals import run_script\n"
                 "def main():\n"
                 "    print('waiting', flush=True)\n"
                 "    dist.init_process_group('gloo')\n"
                 "sys.exit(run_script('rank1', main))\n")
    # Ctrl-C at its default in the child, whatever the test runner's (a background job ignores it)
    proc = subprocess.Popen([sys.executable, "-c", code_text], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "waiting\n"
        time.sleep(1.5)  # inside the rendezvous's C loop
        start = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == code, err[-2000:]
    assert "was not taken within 1 s: the process is blocked" in err
    assert took < 15


def test_the_watchdog_stands_down_when_the_main_thread_takes_the_signal_and_after_the_block(monkeypatch):
    """A signal the main thread takes is not followed by the watchdog's exit, and a Ctrl-C right after the block
    (Python's own handler back) is left to Python; the wakeup fd and the handlers are restored."""
    monkeypatch.setenv("XLARD_INTERRUPT_GRACE_S", "0.5")
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (not ignored)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        time.sleep(1.0)  # the process is still alive past the grace period
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, runner)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.set_wakeup_fd(-1) == -1  # none left behind
    monkeypatch.setenv("XLARD_INTERRUPT_GRACE_S", "nan")  # refused with a line, the default used
    with sigterm_interrupts():
        pass
