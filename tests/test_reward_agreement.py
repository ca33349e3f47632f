"""scripts/reward_agreement.py: the AUROC and a run on a tiny random pipeline."""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import reward_agreement as RA  # noqa: E402


def test_auroc_rank_formula():
    assert RA.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert RA.auroc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    assert RA.auroc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(RA.auroc([0.3], [True]))


def test_run_on_a_tiny_pipeline(tmp_path):
    from tiny_pipelines import tiny_sd_pipeline

    report = RA.run(str(tiny_sd_pipeline(tmp_path / "pipe")), 12, 0, 6, 2, True)
    assert report["n"] == 12 and len(report["rows"]) == 12
    assert {"count", "color", "position", "joint"} <= set(report["summary"])
    table = RA.to_markdown(report)
    assert "| count | counting |" in table
