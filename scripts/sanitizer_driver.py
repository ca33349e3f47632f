"""Runs the connected-components ops on small CUDA inputs, for compute-sanitizer.

scripts/gpu_check.sh runs this under ``compute-sanitizer --tool memcheck`` and
``--tool racecheck`` (filtered to kernels whose name contains "components"), with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and
an out-of-bounds access cannot hide inside a cached block. Inputs cover the
shared-memory path (small maps, several per batch), odd sizes, 1xN / Nx1 maps,
empty batches, the global-memory path (a 1024x1024 map, larger than shared
memory, and small maps with ``XLARD_CUDA_COMPONENTS_PATH=global``), every mode,
both connectivities, float and mask dtypes. Every result is also compared with
the C++ CPU op, so a wrong answer fails the run even when the sanitizer is quiet.

    python scripts/sanitizer_driver.py [--providers cuda,triton] [--quick]

Exit status: 0 when every result matched, 1 on a mismatch, 2 when nothing could run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

MODES = ("absolute", "relative", "otsu")
THRESHOLDS = {"absolute": 0.45, "relative": 0.5, "otsu": 0.0}


def inputs(quick: bool):
    """(name, maps on the CPU, force_global_path) cases."""
    from helpers import blobs, checkerboard, spiral

    cases = [
        ("shared 2x3x32x32", blobs(6, 32, 32, seed=1).reshape(2, 3, 32, 32), False),
        ("odd 1x2x37x53", blobs(2, 37, 53, seed=2).reshape(1, 2, 37, 53), False),
        ("row 2x1x300", blobs(2, 1, 300, seed=3), False),
        ("col 2x300x1", blobs(2, 300, 1, seed=4), False),
        ("empty batch 0x8x8", torch.rand(0, 8, 8), False),
        ("forced global 2x40x48", blobs(2, 40, 48, seed=6), True),
        # More components than max_components = 4: the top-K radix select runs its passes.
        ("checker 16x40", torch.from_numpy(checkerboard(16, 40)).float()[None], False),
    ]
    if not quick:
        # The 1024x1024 map outlasted racecheck's 50 s on the first GPU run (an H200); the
        # forced-global cases keep the global path in the quick list.
        cases += [
            ("global 1x1024x1024", blobs(1, 1024, 1024, k=12, seed=5), False),
            ("spiral 64", torch.from_numpy(spiral(64)).float()[None], False),
            ("checker 33x47", torch.from_numpy(checkerboard(33, 47)).float()[None], False),
            ("forced global spiral 64", torch.from_numpy(spiral(64)).float()[None], True),
        ]
    return cases


def run(providers: list[str], quick: bool) -> int:
    import xlard.ops as ops
    from xlard import _backends, _extension

    if not torch.cuda.is_available():
        print("sanitizer_driver: no CUDA device visible to torch", file=sys.stderr)
        return 2
    _extension.require_ops()
    usable = []
    for provider in providers:
        why = _backends.why_not(provider, "cuda")
        if why is None:
            usable.append(provider)
        else:
            print(f"sanitizer_driver: skipping provider {provider!r}: {why}")
    if not usable:
        print("sanitizer_driver: no usable provider", file=sys.stderr)
        return 2
    cpu = torch.ops.xlard
    dtypes = (torch.float16, torch.float32, torch.bool)
    mismatches, calls, start = [], 0, time.time()
    for provider in usable:
        # Triton compiles one kernel per (dtype, mode, connectivity, ...): keep its set small.
        p_dtypes = dtypes if provider == "cuda" else (torch.float32,)
        p_modes = MODES if provider == "cuda" else ("relative", "otsu")
        for name, maps_cpu, force_global in inputs(quick):
            if provider != "cuda" and (force_global or maps_cpu.shape[-2:].numel() > 2**16):
                continue  # the CUDA path switch does not apply to Triton; a big map is minutes under the tool
            if force_global:  # one map per wave (a 0 MiB scratch budget): several launches per call
                os.environ["XLARD_CUDA_COMPONENTS_PATH"] = "global"
                os.environ["XLARD_CUDA_COMPONENTS_SCRATCH_MB"] = "0"
            else:
                os.environ.pop("XLARD_CUDA_COMPONENTS_PATH", None)
                os.environ.pop("XLARD_CUDA_COMPONENTS_SCRATCH_MB", None)
            for dtype in p_dtypes:
                maps = (maps_cpu > 0.5) if dtype == torch.bool else maps_cpu.to(dtype)
                gpu = maps.cuda()
                for mode in (p_modes if dtype != torch.bool else ("absolute",)):
                    for connectivity in (4, 8):
                        args = (THRESHOLDS[mode], mode, 2, connectivity)
                        with ops.provider(provider):
                            labels, counts = ops.label_components(gpu, *args)
                            only = ops.count_components(gpu, *args)
                            stats = ops.component_stats(gpu, *args, max_components=4)
                        torch.cuda.synchronize()
                        calls += 3
                        want_labels, want_counts = cpu.label_components(maps, *args)
                        want_stats = cpu.component_stats(maps, *args, 4)
                        ok = (torch.equal(labels.cpu(), want_labels) and torch.equal(counts.cpu(), want_counts)
                              and torch.equal(only.cpu(), want_counts)
                              and all(torch.equal(a.cpu().nan_to_num(), b.nan_to_num())
                                      for a, b in zip(stats, want_stats)))
                        if not ok:
                            mismatches.append(f"{provider} {name} {dtype} {mode} c{connectivity}")
        os.environ.pop("XLARD_CUDA_COMPONENTS_PATH", None)
        os.environ.pop("XLARD_CUDA_COMPONENTS_SCRATCH_MB", None)
    print(f"sanitizer_driver: providers {usable}, {calls} op calls in {time.time() - start:.1f}s, "
          f"{len(mismatches)} mismatches with the CPU op")
    for line in mismatches:
        print(f"  MISMATCH {line}")
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default="cuda,triton", help="comma-separated: cuda, triton")
    parser.add_argument("--quick", action="store_true", help="fewer cases (for racecheck, the slower tool)")
    args = parser.parse_args(argv)
    return run([p for p in args.providers.split(",") if p], args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
