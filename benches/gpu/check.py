"""Helpers of scripts/gpu_check.sh: environment facts, test-file import checks, build
facts and the final report ($OUT/gpu_report.json and $OUT/gpu_report.md).

    python -m benches.gpu.check env --out env.json [--allow-cpu]   # exit 3: no CUDA device
    python -m benches.gpu.check imports FILE...                     # exit 1: a module-level import is missing
    python -m benches.gpu.check build-info --out build.json         # exit 1: _C lacks CUDA kernels
    python -m benches.gpu.check report --out DIR                    # exit 0 ok, 1 a step failed, 2 a target missed

Standard library only, except ``env`` and ``build-info`` (torch, xlard).
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# ---------------------------------------------------------------- env

def _dist_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "versions": {
            "triton": _dist_version("triton"),
            "cupy": _dist_version("cupy", "cupy-cuda13x", "cupy-cuda12x"),
            "numpy": _dist_version("numpy"),
            "pytest": _dist_version("pytest"),
            "pytest-benchmark": _dist_version("pytest-benchmark"),
            "setuptools": _dist_version("setuptools"),
            "ninja": _dist_version("ninja"),
            "hypothesis": _dist_version("hypothesis"),
            "scipy": _dist_version("scipy"),
            "opencv": _dist_version("opencv-python-headless", "opencv-python"),
        },
        "ninja_on_path": shutil.which("ninja") is not None,
        "python_headers": os.path.exists(os.path.join(__import__("sysconfig").get_paths()["include"], "Python.h")),
    }
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "arch_list": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            "count": torch.cuda.device_count(),
        }
    return info


def cmd_env(args) -> int:
    try:
        info = collect_env()
    except Exception as exc:  # a broken torch install is a finding, reported as such
        info = {"error": f"{type(exc).__name__}: {exc}", "cuda_available": False}
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps(info, indent=2))
    if not info.get("cuda_available"):
        print("gpu_check: no CUDA device: torch.cuda.is_available() is False "
              f"(torch {info.get('torch')}, CUDA build {info.get('torch_cuda')}). "
              "This script needs a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 0 if args.allow_cpu else 3
    return 0


# ---------------------------------------------------------------- imports

def top_level_imports(path: str) -> set[str]:
    """Modules imported at module level (not inside functions), first component only."""
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def cmd_imports(args) -> int:
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    local |= {"xlard", "benches", "__future__"}
    missing_any = False
    for path in args.files:
        missing = sorted(m for m in top_level_imports(path) - local if importlib.util.find_spec(m) is None)
        if missing:
            missing_any = True
            print(f"{path}: missing module-level imports: {', '.join(missing)}")
        else:
            print(f"{path}: all module-level imports available")
    return 1 if missing_any else 0


# ---------------------------------------------------------------- build-info

def cmd_build_info(args) -> int:
    sys.path.insert(0, ROOT)
    from xlard import _extension

    info = _extension.build_info()
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps(info, indent=2))
    if not info.get("cuda_kernels"):
        print("gpu_check: xlard._C has no CUDA kernels (see the build log)", file=sys.stderr)
        return 1
    if info.get("cxx_runtime") == "static":
        # The first GPU run: a static libstdc++ in _C crashed every error message with a number.
        print("gpu_check: xlard._C holds a static C++ runtime (no libstdc++.so.6 among its "
              "NEEDED libraries): its error messages can crash; see setup.py's _loaded_cxx_runtime",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- report

def read_json(path: str, default=None):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


def read_steps(path: str) -> list[dict]:
    steps = []
    try:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    steps.append(json.loads(line))
    except OSError:
        pass
    return steps


def junit_counts(path: str) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            total[key] += int(suite.get(key, 0))
        total["time_s"] += float(suite.get("time", 0.0))
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    total["failed_tests"] = failed[:30]
    return total


def sanitizer_summary(path: str) -> dict | None:
    try:
        with open(path, errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    out = {}
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        out["errors"] = int(m[-1])
    m = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        out["hazards"], out["race_errors"], out["race_warnings"] = (int(x) for x in m[-1])
    m = re.findall(r"^sanitizer_driver: .*$", text, flags=re.M)
    if m:
        out["driver"] = m[-1]
    out["mismatches"] = len(re.findall(r"MISMATCH ", text))
    return out


def pytest_outcome_lines(path: str, limit: int = 15) -> list[str]:
    """The SKIPPED / FAILED / ERROR lines of pytest's short summary in a log (why a row is missing)."""
    try:
        with open(path, errors="replace") as fh:
            lines = [line.rstrip() for line in fh if re.match(r"(SKIPPED|FAILED|ERROR) ", line)]
    except OSError:
        return []
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def build_report(out_dir: str) -> dict:
    env = read_json(os.path.join(out_dir, "env.json"), {})
    steps = read_steps(os.path.join(out_dir, "steps.jsonl"))
    by_name = {s["name"]: s for s in steps}
    report = {
        "device": env.get("device", {}).get("name") or ("no CUDA device" if env else "unknown"),
        "env": env,
        "build": {"info": read_json(os.path.join(out_dir, "build.json")), "step": by_name.get("build")},
        "steps": steps,
        "tests": {},
        "sanitizer": {},
    }
    for path in sorted(glob.glob(os.path.join(out_dir, "junit-*.xml"))):
        suite = os.path.basename(path)[len("junit-"):-len(".xml")]
        counts = junit_counts(path)
        report["tests"][suite] = {"counts": counts, "step": by_name.get(f"tests-{suite}")}
    for step in steps:  # suites that never wrote a JUnit file (timeout, missing imports, no time left)
        if step["name"].startswith("tests-") and step["name"][6:] not in report["tests"]:
            report["tests"][step["name"][6:]] = {"counts": None, "step": step}
    for tool in ("memcheck", "racecheck"):
        step = by_name.get(f"sanitizer-{tool}")
        if step is not None:
            report["sanitizer"][tool] = {"step": step,
                                         "summary": sanitizer_summary(os.path.join(out_dir, "logs", f"sanitizer-{tool}.log"))}
    bench_files = sorted(glob.glob(os.path.join(out_dir, "bench", "*.json")))
    report["benchmarks"] = None
    if bench_files:
        from benches.gpu import report as bench_report

        summary = bench_report.summarise(bench_files)
        report["benchmarks"] = {k: v for k, v in summary.items() if k != "markdown"}
        report["benchmarks_markdown"] = summary["markdown"]
    report["bench_notes"] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "logs", "bench-*.log"))):
        notes = pytest_outcome_lines(path)
        if notes:
            report["bench_notes"][os.path.basename(path)[:-4]] = notes
    failed_steps = [s["name"] for s in steps if s.get("counts_as_failure")]
    failed_steps += [f"benchmark JSON left out ({u})" for u in (report["benchmarks"] or {}).get("unreadable", [])]
    for suite, t in report["tests"].items():  # a suite where nothing ran verified nothing
        if t["counts"] is not None and t["counts"]["passed"] == 0 and f"tests-{suite}" not in failed_steps:
            failed_steps.append(f"tests-{suite} (no test passed)")
    verdicts = (report["benchmarks"] or {}).get("verdicts", [])
    report["failed_steps"] = failed_steps
    report["targets_met"] = sum(v["status"] == "met" for v in verdicts)
    report["targets_not_met"] = [f"{v['group']} / {v['provider']}: {v['status']}" for v in verdicts
                                 if v["status"] != "met"]
    if failed_steps:
        report["exit_code"] = 1
    elif report["targets_not_met"] or not verdicts:
        report["exit_code"] = 2
    else:
        report["exit_code"] = 0
    return report


