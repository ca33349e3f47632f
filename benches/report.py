"""The ops throughput report: runs the CPU benchmarks with pytest-benchmark and prints
xlard vs each peer, with ratios measured in the same run and the speed targets of
the foundation issue marked met or missed.

    python -m benches.report [--quick] [--json OUT.json] [--markdown OUT.md]
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
ROOT = os.path.dirname(HERE)

# (group, peer, minimum speed-up of xlard over the peer[, xlard's provider row]). The
# "within 2x of one torch.add pass" targets are judged on the paired tests of
# bench_correction.py (median per-round ratio with caches flushed before each call;
# extra_info "paired"; the warm-loop ratios are printed beside them), not on separately
# timed rows, which cache state and drifting memory bandwidth skew by 2-3x.
TARGETS = [
    ("count_components float32 8x77x64x64", "opencv_loop", 10.0),
    ("count_components float32 8x77x64x64", "scipy_loop", 10.0),
    ("count_components float32 2x77x16x16", "opencv_loop", 10.0),
    ("count_components float32 8x77x32x32", "opencv_loop", 10.0),
    ("residual_correction float32 16x16x128x128", "reference", 1.5),
    ("sample_correction float32 16x16x128x128", "reference", 1.5),
    ("attention_centroids float32 8x77x64x64", "reference", 2.0),
    ("color_scores float32 8x1024x768 x 10x768", "reference", 1.0),
]
GPIXELS_TARGET = ("count_components float32 8x77x64x64", 1.0)
CAPTURE_OVERHEAD_MAX = 1.15  # attention capture on the tiny SD pipeline


def run_benchmarks(json_path: str, quick: bool) -> int:
    """Run the CPU benchmarks into ``json_path``; returns pytest's exit code (the report still follows a failure,
    and :func:`main` then exits 1)."""
    # The CPU report; the GPU suites in benches/gpu have their own (benches/gpu/report.py).
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), f"--ignore={os.path.join(HERE, 'gpu')}",
           "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", "--benchmark-columns=min,median,rounds",
           "--benchmark-sort=name", "--benchmark-warmup=on"]
    cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2"] if quick else ["--benchmark-min-rounds=10"]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    if proc.returncode != 0 and not os.path.isfile(json_path):
        raise SystemExit(f"benches.report: the benchmarks failed (pytest exit {proc.returncode}) and wrote no "
                         f"results to {json_path}")
    if proc.returncode != 0:  # some bench failed: the rows that ran are still reported, the failure named
        print(f"benches.report: pytest exited {proc.returncode}; the rows below are the benchmarks that ran",
              file=sys.stderr)
    return proc.returncode


def summarise(data: dict) -> tuple[list[dict], list[str]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["extra_info"].get("provider")
        if provider is not None:  # benches judged by a ratio of their own (below) may name no provider
            groups[bench["group"]][provider] = bench
    rows = []
    for group in sorted(groups):
        runs = groups[group]
        mine = runs.get("xlard")
        if mine is None:
            continue
        t_x = mine["stats"]["median"]
        for provider, bench in sorted(runs.items()):
            t = bench["stats"]["median"]
            row = {"group": group, "provider": provider, "median_ms": t * 1e3, "speedup_of_xlard": t / t_x}
            info = bench["extra_info"]
            if "pixels" in info:
                row["gpixels_per_s"] = info["pixels"] / t / 1e9
            if "bytes" in info:
                row["gb_per_s"] = info["bytes"] / t / 1e9
            rows.append(row)
    verdicts = []
    by_key = {(r["group"], r["provider"]): r for r in rows}
    for group, peer, need, *mine in TARGETS:
        mine = mine[0] if mine else "xlard"
        row, own = by_key.get((group, peer)), by_key.get((group, mine))
        if row is None or own is None:  # rows exist only beside an xlard row: name what is missing from the data
            missing = [name for name in dict.fromkeys(("xlard", mine, peer)) if name not in groups.get(group, {})]
            verdicts.append(f"n/a   {group}: no {' or '.join(missing) or peer} run")
            continue
        speedup = row["median_ms"] / own["median_ms"]
        shown = f"{speedup:.2f}"
        if (speedup >= need) != (float(shown) >= need):  # "MISS ... 1.00x (target >= 1.0x)": rounded onto the target
            shown = f"{speedup:.4f}"
        verdicts.append(f"{'met ' if speedup >= need else 'MISS'}  {group}: {mine} {shown}x vs {peer} "
                        f"(target >= {need}x)")
    for bench in data["benchmarks"]:  # within 2x of torch.add: median of per-round paired ratios
        info = bench["extra_info"]
        for label, ratio in info.get("paired", {}).items():
            if info.get("cache") == "warm":  # shown beside the target, not judged: see bench_correction.py
                verdicts.append(f"info  {bench['group']}: {label} = {ratio:.2f}")
                continue
            ok = ratio <= info["paired_max"]
            verdicts.append(f"{'met ' if ok else 'MISS'}  {bench['group']}: {label} = {ratio:.2f} "
                            f"(target <= {info['paired_max']})")

    for bench in data["benchmarks"]:  # capture overhead: median of per-round paired ratios
        ratio = bench["extra_info"].get("overhead_ratio")
        if ratio is not None:
            ok = ratio <= CAPTURE_OVERHEAD_MAX
            verdicts.append(f"{'met ' if ok else 'MISS'}  {bench['group']}: capture costs {ratio:.3f}x an uncaptured "
                            f"call (target <= {CAPTURE_OVERHEAD_MAX}x)")
    for bench in data["benchmarks"]:  # corrector overhead: median per-round t(correct) / t(sampling)
        info = bench["extra_info"]
        ratio = info.get("corrector_overhead_ratio")
        if ratio is not None:
            # The target is the shipped corrector's; other sizes are shown for scale.
            judged = info.get("provider") == "shipped"
            mark = ("met " if ratio <= info["overhead_max"] else "MISS") if judged else "info"
            verdicts.append(f"{mark}  {bench['group']}: {info['provider']} corrector adds {ratio:.1%} to sampling "
                            f"({info['correct_ms']:.1f} vs {info['sample_ms']:.0f} ms; target <= "
                            f"{info['overhead_max']:.0%} for the shipped corrector)")
    for bench in data["benchmarks"]:  # rewards (source + three rewards + explanations) vs generating the batch
        info = bench["extra_info"]
        if "ratio_to_generate" in info:
            ok = info["ratio_to_generate"] <= info["target"]
            verdicts.append(f"{'met ' if ok else 'MISS'}  {bench['group']}: rewards take {info['ratio_to_generate']:.3f}"
                            f" of generation (target <= {info['target']})")
        if "overhead_fraction" in info:  # the trainer's own phases as a share of a training step
            ok = info["overhead_fraction"] <= info["target"]
            verdicts.append(f"{'met ' if ok else 'MISS'}  {bench['group'] or bench['name']}: trainer overhead "
                            f"{info['overhead_fraction']:.1%} of a step (target <= {info['target']:.0%})")
    group, need = GPIXELS_TARGET
    row = by_key.get((group, "xlard"))
    if row is not None:
        ok = row["gpixels_per_s"] >= need
        verdicts.append(f"{'met ' if ok else 'MISS'}  {group}: {row['gpixels_per_s']:.2f} G pixels/s (target >= {need})")
    else:
        verdicts.append(f"n/a   {group}: no xlard run (target >= {need} G pixels/s)")
    # a target whose bench did not run (skipped: weights absent; failed) is named, not left out of the list
    infos = [b["extra_info"] for b in data["benchmarks"]]
    shipped = any(info.get("provider") == "shipped" and "corrector_overhead_ratio" in info for info in infos)
    if not shipped:  # the judged row is the shipped corrector's
        verdicts.append("n/a   shipped corrector overhead (benches/bench_corrector_overhead.py): not run")
    for key, what in (("overhead_ratio", "attention capture overhead (benches/bench_attention.py)"),
                      ("ratio_to_generate", "rewards vs generation (benches/bench_sources.py)"),
                      ("overhead_fraction", "trainer overhead (benches/bench_trainer.py)")):
        if not any(key in info for info in infos):
            verdicts.append(f"n/a   {what}: not run")
    return rows, verdicts


def machine_line(machine: dict) -> str:
    """The machine a report's numbers come from: the CPU's name (py-cpuinfo's, in pytest-benchmark's JSON), cores,
    the vector level xlard's kernels ran at (docs/benchmarks.md: it decides the latent ops' numbers), torch and
    python; "unknown" for what the JSON does not hold."""
    def known(value) -> str:
        return "unknown" if value in (None, "") else str(value)

    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
    build = machine.get("xlard_build") if isinstance(machine.get("xlard_build"), dict) else {}
    name = cpu.get("brand_raw") or machine.get("processor")
    return (f"Machine: {known(name)} ({known(machine.get('machine'))}), {known(machine.get('cpu_count'))} cores, "
            f"CPU kernels at {known(build.get('cpu_isa'))}, torch {known(machine.get('torch'))} "
            f"({known(machine.get('torch_threads'))} threads), python {known(machine.get('python_version'))}")


def rounds_note(data: dict) -> str | None:
    """A line for a quick run (fewer rounds than the full report's 10): its verdicts are a smoke test's."""
    rounds = [b.get("options", {}).get("min_rounds") for b in data.get("benchmarks", []) if isinstance(b, dict)]
    rounds = [r for r in rounds if isinstance(r, int)]
    if rounds and min(rounds) < 10:
        return (f"Quick run (at least {min(rounds)} rounds per benchmark, not 10): the numbers and verdicts below are "
                "a smoke test's, not a measurement to judge the targets by.")
    return None


def to_markdown(rows: list[dict], verdicts: list[str], machine: dict, note: str | None = None) -> str:
    out = [machine_line(machine)] + ([note] if note else []) + ["",
           "| benchmark | provider | median ms | xlard speed-up vs this | G px/s | GB/s |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gp = f"{r['gpixels_per_s']:.3f}" if "gpixels_per_s" in r else ""
        gb = f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else ""
        out.append(f"| {r['group']} | {r['provider']} | {r['median_ms']:.3f} | {r['speedup_of_xlard']:.2f}x | {gp} | {gb} |")
    out += ["", "Targets:", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m benches.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--json", help="write the summary rows and verdicts as JSON here")
    parser.add_argument("--markdown", help="write the markdown table here")
    parser.add_argument("--from-json", help="summarise an existing pytest-benchmark JSON instead of running")
    args = parser.parse_args(argv)
    from xlard import _io

    for flag, value in (("--from-json", args.from_json), ("--json", args.json), ("--markdown", args.markdown)):
        if value is not None and not value.strip():  # "--from-json ''" ran the whole suite instead
            parser.error(f"{flag}: the path is empty; give a file name")
    problem = _io.unwritable_output(files={"--json": args.json, "--markdown": args.markdown})
    if problem:  # now, not after minutes of benchmarks
        parser.error(problem)
    # an output that is the input (or the other output) replaced the benchmark data with the summary
    given = [(flag, value) for flag, value in (("--from-json", args.from_json), ("--json", args.json),
                                               ("--markdown", args.markdown)) if value is not None]
    for i, (flag, value) in enumerate(given):
        for other, other_value in given[i + 1:]:
            if os.path.realpath(value) == os.path.realpath(other_value):
                parser.error(f"{other}: {other_value} is the same file as {flag}; give another path")
    if args.from_json is not None:
        try:
            with open(args.from_json, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            parser.error(f"--from-json: cannot read {args.from_json}: {' '.join(str(e).split())}")
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            parser.error(f"--from-json: {args.from_json} is not a pytest-benchmark JSON (no 'benchmarks' list; "
                         "write one with pytest --benchmark-json FILE)")
    status = 0
    if args.from_json is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            status = run_benchmarks(path, args.quick)
            with open(path) as fh:
                data = json.load(fh)
    try:
        rows, verdicts = summarise(data)
        machine = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
        note = rounds_note(data)
        md = to_markdown(rows, verdicts, machine, note)
    except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as e:
        if args.from_json is None:
            raise  # our own run: a bug, not the user's file
        parser.error(f"--from-json: {args.from_json} is not a complete pytest-benchmark JSON ({type(e).__name__}: "
                     f"{' '.join(str(e).split())}); write one with pytest --benchmark-json FILE")
    print("\n" + md)
    if args.markdown:
        _io.atomic_write_text(args.markdown, md + "\n", owner="benches.report --markdown")
    if args.json:
        _io.atomic_write_json(args.json, {"rows": rows, "verdicts": verdicts, "machine": machine,
                                          "machine_line": machine_line(machine), "quick": note is not None,
                                          "pytest_exit": status}, owner="benches.report --json", indent=2)
    if status != 0:  # the rows that ran are reported above; a failed benchmark still fails the run
        print(f"benches.report: pytest exited {status}: some benchmarks failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("benches.report", main))
