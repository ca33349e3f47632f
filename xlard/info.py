"""``python -m xlard.info``: versions, what xlard._C was compiled with, and which
provider serves each op on each device (and why the others cannot)."""
from __future__ import annotations

import json
import platform
import sys


def collect() -> dict:
    """Everything ``python -m xlard.info`` prints, as a dict."""
    import torch

    import xlard
    from xlard import _backends, _extension

    triton_version = None
    if _backends.triton_status() is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            triton_version = version("triton")
        except PackageNotFoundError:  # pytorch-triton (nightly or ROCm torch), or a plain folder on the path
            import triton

            triton_version = str(getattr(triton, "__version__", "unknown version"))
    return {
        "xlard": xlard.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version,
        "triton_interpret": _backends.triton_interpreted(),
        "extension": _extension.build_info(),
        "providers": _backends.table(),
    }


_REPORT_KEYS = ("xlard", "python", "torch", "torch_cuda", "platform", "cuda_available", "triton", "triton_interpret",
                "extension", "providers")


def format_report(info: dict) -> str:
    missing = [k for k in _REPORT_KEYS if not isinstance(info, dict) or k not in info]
    if missing:  # was KeyError 'xlard'
        raise ValueError(f"format_report: info must be the dict xlard.info.collect() returns (missing {missing})")
    lines = [
        f"xlard {info['xlard']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})",
        f"platform: {info['platform']}",
        f"CUDA device available: {info['cuda_available']}   triton: {info['triton'] or 'not installed'}"
        f"{'  (TRITON_INTERPRET=1)' if info['triton_interpret'] else ''}",
        f"xlard._C: {json.dumps(info['extension'])}",
        "",
        f"{'op':22s} {'device':6s} {'default':8s} providers",
    ]
    # Each reason a provider cannot serve is printed once, below the table, and cited by
    # number in it (the same reason usually applies to every op).
    reasons: dict[str, int] = {}
    for row in info["providers"]:
        cells = []
        for p, why in row["status"].items():
            if why is None:
                cells.append(f"{p}: ok")
            else:
                cells.append(f"{p}: no [{reasons.setdefault(why, len(reasons) + 1)}]")
        lines.append(f"{row['op']:22s} {row['device']:6s} {row['default']:8s} {'; '.join(cells)}")
    if reasons:
        lines.append("")
        lines.extend(f"[{n}] {why}" for why, n in reasons.items())
    problems = list(dict.fromkeys(row["problem"] for row in info["providers"] if row.get("problem")))
    if problems:  # a bad setting is shown in the report, not in place of it
        lines.append("")
        lines.extend(f"setting: {p}" for p in problems)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unknown = [a for a in argv if a != "--json"]
    if unknown:  # `--js` or a typo printed the text report as if nothing was asked
        print(f"python -m xlard.info: error: unrecognized arguments: {' '.join(unknown)} (it takes only --json)",
              file=sys.stderr)
        return 2
    info = collect()
    try:
        print(json.dumps(info, indent=2) if "--json" in argv else format_report(info))
        sys.stdout.flush()
    except BrokenPipeError:  # `python -m xlard.info | head -1`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