def to_markdown(r: dict) -> str:
    env = r["env"]
    dev = env.get("device", {})
    versions = env.get("versions", {})
    lines = [f"# xlard GPU check: {r['device']}", ""]
    if dev:
        lines.append(f"- Device: {dev.get('name')} (sm_{dev.get('capability', '').replace('.', '')}, "
                     f"{dev.get('memory_gib')} GiB, {dev.get('sm_count')} SMs, L2 {dev.get('l2_cache_mib')} MiB)"
                     + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else ""))
    lines.append(f"- Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    missing = [k for k, v in versions.items() if not v]
    if missing:
        lines.append(f"- Not installed: {', '.join(missing)}")
    b = r["build"]
    if b["step"]:
        info = b["info"] or {}
        lines.append(f"- Build: {b['step']['status']} in {b['step']['seconds']} s; CUDA kernels: "
                     f"{info.get('cuda_kernels')}; arch list {info.get('cuda_arch_list')}")
    verdict = {0: "all steps passed, all speed targets met", 1: "FAILED: " + ", ".join(r["failed_steps"]),
               2: "steps passed; speed targets not met: " + "; ".join(r["targets_not_met"] or ["no benchmark data"])}
    lines += [f"- Result: {verdict[r['exit_code']]}", "", "## Steps", "", "| step | status | seconds | note |",
              "|---|---|---:|---|"]
    for s in r["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('note', '')} |")
    lines += ["", "## Tests", "", "| suite | passed | failed | errors | skipped | seconds | step |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for suite, t in r["tests"].items():
        c = t["counts"]
        step = t["step"]["status"] if t["step"] else ""
        if c:
            lines.append(f"| {suite} | {c['passed']} | {c['failures']} | {c['errors']} | {c['skipped']} | "
                         f"{c['time_s']:.0f} | {step} |")
        else:
            lines.append(f"| {suite} | | | | | | {step}: {t['step'].get('note', '') if t['step'] else ''} |")
        for name in (c or {}).get("failed_tests", []):
            lines.append(f"|  | FAILED {name} | | | | | |")
    lines += ["", "## compute-sanitizer (connected-components kernels)", ""]
    if not r["sanitizer"]:
        lines.append("- not run")
    for tool, s in r["sanitizer"].items():
        summ = s["summary"] or {}
        parts = [f"status {s['step']['status']}"]
        if "errors" in summ:
            parts.append(f"{summ['errors']} errors")
        if "hazards" in summ:
            parts.append(f"{summ['hazards']} hazards ({summ['race_errors']} errors, {summ['race_warnings']} warnings)")
        if summ.get("driver"):
            parts.append(summ["driver"].replace("sanitizer_driver: ", ""))
        if s["step"].get("note"):
            parts.append(s["step"]["note"])
        lines.append(f"- {tool}: " + "; ".join(parts))
    lines += ["", "## Benchmarks", ""]
    lines.append(r.get("benchmarks_markdown") or "- no benchmark data")
    if r["bench_notes"]:
        lines += ["", "Benchmarks skipped or failed (from the pytest logs):", ""]
        for step, notes in r["bench_notes"].items():
            lines += [f"- {step}: `{note}`" for note in notes]
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    sys.path.insert(0, ROOT)
    report = build_report(args.out)
    with open(os.path.join(args.out, "gpu_report.json"), "w") as fh:
        json.dump({k: v for k, v in report.items() if k != "benchmarks_markdown"}, fh, indent=2)
    md = to_markdown(report)
    with open(os.path.join(args.out, "gpu_report.md"), "w") as fh:
        fh.write(md)
    print(md)
    return report["exit_code"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--allow-cpu", action="store_true")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("imports", allow_abbrev=False)
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=cmd_imports)
    p = sub.add_parser("build-info", allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_build_info)
    p = sub.add_parser("report", allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
