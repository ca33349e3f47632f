"""benches/report.py (the README's ops throughput report) summarises every kind of benchmark row, and checks
its files first."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benches.report import summarise, to_markdown  # noqa: E402


def _bench(group, median, **info):
    return {"group": group, "name": f"test_{group}", "stats": {"median": median}, "extra_info": info}


def test_summarise_reads_every_row_kind():
    data = {"benchmarks": [
        _bench("count_components float32 8x77x64x64", 0.001, provider="xlard", pixels=2_523_136),
        _bench("count_components float32 8x77x64x64", 0.020, provider="opencv_loop"),
        _bench("shapes rewards vs generation, batch 64", 4.0, provider="generate"),
        _bench("shapes rewards vs generation, batch 64", 0.1, provider="rewards", ratio_to_generate=0.025,
               target=0.2),
        _bench(None, 6.7, overhead_fraction=0.31, target=0.25),  # no provider, no group
    ]}
    rows, verdicts = summarise(data)
    groups = {(r["group"], r["provider"]) for r in rows}
    assert ("count_components float32 8x77x64x64", "opencv_loop") in groups
    speedup = [r for r in rows if r["provider"] == "opencv_loop"][0]["speedup_of_xlard"]
    assert abs(speedup - 20.0) < 1e-9
    assert any(v.startswith("met ") and "rewards take 0.025 of generation" in v for v in verdicts)
    assert any(v.startswith("MISS  test_None: trainer overhead 31.0%") for v in verdicts)
    assert any("2.52 G pixels/s" in v and v.startswith("met ") for v in verdicts)
    text = to_markdown(rows, verdicts, {"processor": "x", "cpu_count": 2})
    assert "| count_components float32 8x77x64x64 | opencv_loop |" in text


def test_report_checks_its_files_before_running_benchmarks(tmp_path, capsys, monkeypatch):
    """--json/--markdown that cannot be written failed only after the benchmarks had run (minutes), and a missing
    or foreign --from-json gave a traceback."""
    import json
    import re

    import pytest

    from benches import report

    monkeypatch.setattr(report, "run_benchmarks", lambda *a: pytest.fail("benchmarks ran before the checks"))
    (tmp_path / "records.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "empty_entry.json").write_text('{"benchmarks": [{}]}')
    zero = [_bench("g", 0.0, provider="xlard", pixels=10), _bench("g", 0.001, provider="torch", pixels=10)]
    (tmp_path / "zero.json").write_text(json.dumps({"benchmarks": zero}))
    (tmp_path / "machine.json").write_text(json.dumps({"benchmarks": [_bench("g", 0.001, provider="xlard",
                                                                             pixels=10)], "machine_info": "x"}))
    for argv, text in ((["--json", str(tmp_path / "no" / "r.json")], "--json: cannot write"),
                       (["--markdown", str(tmp_path)], "--markdown: .* is a folder"),
                       (["--from-json", str(tmp_path / "missing.json")], "--from-json: cannot read .*No such file"),
                       (["--from-json", str(tmp_path / "records.jsonl")], "--from-json: cannot read .*Extra data"),
                       (["--from-json", str(tmp_path / "other.json")], "is not a pytest-benchmark JSON"),
                       # "--from-json ''" ran the whole benchmark suite; malformed entries were tracebacks
                       (["--from-json", ""], "--from-json: the path is empty"),
                       (["--json", " "], "--json: the path is empty"),
                       (["--from-json", str(tmp_path / "empty_entry.json")], "not a complete pytest-benchmark "
                                                                             "JSON .KeyError"),
                       (["--from-json", str(tmp_path / "zero.json")], "ZeroDivisionError")):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and re.search(text, err), (argv, err)
    # a machine_info that is not an object: the rows are reported, the machine unknown
    assert report.main(["--from-json", str(tmp_path / "machine.json")]) == 0
    assert "Machine: unknown (unknown)" in capsys.readouterr().out
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [_bench("g", 0.001, provider="xlard", pixels=10)]}))
    assert report.main(["--from-json", str(bench), "--json", str(tmp_path / "s.json"),
                        "--markdown", str(tmp_path / "s.md")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["rows"] and "| g | xlard |" in (tmp_path / "s.md").read_text()
    # an output that is the input replaced the benchmark data with the summary (exit 0); or the other output
    kept = bench.read_text()
    for argv, text in ((["--from-json", str(bench), "--json", str(bench)], "--json: .*bench.json is the same file "
                                                                             "as --from-json"),
                       (["--from-json", str(bench), "--markdown", str(tmp_path / "." / "bench.json")],
                        "--markdown: .* is the same file as --from-json"),
                       (["--from-json", str(bench), "--json", str(tmp_path / "o"), "--markdown", str(tmp_path / "o")],
                        "--markdown: .* is the same file as --json")):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(text, err), (argv, err)
    assert bench.read_text() == kept and not (tmp_path / "o").exists()


def test_targets_whose_bench_did_not_run_are_named_and_a_rounded_miss_shows_its_digits():
    """The G pixels/s, capture, corrector, rewards and trainer targets vanished from the list when their bench did
    not run; a miss read "1.00x (target >= 1.0x)"."""
    data = {"benchmarks": [
        _bench("color_scores float32 8x1024x768 x 10x768", 0.010, provider="reference"),
        _bench("color_scores float32 8x1024x768 x 10x768", 0.01001, provider="xlard"),
    ]}
    _, verdicts = summarise(data)
    assert any(v.startswith("MISS") and "0.9990x vs reference" in v for v in verdicts)
    for what in ("no xlard run (target >= 1.0 G pixels/s)", "shipped corrector overhead", "attention capture overhead",
                 "rewards vs generation", "trainer overhead"):
        assert any(v.startswith("n/a") and what in v for v in verdicts), what


def test_a_failed_benchmark_still_gives_the_report(tmp_path, monkeypatch, capsys):
    """A missed trainer target failed pytest, and the report raised CalledProcessError before printing any row."""
    import json
    import subprocess

    from benches import report

    def fake_run(cmd, cwd, check):
        out = [c.split("=", 1)[1] for c in cmd if c.startswith("--benchmark-json=")][0]
        Path(out).write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(report.subprocess, "run", fake_run)
    report.run_benchmarks(str(tmp_path / "b.json"), quick=True)
    assert "pytest exited 1; the rows below are the benchmarks that ran" in capsys.readouterr().err


def test_a_failed_benchmark_fails_the_report_and_missing_rows_are_named_on_the_right_side(tmp_path, monkeypatch,
                                                                                           capsys):
    """The report exited 0 after "27 failed" (a CI job read it as passing), and with only the peers' rows in the JSON
    it said "no reference run" where xlard's run was missing."""
    import json
    import subprocess

    from benches import report

    group = "color_scores float32 8x1024x768 x 10x768"
    bench = dict(_bench(group, 0.01, provider="reference"), options={"min_rounds": 3, "max_time": 0.2})

    def fake_run(cmd, cwd, check):
        out = [c.split("=", 1)[1] for c in cmd if c.startswith("--benchmark-json=")][0]
        Path(out).write_text(json.dumps({"benchmarks": [bench], "machine_info": {}}))
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(report.subprocess, "run", fake_run)
    assert report.main(["--quick", "--json", str(tmp_path / "r.json")]) == 1
    out, err = capsys.readouterr()
    assert "pytest exited 1: some benchmarks failed" in err
    assert f"n/a   {group}: no xlard run" in out and "no reference run" not in out
    assert "Quick run (at least 3 rounds per benchmark, not 10)" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["pytest_exit"] == 1 and saved["quick"] is True
    _, verdicts = summarise({"benchmarks": [_bench(group, 0.01, provider="xlard")]})
    assert any(v == f"n/a   {group}: no reference run" for v in verdicts)


