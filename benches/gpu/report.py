"""The GPU ops report: pytest-benchmark JSON of benches/gpu -> a table with ratios and
the speed targets of issue 3 marked met or MISS.

    python -m benches.gpu.report BENCH.json [MORE.json ...] [--json OUT.json] [--markdown OUT.md]
    python -m benches.gpu.report --run [--json ...] [--markdown ...]   # run benches/gpu first

Exit status: 0 every speed target met, 2 a target missed or not measured (or a usage mistake), 1 a benchmark
failed (--run) or a JSON file could not be read (its rows are left out, the rest is reported).

Times per call: ``wall`` = the median timed round / ``calls_per_round`` (public API,
host overhead included, device synchronized); ``device`` = CUDA-event time of the same
burst with host overhead hidden (see benches/gpu/bench_gpu_ops.py). GB/s = ``bytes``
(read + written) / time. Bandwidth targets compare device GB/s with the copy of the
same group (a copy reading as many bytes as the op); speed-up and latency targets use
wall time. The base of each group (the "cuda" row, "cuda_graph" for graph groups) is
what "speed-up" compares every row with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CC = "count_components float16 16x77x128x128"
CC_GRAPH = "count_components float16 2x77x32x32 CUDA graph"
RESIDUAL = "residual_correction float32 16x16x128x128"
SAMPLE = "sample_correction float32 16x16x128x128"
CENTROIDS = "attention_centroids float16 16x77x128x128"

# (kind, group, provider, argument): the speed targets of issue 3.
#   bandwidth: provider's device GB/s >= argument x the copy's device GB/s in the group
#   speedup:   wall time of the best of the peers (a tuple) / provider's wall time >= argument
#   latency:   provider's wall time per call <= argument microseconds
#   within:    provider's wall time <= argument[1] x wall time of provider argument[0]
TARGETS = [
    ("bandwidth", CC, "cuda", 0.60),
    ("speedup", CC, "cuda", (("cupy_loop", "cupy_volume"), 20.0)),
    ("latency", CC_GRAPH, "cuda_graph", 10.0),
    ("bandwidth", RESIDUAL, "cuda", 0.80),
    ("speedup", RESIDUAL, "cuda", (("reference",), 2.5)),
    ("bandwidth", SAMPLE, "cuda", 0.80),
    ("speedup", SAMPLE, "cuda", (("reference",), 2.5)),
    ("bandwidth", CENTROIDS, "cuda", 0.70),
    ("within", CC, "triton", ("cuda", 2.0)),
    ("within", CC_GRAPH, "triton_graph", ("cuda_graph", 2.0)),
    ("within", RESIDUAL, "triton", ("cuda", 2.0)),
    ("within", SAMPLE, "triton", ("cuda", 2.0)),
    ("within", CENTROIDS, "triton", ("cuda", 2.0)),
]


def load(paths: list[str]) -> dict:
    """Merges pytest-benchmark JSON files: all benchmarks (each tagged with its file: one pytest process), the first
    readable file's machine_info. A file that cannot be read or parsed is left out and named in ``unreadable``, so
    one broken run does not lose the others' rows."""
    merged: dict = {"benchmarks": [], "machine_info": {}, "sources": [], "unreadable": []}
    for path in paths:
        name = os.path.basename(path)
        try:
            with open(path) as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
                raise ValueError("not a pytest-benchmark JSON object")
        except (OSError, ValueError) as exc:
            merged["unreadable"].append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        for bench in data.get("benchmarks", []):
            merged["benchmarks"].append({**bench, "source": name})
        merged["machine_info"] = merged["machine_info"] or data.get("machine_info", {})
        merged["sources"].append(name)
    return merged


