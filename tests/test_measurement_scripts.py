"""scripts/eval_shapes_backbone.py and scripts/measure_eval_cost.py: a bad option is one usage line naming it,
before any model loads (a ZeroDivisionError, FileNotFoundError or RuntimeError traceback before)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import eval_shapes_backbone as EB  # noqa: E402
import measure_eval_cost as MC  # noqa: E402


@pytest.mark.parametrize("bad, text", [
    (["--threads", "0"], "--threads must be in [1, 1024]"),
    (["--n", "0"], "--n must be in [1, 100000]"),
    (["--n", "100000000"], "--n must be in [1, 100000]"),
    (["--steps", "100000000"], "--steps must be in [1, 10000]"),
    (["--threads", "100000"], "--threads must be in [1, 1024]"),
    (["--guidance", "nan"], "--guidance must be a number in [0, 1000]"),
    (["--guidance", "1e308"], "--guidance must be a number in [0, 1000]"),
    (["--seed", "-1"], "--seed and --record-seed must be >= 0"),
    (["--path", "/no/such/pipeline"], "--path: the shapes backbone is not installed at /no/such/pipeline"),
])
def test_eval_shapes_backbone_refuses_bad_options(bad, text, capsys):
    with pytest.raises(SystemExit) as e:
        EB.parse_args(bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and "Traceback" not in err


def test_eval_shapes_backbone_takes_its_defaults():
    args = EB.parse_args(["--n", "6", "--threads", "1"])
    assert (args.n, args.threads, args.path) == (6, 1, None)


@pytest.mark.parametrize("bad, text", [
    (["--records", "0"], "--records must be in [1, 100000]"),
    (["--records", "100000000"], "--records must be in [1, 100000]"),
    (["--batch", "0"], "--batch must be in [1, 4096]"),
    (["--target-seeds", "0"], "--target-seeds must be in [1, 1000]"),
    (["--steps", "0.5,x"], "--steps: expected comma-separated correction steps in (0, 1]"),
    (["--steps", "1.5"], "--steps: expected comma-separated correction steps in (0, 1]"),
    (["--seeds", "a"], "--seeds: must be non-negative integers"),
    (["--out", "/proc/no/such/cost.json"], "--out"),
    (["--seed", "1"], "unrecognized arguments: --seed 1"),  # was taken as --seeds 1: no abbreviations
])
def test_measure_eval_cost_refuses_bad_options_before_loading(bad, text, capsys, monkeypatch):
    from xlard import evaluation

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(evaluation, "load_backbone_for", no_load)
    with pytest.raises(SystemExit) as e:
        MC.main(bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and "Traceback" not in err