def test_the_machine_line_names_the_cpu_and_its_kernel_level():
    """It printed "x86_64 x2 cores" with the CPU's name and xlard's vector level in the same JSON, and
    "None xNone cores" for a JSON without machine_info."""
    from benches.report import machine_line

    line = machine_line({"processor": "x86_64", "machine": "x86_64", "cpu": {"brand_raw": "Intel(R) Xeon(R)"},
                         "cpu_count": 2, "xlard_build": {"cpu_isa": "avx512"}, "torch": "2.13.0+cpu",
                         "torch_threads": 1, "python_version": "3.11.7"})
    assert line == ("Machine: Intel(R) Xeon(R) (x86_64), 2 cores, CPU kernels at avx512, torch 2.13.0+cpu (1 threads), "
                    "python 3.11.7")
    assert machine_line({}) == ("Machine: unknown (unknown), unknown cores, CPU kernels at unknown, torch unknown "
                                "(unknown threads), python unknown")
    assert "None" not in to_markdown([], [], {})


# --------------------------------------------------------------------------- the GPU report (benches/gpu/report.py)

def _gpu_bench(group, provider, median, **info):
    return {"group": group, "name": f"test_{provider}", "stats": {"median": median, "rounds": 5},
            "extra_info": {"provider": provider, "calls_per_round": 1, **info}}