def rows_of(data: dict) -> list[dict]:
    """One row per (group, provider) with per-call times, GB/s and the base's speed-up over it."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" in info:
            groups[bench["group"]][info["provider"]] = bench
    rows = []
    for group in sorted(groups):
        runs = groups[group]
        group_rows = []
        for provider, bench in runs.items():
            info = bench["extra_info"]
            calls = info.get("calls_per_round", 1) or 1
            wall = bench["stats"]["median"] / calls
            device = info["device_ms"] / 1e3 if info.get("device_ms") is not None else None
            row = {"group": group, "provider": provider, "wall_us": wall * 1e6,
                   "device_us": None if device is None else device * 1e6, "bytes": info.get("bytes"),
                   "calls_per_round": calls, "rounds": bench["stats"].get("rounds"), "source": bench.get("source")}
            if info.get("bytes"):
                row["wall_gbps"] = info["bytes"] / wall / 1e9
                row["device_gbps"] = None if not device else info["bytes"] / device / 1e9
            if info.get("pixels"):
                row["wall_gpixels_per_s"] = info["pixels"] / wall / 1e9
            group_rows.append(row)
        base = next((r for name in ("cuda_graph", "cuda", "triton_graph", "triton")
                     for r in group_rows if r["provider"] == name), None)
        for row in group_rows:
            row["base"] = base["provider"] if base else None
            # a ratio only within one run: a row timed in another pytest process than its base gets none
            same_run = base is not None and row["source"] == base["source"]
            row["speedup_of_base"] = row["wall_us"] / base["wall_us"] if same_run else None
        order = ("cuda", "cuda_graph", "triton", "triton_graph", "copy")
        group_rows.sort(key=lambda r: (order.index(r["provider"]) if r["provider"] in order else len(order),
                                       r["provider"]))
        rows += group_rows
    return rows


def verdicts_of(rows: list[dict]) -> list[dict]:
    by_key = {(r["group"], r["provider"]): r for r in rows}
    out = []
    for kind, group, provider, arg in TARGETS:
        row = by_key.get((group, provider))
        verdict = {"kind": kind, "group": group, "provider": provider, "status": "n/a"}
        if kind == "bandwidth":
            copy = by_key.get((group, "copy"))
            verdict["target"] = f">= {arg:.0%} of the copy's device GB/s"
            if row and copy and row.get("device_gbps") and copy.get("device_gbps"):
                frac = row["device_gbps"] / copy["device_gbps"]
                verdict.update(value=frac, status="met" if frac >= arg else "MISS",
                               detail=f"{row['device_gbps']:.0f} GB/s vs copy {copy['device_gbps']:.0f} GB/s "
                                      f"= {frac:.0%} (wall: {row['wall_gbps']:.0f} vs {copy['wall_gbps']:.0f} GB/s)")
            else:
                verdict["detail"] = f"missing {provider if not row else 'copy'} (or its device time) in {group}"
        elif kind == "speedup":
            peers, need = arg
            verdict["target"] = f">= {need}x faster than the best of {', '.join(peers)} (wall)"
            found = [by_key[(group, p)] for p in peers if (group, p) in by_key]
            if row and found:
                best = min(found, key=lambda r: r["wall_us"])
                ratio = best["wall_us"] / row["wall_us"]
                verdict.update(value=ratio, status="met" if ratio >= need else "MISS",
                               detail=f"{ratio:.1f}x vs {best['provider']} "
                                      f"({row['wall_us']:.1f} us vs {best['wall_us']:.1f} us)")
            else:
                verdict["detail"] = f"missing {provider if not row else ' / '.join(peers)} in {group}"
        elif kind == "latency":
            verdict["target"] = f"<= {arg} us per call (wall)"
            if row:
                verdict.update(value=row["wall_us"], status="met" if row["wall_us"] <= arg else "MISS",
                               detail=f"{row['wall_us']:.2f} us per call (device {fmt(row['device_us'], 2)} us)")
            else:
                verdict["detail"] = f"missing {provider} in {group}"
        elif kind == "within":
            other, factor = arg
            verdict["target"] = f"<= {factor}x the wall time of {other}"
            ref_row = by_key.get((group, other))
            if row and ref_row:
                ratio = row["wall_us"] / ref_row["wall_us"]
                verdict.update(value=ratio, status="met" if ratio <= factor else "MISS",
                               detail=f"{ratio:.2f}x ({row['wall_us']:.1f} us vs {ref_row['wall_us']:.1f} us; "
                                      f"device {fmt(row['device_us'])} vs {fmt(ref_row['device_us'])} us)")
            else:
                verdict["detail"] = f"missing {provider if not row else other} in {group}"
        out.append(verdict)
    return out


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def machine_line(machine: dict) -> str:
    gpu = machine.get("gpu") or {}
    return (f"GPU: {gpu.get('name', 'unknown')} (sm_{gpu.get('capability', '?').replace('.', '')}, "
            f"{gpu.get('memory_gib', '?')} GiB, L2 {gpu.get('l2_cache_mib', '?')} MiB); torch {machine.get('torch')} "
            f"(CUDA {machine.get('torch_cuda')}), triton {machine.get('triton')}, cupy {machine.get('cupy')}, "
            f"python {machine.get('python_version')}")


def to_markdown(rows: list[dict], verdicts: list[dict], machine: dict, unreadable: list[str] = ()) -> str:
    out = [machine_line(machine), ""]
    out += [f"Left out, unreadable: {u}" for u in unreadable] + ([""] if unreadable else [])
    out += ["Speed-up: the group's base row (cuda, or cuda_graph) over each row, by wall time, only where both were "
            "timed in one pytest process (blank for a row of another run).", "",
           "| benchmark | provider | wall us/call | device us/call | wall GB/s | device GB/s | speed-up |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['speedup_of_base']:.2f}x" if r.get("speedup_of_base") is not None else ""
        out.append(f"| {r['group']} | {r['provider']} | {r['wall_us']:.2f} | {fmt(r['device_us'], 2)} | "
                   f"{fmt(r.get('wall_gbps'))} | {fmt(r.get('device_gbps'))} | {speed} |")
    out += ["", "Speed targets (issue 3):", "", "| status | benchmark | provider | target | measured |",
            "|---|---|---|---|---|"]
    for v in verdicts:
        out.append(f"| {v['status']} | {v['group']} | {v['provider']} | {v['target']} | {v.get('detail', '')} |")
    return "\n".join(out)


def summarise(paths: list[str]) -> dict:
    data = load(paths)
    rows = rows_of(data)
    verdicts = verdicts_of(rows)
    return {"rows": rows, "verdicts": verdicts, "machine": data["machine_info"], "sources": data["sources"],
            "unreadable": data["unreadable"],
            "markdown": to_markdown(rows, verdicts, data["machine_info"], data["unreadable"])}


def run_benchmarks(json_path: str) -> int:
    """Runs benches/gpu in one pytest process; its exit code (a failed bench's row is missing from the JSON)."""
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
           "--benchmark-columns=median,rounds", "--benchmark-sort=name"]
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if code not in (0, 5):
        print(f"warning: pytest exited with {code}: failed benchmarks are missing from the report (n/a rows)",
              file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="pytest-benchmark JSON files of benches/gpu")
    parser.add_argument("--run", action="store_true", help="run benches/gpu first (in one pytest process)")
    parser.add_argument("--json", help="write rows and verdicts as JSON here")
    parser.add_argument("--markdown", help="write the markdown table here")
    args = parser.parse_args(argv)
    missing = [p for p in args.inputs if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such benchmark JSON file: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = list(args.inputs)
        code = 0
        if args.run:
            paths.append(os.path.join(tmp, "gpu-bench.json"))
            code = run_benchmarks(paths[-1])
            if not os.path.isfile(paths[-1]):
                print(f"error: the benchmark run (pytest exit code {code}) wrote no JSON", file=sys.stderr)
                return 1
        if not paths:
            parser.error("no benchmark JSON to summarise (give files or --run)")
        summary = summarise(paths)
    print(summary["markdown"])
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(summary["markdown"] + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: v for k, v in summary.items() if k != "markdown"}, fh, indent=2)
    if summary["unreadable"] or code not in (0, 5):  # a failed benchmark or a lost file: 1, as benches/report.py
        return 1
    return 0 if all(v["status"] == "met" for v in summary["verdicts"]) else 2


if __name__ == "__main__":
    raise SystemExit(main())