def test_gpu_report_gives_no_ratio_across_runs_and_survives_a_broken_file(tmp_path, capsys, monkeypatch):
    """A compiled_reference row timed in another pytest process than its group's cuda row got a speed-up (a ratio
    across runs); one unreadable JSON raised and lost the whole report (tests and sanitizer results too)."""
    import json

    import pytest

    from benches.gpu import report

    group = "residual_correction float32 16x16x128x128"
    (tmp_path / "main.json").write_text(json.dumps({"benchmarks": [
        _gpu_bench(group, "cuda", 1e-4, bytes=10**8, device_ms=0.09), _gpu_bench(group, "reference", 4e-4)],
        "machine_info": {"gpu": {"name": "X"}}}))
    (tmp_path / "compiled.json").write_text(json.dumps({"benchmarks": [_gpu_bench(group, "compiled_reference",
                                                                                  2e-4)]}))
    (tmp_path / "cut.json").write_text('{"benchmarks": [')
    summary = report.summarise([str(tmp_path / n) for n in ("main.json", "compiled.json", "cut.json")])
    rows = {r["provider"]: r for r in summary["rows"]}
    assert rows["reference"]["speedup_of_base"] == pytest.approx(4.0)  # same run: a ratio
    assert rows["compiled_reference"]["speedup_of_base"] is None      # another run: none
    assert summary["sources"] == ["main.json", "compiled.json"]
    assert len(summary["unreadable"]) == 1 and summary["unreadable"][0].startswith("cut.json: JSONDecodeError")
    assert "Left out, unreadable: cut.json" in summary["markdown"]
    assert "| compiled_reference | 200.00 |" in summary["markdown"]
    # a named input that does not exist is a usage error (it was dropped without a word)
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "main.json"), str(tmp_path / "typo.json")])
    assert exc.value.code == 2 and "no such benchmark JSON file" in capsys.readouterr().err
    # an unreadable input is a failure (1), not a missed target (2); the readable rows are still printed
    assert report.main([str(tmp_path / "main.json")]) == 2  # targets without rows: not measured
    capsys.readouterr()
    assert report.main([str(tmp_path / "main.json"), str(tmp_path / "cut.json")]) == 1
    assert "| reference |" in capsys.readouterr().out
    # a failed benchmark of --run is a failure too, whatever the targets say
    monkeypatch.setattr(report, "run_benchmarks", lambda path: (Path(path).write_text(
        (tmp_path / "main.json").read_text()), 1)[1])
    assert report.main(["--run"]) == 1


def test_gpu_check_report_names_an_unreadable_bench_json_as_a_failure(tmp_path):
    import json

    from benches.gpu import check

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "main.json").write_text('{"benchmarks": [')
    (tmp_path / "steps.jsonl").write_text("")
    r = check.build_report(str(tmp_path))
    assert any("benchmark JSON left out (main.json" in s for s in r["failed_steps"]) and r["exit_code"] == 1
    json.dumps(r)


def test_gpu_device_time_is_none_for_a_call_that_waits_on_the_gpu(monkeypatch):
    """CUDA-event time of a call that reads a value back includes its host overhead (device > wall in the GPU
    table for position_scores, CuPy): such calls are detected behind a device sleep and get no device time."""
    import time

    import torch

    bench = _gpu_bench_module(monkeypatch)
    busy_until = [0.0]

    def fake_sleep(cycles):  # the "GPU" is busy for the asked time
        busy_until[0] = time.perf_counter() + cycles / bench.SLEEP_CYCLES_PER_S

    def wait():
        time.sleep(max(0.0, busy_until[0] - time.perf_counter()))

    monkeypatch.setattr(torch.cuda, "_sleep", fake_sleep, raising=False)
    monkeypatch.setattr(bench, "_sync", wait)
    assert bench._waits_on_device(wait, 1e-4)                # reads back: waits for the sleep
    assert not bench._waits_on_device(lambda: None, 1e-4)    # only enqueues work


def _gpu_bench_module(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # bench_gpu_ops imports tests/helpers.py
    return importlib.import_module("benches.gpu.bench_gpu_ops")
