"""Paired base-vs-corrected evaluation: bootstrap statistics against hand-computed cases, the corrector
folder format and its checks, and the whole run (tables, faithfulness, resume, CLI) on the shapes backbone."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xlard import cli
from xlard import evaluation as ev
from xlard.models import CorrectorConfig, ResidualCorrector
from xlard.shapes import backbone as shapes_backbone

needs_shapes = pytest.mark.skipif(not shapes_backbone.is_available(),
                                  reason=f"shapes backbone weights absent at {shapes_backbone.backbone_path()}")

# Tiny sampler settings for tests: 2 denoising steps, the correction after the first.
STEPS, GUIDANCE, STEP = 2, 5.0, 0.5


# ---------------------------------------------------------------------------
# Statistics


def test_bootstrap_two_records_hand_computed():
    # Resampling 2 records: the mean gain is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are exactly 0 and 1.
    r = ev.paired_bootstrap([0, 0], [0, 1], num_resamples=4000, seed=1)
    assert (r.base, r.corrected, r.diff, r.ci_low, r.ci_high) == (0.0, 0.5, 0.5, 0.0, 1.0)
    assert (r.records, r.images) == (2, 2) and not r.excludes_zero


def test_bootstrap_three_records_asymmetric_interval():
    # One gain among 3 records: P(no gain drawn) = 8/27 > 2.5%, P(all three draws the gain) = 1/27 > 2.5%.
    r = ev.paired_bootstrap([0, 0, 0], [0, 0, 1], num_resamples=4000, seed=0)
    assert math.isclose(r.diff, 1 / 3) and (r.ci_low, r.ci_high) == (0.0, 1.0)
    # With 8 records of which 7 gain: P(no non-gain drawn) = (7/8)^8 = 34% -> upper bound 1;
    # P(at most 5 gains) = 6.4% and P(at most 4) = 1.4%, so the lower bound is 5/8.
    r = ev.paired_bootstrap([0] * 8, [1] * 7 + [0], num_resamples=20000, seed=0)
    assert (r.ci_low, r.ci_high) == (5 / 8, 1.0) and r.excludes_zero


def test_bootstrap_constant_difference_has_a_point_interval():
    r = ev.paired_bootstrap([0, 1, 0, 1], [1, 1, 1, 1], clusters=[0, 0, 1, 1])
    assert r.diff == 0.5 and r.ci_low == r.ci_high == 0.5


def test_bootstrap_resamples_records_not_images():
    # Two records x 4 seeds: record A always gains, B never. Resampling records gives [0, 1];
    # treating the 8 images as independent would give a much narrower interval.
    base, corrected = [0] * 8, [1] * 4 + [0] * 4
    clustered = ev.paired_bootstrap(base, corrected, clusters=["a"] * 4 + ["b"] * 4, num_resamples=4000)
    loose = ev.paired_bootstrap(base, corrected, num_resamples=4000)
    assert (clustered.ci_low, clustered.ci_high) == (0.0, 1.0) and clustered.records == 2
    assert loose.ci_low > 0.0 and loose.ci_high < 1.0 and loose.records == 8


def test_bootstrap_width_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.random(n) < 0.4
    corrected = np.where(rng.random(n) < 0.3, ~base, base)
    d = corrected.astype(float) - base
    se = d.std() / math.sqrt(n)
    r = ev.paired_bootstrap(base, corrected, num_resamples=4000, seed=3)
    assert abs((r.ci_high - r.ci_low) / (2 * 1.959964 * se) - 1) < 0.1
    assert r.ci_low <= r.diff <= r.ci_high


def test_bootstrap_is_reproducible_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        base, corrected = rng.random(n) < 0.5, rng.random(n) < 0.6
        keys = rng.integers(0, max(1, n // 2), n)
        a = ev.paired_bootstrap(base, corrected, keys, num_resamples=500, seed=trial)
        b = ev.paired_bootstrap(base, corrected, keys, num_resamples=500, seed=trial)
        assert a == b
        assert a.ci_low <= a.diff <= a.ci_high, (trial, a)
    c = ev.paired_bootstrap(base, corrected, keys, num_resamples=500, seed=trial + 1)
    assert (c.ci_low, c.ci_high) != (a.ci_low, a.ci_high) or c.ci_low == c.ci_high


def _same(a, b) -> bool:
    """Equal reports, NaN (no interval) equal to NaN: compared as the strict JSON eval.json holds."""
    from xlard import _io

    return _io.dumps(a, sort_keys=True) == _io.dumps(b, sort_keys=True)


def test_a_single_cluster_has_no_interval_and_the_table_says_the_overall_one_is_conditional_on_it():
    """Resampling one cluster draws it every time: a tag of one record (or one prompt) got the interval [d, d] and
    the table called a one-image gain significant; the overall row takes no spread from that tag, which the table
    now says (and with every tag a single cluster there is no overall interval at all)."""
    from xlard.evaluation import format_markdown, interval_text, paired_bootstrap, paired_table

    t = paired_table(["counting"] + ["colors"] * 40, [0] + [0] * 40, [1] + [1] * 30 + [0] * 10, num_resamples=500)
    assert t["counting"].diff == 1.0 and math.isnan(t["counting"].ci_low) and math.isnan(t["counting"].ci_high)
    assert not t["counting"].excludes_zero
    assert t["colors"].ci_low > 0 and t["colors"].excludes_zero
    # the overall replicates: counting's fixed +1 beside colors' resampled gain, halved
    assert t["overall"].ci_low == pytest.approx((1 + t["colors"].ci_low) / 2)
    alone = paired_table(["counting", "colors"], [0, 0], [1, 0])
    assert all(math.isnan(alone[k].ci_low) for k in ("counting", "colors", "overall"))
    one = paired_bootstrap([0, 0, 0], [1, 1, 0], clusters=["p", "p", "p"])  # one prompt's images
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high) and one.diff == pytest.approx(2 / 3)
    assert interval_text(float("nan"), 0.1) == interval_text(None, None) == "n/a"
    assert interval_text(-0.01, 0.125) == "[-1.0, +12.5]"
    rows = {tag: {"base": d.base, "corrected": d.corrected, "diff": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high,
                  "records": d.records, "images": d.images} for tag, d in t.items()}
    text = format_markdown({"table": rows, "bootstrap": {"confidence": 0.95, "num_resamples": 500, "seed": 0},
                            "lam_mass": 0.0})
    assert "| counting | 1 |" in text and "| +100.0 | n/a | n/a |" in text
    assert [line for line in text.splitlines() if line.startswith("| **overall**")][0].endswith("| yes |")
    assert "n/a: counting rest(s) on one record, which resampling draws every time; the overall interval takes no " \
           "spread from it (conditional on it)" in text
    rows = {tag: {"base": d.base, "corrected": d.corrected, "diff": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high,
                  "records": d.records, "images": d.images} for tag, d in alone.items()}
    text = format_markdown({"table": rows, "bootstrap": {"confidence": 0.95, "num_resamples": 500, "seed": 0},
                            "lam_mass": 0.0})
    assert "n/a: counting, colors rest(s) on one record, which resampling draws every time; so no interval is " \
           "estimated at all" in text


def test_paired_table_overall_is_the_mean_of_tag_means():
    tags = ["counting"] * 4 + ["colors"] * 2 + ["position"] * 2
    base = [0, 0, 0, 1, 1, 1, 0, 0]
    corrected = [1, 1, 0, 1, 1, 0, 0, 1]
    t = ev.paired_table(tags, base, corrected, num_resamples=1000)
    assert list(t) == ["counting", "colors", "position", "overall"]  # GenEval's order
    assert t["counting"].diff == 0.5 and t["colors"].diff == -0.5 and t["position"].diff == 0.5
    assert math.isclose(t["overall"].diff, (0.5 - 0.5 + 0.5) / 3)
    assert math.isclose(t["overall"].base, (0.25 + 1.0 + 0.0) / 3)
    assert t["overall"].records == 8
    for row in t.values():
        assert row.ci_low <= row.diff <= row.ci_high
    # A tag's interval does not depend on which other tags are in the table.
    alone = ev.paired_table(tags[:4], base[:4], corrected[:4], num_resamples=1000)
    assert alone["counting"] == t["counting"]


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        ev.paired_bootstrap([0, 1], [1])
    with pytest.raises(ValueError, match="empty"):
        ev.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        ev.paired_bootstrap([0], [1], confidence=1.5)
    with pytest.raises(ValueError, match="num_resamples"):
        ev.paired_bootstrap([0], [1], num_resamples=0)
    with pytest.raises(ValueError, match="clusters must have one key"):
        ev.paired_bootstrap([0, 1], [1, 1], clusters=[0])
    with pytest.raises(TypeError, match=r"clusters must hold hashable keys .*got list \[2\] at item 1"):
        ev.paired_bootstrap([0, 0], [0, 1], clusters=[(1,), [2]])  # was "unhashable type: 'list'"
    with pytest.raises(TypeError, match=r"paired_table: clusters must hold hashable keys .*got list \[0, 0\] at item 0"):
        ev.paired_table(["counting", "colors"], [0, 0], [1, 1], clusters=[[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="cluster 7 has items of tags"):
        ev.paired_table(["counting", "colors"], [0, 0], [1, 1], clusters=[7, 7])
    with pytest.raises(ValueError, match="finite"):
        ev.paired_bootstrap([float("nan")], [1])
    assert ev.image_seed(0, 5) == 5 and ev.image_seed(2, 5) == 2_000_005
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        ev.image_seed(-1, 0)
    assert ev.parse_seeds("0,1, 4") == [0, 1, 4] and ev.parse_seeds(None, 3) == [3]
    for bad in ("0,0", "a", "-1", "", [1.5], [True], 3):  # 1.5 and True were read as 1; 3: "not iterable"
        with pytest.raises(ValueError, match="--seeds"):
            ev.parse_seeds(bad)
    assert ev.parse_seeds(np.arange(2)) == [0, 1] and ev.parse_seeds(["0", " 1"]) == [0, 1]
    assert ev.parse_seeds([1.0, np.float64(2.0)]) == [1, 2]  # whole values, as before; only 1.5 and True refused
    with pytest.raises(ValueError, match="--seeds"):
        ev.parse_seeds(np.array(4))  # a 0-d array: a TypeError from inside before
    top = (2**64 - ev.SEED_STRIDE) // ev.SEED_STRIDE
    assert ev.image_seed(top, ev.SEED_STRIDE - 1) < 2**64
    with pytest.raises(ValueError, match=rf"image_seed: seed must be at most {top} .*below 2\*\*64\), got {2**70}"):
        ev.image_seed(2**70, 0)  # the generator refused it later, after run.json was written


def test_the_bootstrap_draws_in_blocks_the_same_replicates(monkeypatch):
    """100000 resamples of 100000 records needed about 28 GB drawn at once; drawn in blocks now, with the same
    random stream in the same order: the same interval to the last bit."""
    rng = np.random.default_rng(3)
    base, corrected = rng.random(500), rng.random(500)
    clusters = rng.integers(0, 200, 500)
    whole = ev.paired_bootstrap(base, corrected, clusters, num_resamples=3000, seed=7)
    small = ev.paired_bootstrap(base, corrected, clusters, num_resamples=300, seed=7)
    monkeypatch.setattr(ev, "_RESAMPLE_CELLS", 1000)  # five replicates per block, 600 blocks
    assert ev.paired_bootstrap(base, corrected, clusters, num_resamples=3000, seed=7) == whole
    monkeypatch.setattr(ev, "_RESAMPLE_CELLS", 1)  # fewer cells than records: one replicate per block
    assert ev.paired_bootstrap(base, corrected, clusters, num_resamples=300, seed=7) == small


def test_actions_table_by_hand():
    def row(i, tag, base, corrected, actions):
        return ev.PairRow(i, 0, tag, "p", base, corrected, "", "", 1.0, actions=actions)

    rows = [row(0, "counting", False, True, ["redrew 4 circle(s)", "added 1 circle(s)"]),
            row(1, "counting", True, False, ["redrew 3 circle(s)", "added 1 circle(s)", "redrew 1 circle(s)"]),
            row(2, "counting", False, True, ["redrew 5 circle(s)"]),
            row(3, "position", False, False, ["moved 40 latent cells"]),
            row(4, "colors", True, True, [])]
    table = ev.actions_table(rows)
    assert table == {"counting": {"redrew + added": {"pairs": 2, "fixed": 1, "broken": 1},
                                  "redrew": {"pairs": 1, "fixed": 1, "broken": 0}},
                     "position": {"moved": {"pairs": 1, "fixed": 0, "broken": 0}},
                     "colors": {"residual only": {"pairs": 1, "fixed": 0, "broken": 0}}}
    assert ev.actions_table([row(0, "colors", True, True, [])]) is None  # no rules acted: no table
    text = ev.format_markdown(ev.build_report(rows, num_resamples=100))
    assert "| counting | redrew + added | 2 | 1 | 1 |" in text and "| position | moved | 1 | 0 | 0 |" in text
    assert text.index("| colors | residual only") < text.index("| position | moved")  # GenEval's tag order
    assert "What the corrector's rules did" not in ev.format_markdown(
        ev.build_report([row(0, "colors", True, True, [])], num_resamples=100))
    # Python API tags and actions holding "|", a line break or markup broke the tables' columns and rows; a tag
    # named "overall" was overwritten by the aggregate row
    odd = [row(0, "my|tag", False, True, ["redrew | x"]), row(1, "new\nline", True, True, []),
           row(2, "`b` <i>", False, False, [])]
    text = ev.format_markdown(ev.build_report(odd, num_resamples=50))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert all(line.count("|") - line.count("\\|") == line.count(" | ") + 2 for line in table), table
    assert "| my\\|tag | redrew | 1 | 1 | 0 |" in text and "| new line |" in text and "| \\`b\\` \\<i\\> |" in text
    with pytest.raises(ValueError, match=r"paired_table: tags: 'overall' names the mean of the tags' scores, not a "
                                         r"tag \(item 1\)"):
        ev.build_report([row(0, "colors", True, True, []), row(1, "overall", False, True, [])], num_resamples=50)


def test_faithfulness_table_by_hand():
    rows = [ev.PairRow(i, 0, "counting", "p", base_correct=b, corrected_correct=c, base_reason="",
                       corrected_reason="", lam_mass=1.0, masked_correct=m, random_correct=r)
            for i, (b, c, m, r) in enumerate([(0, 1, 0, 1), (0, 1, 0, 1), (0, 1, 1, 1), (1, 1, 1, 0)])]
    f = ev.faithfulness_table(rows, num_resamples=500)
    assert f["gain"]["diff"] == 0.75
    assert f["lost_top"]["diff"] == 0.5 and f["lost_random"]["diff"] == 0.25
    assert math.isclose(f["share_lost_top"], 2 / 3) and math.isclose(f["share_lost_random"], 1 / 3)
    assert f["lost_top"]["ci_low"] <= 0.5 <= f["lost_top"]["ci_high"]
    no_faith = [ev.PairRow(0, 0, "counting", "p", True, True, "ok", "ok", 0.0)]
    assert ev.faithfulness_table(no_faith) is None
    # A gain whose interval includes 0 has no meaningful share (two fixed, one broken of 40: gain +0.025).
    mixed = [ev.PairRow(i, 0, "counting", "p", base_correct=i == 0, corrected_correct=i in (1, 2), base_reason="",
                        corrected_reason="", lam_mass=1.0, masked_correct=False, random_correct=i == 1)
             for i in range(40)]
    f = ev.faithfulness_table(mixed, num_resamples=500)
    assert f["gain"]["diff"] == 0.025 and f["gain"]["ci_low"] < 0 < f["gain"]["ci_high"]
    assert math.isnan(f["share_lost_top"]) and math.isnan(f["share_lost_random"])
    # Per tag: one tag's gain, all of it lost under the top-LAM mask; the other tag unchanged.
    two = [ev.PairRow(i, 0, "colors", "p", base_correct=False, corrected_correct=True, base_reason="",
                      corrected_reason="", lam_mass=1.0, masked_correct=False, random_correct=True) for i in range(20)]
    two += [ev.PairRow(20 + i, 0, "position", "q", base_correct=i < 5, corrected_correct=i < 5, base_reason="",
                       corrected_reason="", lam_mass=1.0, masked_correct=i < 5, random_correct=i < 5)
            for i in range(20)]
    f = ev.faithfulness_table(two, num_resamples=500)
    assert set(f["tags"]) == {"colors", "position"}
    colors, position = f["tags"]["colors"], f["tags"]["position"]
    assert colors["gain"]["diff"] == 1.0 and colors["lost_top"]["diff"] == 1.0 and colors["lost_random"]["diff"] == 0
    assert colors["share_lost_top"] == 1.0 and colors["share_lost_random"] == 0.0
    assert position["gain"]["diff"] == 0.0 and math.isnan(position["share_lost_top"])
    assert f["gain"]["diff"] == 0.5  # overall: the mean of the two tags
    md = ev.format_markdown(ev.build_report(two, settings={"faithfulness_fraction": 0.2}, num_resamples=200))
    assert "| colors | +100.0 | [+100.0, +100.0] | +100.0 | +0.0 | 100% / 0% |" in md
    assert "| position | +0.0 | [+0.0, +0.0] | +0.0 | +0.0 | n/a / n/a |" in md
    assert "| base (no correction) | " in md and "| 100% |" in md  # overall gain +50 excludes 0: all of it lost
    # no gain: the base row said 100% beside the other rows' "n/a (no gain ...)"
    md = ev.format_markdown(ev.build_report(mixed, settings={"faithfulness_fraction": 0.2}, num_resamples=200))
    base_row = [line for line in md.splitlines() if line.startswith("| base (no correction)")][0]
    assert base_row.endswith("| n/a (no gain shown: its interval includes 0 or has too few records) |")
    assert "100%" not in base_row


def test_the_lam_and_actions_are_of_the_change_applied():
    """A corrector of alpha 0 changed no pixel, while its actions said "removed 1 circle(s)" and its LAM (of Delta,
    not of alpha * Delta) was as bright as at alpha 1."""
    lam = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]])
    out, acts = ev.applied_change(lam, [["removed 1 circle(s)"]], 0.0)
    assert torch.equal(out, torch.zeros_like(lam)) and acts == [["nothing applied (alpha 0)"]]
    out, acts = ev.applied_change(lam, [["removed 1 circle(s)"]], -0.5)
    assert torch.equal(out, lam * 0.5) and acts == [["removed 1 circle(s)"]]
    assert ev.applied_change(lam, [[]], 1.0)[0] is lam


@needs_shapes
def test_a_corrector_of_alpha_zero_reports_nothing_applied(shapes, records, tmp_path):
    corrector = _corrector(head_std=0.5)
    report = ev.run_evaluation(shapes, corrector, _meta(alpha=0.0), records[:2], seeds=[0], out=tmp_path / "run",
                               quiet=True, num_resamples=40, faithfulness_fraction=None)
    pairs = [json.loads(line) for line in (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["lam_mass"] == 0 and p["actions"] == ["nothing applied (alpha 0)"] for p in pairs)
    assert report["lam_mass"] == 0


# ---------------------------------------------------------------------------
# Corrector folders


def _meta(**changes):
    fields = dict(backbone="shapes", correction_step=STEP, alpha=1.0, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, training={"note": "test"})
    fields.update(changes)
    return ev.CorrectorMeta(**fields)


def _corrector(channels=8, text_dim=64, pooled_dim=64, head_std=0.0, seed=0):
    torch.manual_seed(seed)
    c = ResidualCorrector(CorrectorConfig.tiny(latent_channels=channels, text_dim=text_dim, pooled_dim=pooled_dim))
    if head_std:
        torch.nn.init.normal_(c.head.weight, std=head_std)
        torch.nn.init.normal_(c.head.bias, std=head_std)
    return c.eval()


def test_corrector_dir_round_trip(tmp_path):
    c = _corrector(head_std=0.3)
    path = ev.save_corrector_dir(tmp_path / "corr", c, _meta())
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "xlard_corrector.json"]
    data = json.loads((path / ev.CORRECTOR_META_NAME).read_text())
    assert data == {"format": "xlard-corrector", "format_version": 1, "backbone": "shapes",
                    "correction_step": STEP, "alpha": 1.0, "num_inference_steps": STEPS,
                    "guidance_scale": GUIDANCE, "training": {"note": "test"}}
    loaded, meta = ev.load_corrector_dir(path)
    assert meta == _meta()
    for (k, a), (k2, b) in zip(c.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # NaN and inf in the free-form provenance are written as null: strict JSON (a strict parser rejected it)
    odd = dataclasses.replace(_meta(), training={"x": float("nan"), "nested": [float("inf"), 1.0], "ok": "y"})
    ev.save_corrector_dir(tmp_path / "odd", c, odd)

    def strict(name):
        raise ValueError(f"not strict JSON: {name}")

    data = json.loads((tmp_path / "odd" / ev.CORRECTOR_META_NAME).read_text(), parse_constant=strict)
    assert data["training"] == {"x": None, "nested": [None, 1.0], "ok": "y"}
    assert ev.load_corrector_dir(tmp_path / "odd")[1].training == data["training"]
    with pytest.raises(TypeError, match="load_corrector_dir: path must be a corrector folder .*got NoneType"):
        ev.load_corrector_dir(None)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file; give the folder"):  # was "does not exist"
        ev.load_corrector_dir(tmp_path / "afile")
    # Overwriting an existing folder replaces its files.
    ev.save_corrector_dir(path, _corrector(), _meta(alpha=0.5))
    loaded, meta = ev.load_corrector_dir(path)
    assert meta.alpha == 0.5 and not loaded.head.weight.any()


def test_bad_corrector_dirs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_corrector_dir(tmp_path / "absent")
    plain = _corrector().save_pretrained(tmp_path / "plain")  # save_pretrained alone: no metadata
    with pytest.raises(FileNotFoundError, match="has no xlard_corrector.json"):
        ev.load_corrector_dir(plain)
    run = tmp_path / "run"  # a training run folder given instead of the corrector folder inside it
    ev.save_corrector_dir(run / "corrector", _corrector(), _meta())
    with pytest.raises(FileNotFoundError, match=r"looks like a training run folder: its corrector is .*run/corrector"):
        ev.load_corrector_dir(run)
    demo = tmp_path / "demo"  # an xlard demo folder: its corrector is train/corrector (the message gave no hint)
    ev.save_corrector_dir(demo / "train" / "corrector", _corrector(), _meta())
    with pytest.raises(FileNotFoundError, match=r"looks like an xlard demo folder: its corrector is .*demo/train/corr"):
        ev.load_corrector_dir(demo)
    path = ev.save_corrector_dir(tmp_path / "c", _corrector(), _meta())
    meta_file = path / ev.CORRECTOR_META_NAME
    good = json.loads(meta_file.read_text())
    cases = [({**good, "correction_step": 1.5}, "correction_step must be a number in"),
             ({**good, "format": "other"}, "'format' must be 'xlard-corrector'"),
             ({**good, "format_version": 9}, "format_version 9"),
             ({**good, "speed": 1}, "unknown keys \\['speed'\\]"),
             ({k: v for k, v in good.items() if k != "alpha"}, "missing keys \\['alpha'\\]"),
             ({**good, "num_inference_steps": 0}, "num_inference_steps must be an integer >= 1")]
    for data, message in cases:
        meta_file.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            ev.load_corrector_dir(path)
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ev.load_corrector_dir(path)
    meta_file.write_text(json.dumps(good))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ev.load_corrector_dir(path)
    with pytest.raises(TypeError, match="ResidualCorrector"):
        ev.save_corrector_dir(tmp_path / "x", object(), _meta())
    with pytest.raises(TypeError, match="CorrectorMeta"):
        ev.save_corrector_dir(tmp_path / "x", _corrector(), {"backbone": "shapes"})


def test_a_corrector_that_does_not_fit_is_named_as_the_corrector_argument(monkeypatch):
    """The command line's one line names the argument; a corrector for another backbone said only "the corrector
    (trained for backbone ...) does not fit this backbone" under `xlard generate: error:`."""
    backbone = SimpleNamespace(latent_channels=8, text_dim=64, pooled_dim=64, correction_step=STEP,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                               family=SimpleNamespace(vae_scale_factor=4))

    def mismatch(*args, **kwargs):
        ev.check_corrector_fits(_corrector(channels=4, text_dim=32), _meta(), backbone)

    monkeypatch.setattr(ev, "load_backbone_for", mismatch)
    with pytest.raises(ev.CorrectorMismatch, match=r"^--corrector: the corrector \(trained for backbone .*\) does "
                                                   r"not fit this backbone: latent channels"):
        ev._backbone_from_args(SimpleNamespace(), None, _meta())


def test_corrector_fit_names_every_mismatch():
    backbone = SimpleNamespace(latent_channels=8, text_dim=64, pooled_dim=64, correction_step=STEP,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                               family=SimpleNamespace(vae_scale_factor=4))
    ev.check_corrector_fits(_corrector(), _meta(), backbone)
    with pytest.raises(ValueError, match="latent channels: corrector 4, backbone 8.*text_dim\\): corrector 32"):
        ev.check_corrector_fits(_corrector(channels=4, text_dim=32), _meta(), backbone)
    with pytest.raises(ValueError, match="correction_step: corrector trained at 0.3, backbone runs 0.5"):
        ev.check_corrector_fits(_corrector(), _meta(correction_step=0.3), backbone)
    with pytest.raises(ValueError, match="num_inference_steps: corrector trained at 20, backbone runs 2 \\(the "
                                         "CLI's --steps: leave it out to use the corrector's\\)"):
        ev.check_corrector_fits(_corrector(), _meta(num_inference_steps=20), backbone)
    patched = ResidualCorrector(CorrectorConfig.tiny(latent_channels=8, text_dim=64, pooled_dim=64, patch=3))
    with pytest.raises(ValueError, match="latent grid 16x16 not divisible by the corrector's patch 3"):
        ev.check_corrector_fits(patched, _meta(), backbone)
    # count_move's default eyes are the shapes backbone's VAE and understanding model, on a final latent.
    from xlard.vocab import GENEVAL_COLORS

    for name, does in (("count_move", "counts"), ("count_edit", "edits")):
        counting = ResidualCorrector(CorrectorConfig.tiny(latent_channels=8, text_dim=64, pooled_dim=64,
                                                          conditioning="fields", reader=True, reader_width=8,
                                                          reader_nouns=("circle", "square"),
                                                          reader_colors=tuple(GENEVAL_COLORS), **{name: True}))
        pattern = f"{name} {does} with the shapes backbone's VAE.*needs correction_step 1.0"
        with pytest.raises(ValueError, match=pattern):
            ev.check_corrector_fits(counting, _meta(), backbone)
        counting.attach_eyes(lambda z: (torch.zeros(z.shape[0], 2, 64, 64), torch.zeros(z.shape[0], 64, 64)))
        ev.check_corrector_fits(counting, _meta(), backbone)  # eyes of its own: any backbone
    # count_edit redraws 64 x 64 images: another size failed mid-run, on the first batch holding a counting prompt
    editing = ResidualCorrector(CorrectorConfig.tiny(latent_channels=8, text_dim=64, pooled_dim=64,
                                                     conditioning="fields", reader=True, reader_width=8,
                                                     reader_nouns=("circle", "square"),
                                                     reader_colors=tuple(GENEVAL_COLORS), count_edit=True))
    large = SimpleNamespace(**{**vars(backbone), "height": 128, "width": 96})
    with pytest.raises(ValueError, match="count_edit redraws the shapes backbone's 64x64 images .* makes 128x96"):
        ev.check_corrector_fits(editing, _meta(), large)
    # count_eyes: latent without the latent eyes installed failed at the first counting prompt, mid-run
    import os

    reading = ResidualCorrector(dataclasses.replace(editing.config, count_eyes="latent"))
    old = os.environ.get("XLARD_SHAPES_LATENT_EYES")
    os.environ["XLARD_SHAPES_LATENT_EYES"] = "/nonexistent/latent-eyes"
    try:
        with pytest.raises(ValueError, match="count_edit edits with the shapes backbone's VAE and latent eyes.*"
                                             "reads with the shapes latent eyes \\(count_eyes: latent\\), and "
                                             "there are no latent eyes at /nonexistent/latent-eyes \\(from "
                                             "\\$XLARD_SHAPES_LATENT_EYES\\).*point \\$XLARD_SHAPES_LATENT_EYES"):
            ev.check_corrector_fits(reading, _meta(), backbone)
        # damaged weights (a cut file) were found only at the first counting prompt, after the outputs began
        import shutil
        import tempfile

        from xlard.shapes import latent_eyes

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(latent_eyes.DEFAULT_PATH, f"{tmp}/eyes")
            with open(f"{tmp}/eyes/model.safetensors", "r+b") as f:
                f.truncate(1000)
            os.environ["XLARD_SHAPES_LATENT_EYES"] = f"{tmp}/eyes"
            with pytest.raises(ValueError, match="the latent eyes at .*eyes \\(from \\$XLARD_SHAPES_LATENT_EYES\\) "
                                                 "cannot be loaded: .*not a readable safetensors file"):
                ev.check_corrector_fits(reading, _meta(), backbone)
    finally:
        if old is None:
            os.environ.pop("XLARD_SHAPES_LATENT_EYES")
        else:
            os.environ["XLARD_SHAPES_LATENT_EYES"] = old


def test_the_run_digest_covers_the_default_latent_eyes(tmp_path, monkeypatch):
    """A generate or eval run resumed with other latent eyes ($XLARD_SHAPES_LATENT_EYES) mixed two sets of count
    edits without a word: the corrector's digest, which a resume compares, now covers the eyes it reads with."""
    from xlard.shapes import latent_eyes
    from xlard.vocab import GENEVAL_COLORS

    if not latent_eyes.is_available():
        pytest.skip("the shipped latent eyes are absent")
    cfg = CorrectorConfig.tiny(latent_channels=8, text_dim=64, pooled_dim=64, conditioning="fields", reader=True,
                               reader_width=8, reader_nouns=("circle", "square"),
                               reader_colors=tuple(GENEVAL_COLORS), count_edit=True, count_eyes="latent")
    corrector = ResidualCorrector(cfg)
    shipped = ev._corrector_digest(corrector)
    other = latent_eyes.LatentUnderstanding.from_pretrained()
    with torch.no_grad():
        other.shape_head.bias.add_(1.0)
    other.save_pretrained(tmp_path / "eyes")
    monkeypatch.setenv("XLARD_SHAPES_LATENT_EYES", str(tmp_path / "eyes"))
    assert ev._corrector_digest(corrector) != shipped
    decoded = ResidualCorrector(dataclasses.replace(cfg, count_eyes="decoded"))
    decoded.load_state_dict(corrector.state_dict())
    digest = ev._corrector_digest(decoded)
    monkeypatch.delenv("XLARD_SHAPES_LATENT_EYES")
    assert ev._corrector_digest(decoded) == digest  # the decoded eyes do not read the latent eyes


def test_no_shipped_corrector_for_other_backbones(tmp_path):
    with pytest.raises(ValueError, match="no corrector ships for backbone 'sd'"):
        ev.shipped_corrector_path("sd")
    with pytest.raises(ValueError, match="no corrector ships for backbone"):
        ev.shipped_corrector_path(str(tmp_path))


def test_the_shipped_corrector_of_the_shapes_backbone_given_by_its_folder():
    """`--backbone <the shapes backbone's folder> --correct` said "no corrector ships" though the same folder with
    --corrector worked and the sources took it for the shapes backbone."""
    if not shapes_backbone.is_available(shapes_backbone.backbone_path()):
        pytest.skip("the shapes backbone is not installed")
    folder = shapes_backbone.backbone_path()
    for given in (str(folder), folder, os.path.relpath(folder)):
        assert ev.shipped_corrector_path(given) == ev.shipped_corrector_path("shapes")


# ---------------------------------------------------------------------------
# Runs on the shapes backbone (tiny sampler settings)


@pytest.fixture(scope="module")
def shapes():
    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights absent")
    return ev.load_backbone_for(_meta())


@pytest.fixture(scope="module")
def records():
    from xlard.shapes import prompts as P

    pool = P.make_splits(P.PromptConfig(), seed=0)["heldout"]
    return P.sample_records(pool, 6, seed=0)  # one record per tag


@needs_shapes
def test_zero_head_gives_corrected_equal_to_base(shapes, records, tmp_path):
    captured = []
    rows = [r for batch in ev.evaluate_pairs(shapes, _corrector(), _meta(), records, [(i, 0) for i in range(6)],
                                             batch_size=4, faithfulness_fraction=0.2,
                                             on_images=lambda rows, b, c, lam: captured.append((b, c, lam)))
            for r in batch]
    assert [(r.index, r.seed) for r in rows] == [(i, 0) for i in range(6)]
    for b, c, lam in captured:
        assert torch.equal(b, c) and not lam.any()
    assert all(r.base_correct == r.corrected_correct == r.masked_correct == r.random_correct for r in rows)
    assert all(r.lam_mass == 0.0 and r.actions == [] for r in rows)
    assert ev.PairRow.from_dict({k: v for k, v in rows[0].to_dict().items() if k != "actions"}).actions == []
    report = ev.build_report(rows, num_resamples=200)
    table = report["table"]
    # one record per tag: no interval (a single cluster), and so none for the overall row
    assert all(v["diff"] == 0 and math.isnan(v["ci_low"]) and math.isnan(v["ci_high"]) for v in table.values())
    # no gain: the shares of it lost are undefined (NaN), written to eval.json as null (strict JSON)
    assert math.isnan(report["faithfulness"]["share_lost_top"])
    ev._write_json(tmp_path / "eval.json", report)

    def strict(name):
        raise ValueError(f"not strict JSON: {name}")

    written = json.loads((tmp_path / "eval.json").read_text(), parse_constant=strict)
    assert written["faithfulness"]["share_lost_top"] is None
    assert "n/a (no gain" in ev.format_markdown(written)  # what xlard demo prints from the file


@needs_shapes
def test_random_control_cells_do_not_depend_on_the_batch(shapes, records, monkeypatch):
    """Each pair's random cells come from its own stream, seeded by its image seed: the same for --batch 1
    and --batch 4 (one generator per batch, seeded by its first pair, gave other cells to 7 pairs in 96)."""
    import xlard.explain

    real = xlard.explain.faithfulness
    draws = {}

    def spy(reward_fn, z0, delta, alpha, **kwargs):
        gens = kwargs["generator"]
        assert isinstance(gens, list) and len(gens) == z0.shape[0]
        for g in gens:
            copy = torch.Generator().set_state(g.get_state())
            draws.setdefault(batch_size, []).append((g.initial_seed(), torch.rand(16, generator=copy)))
        return real(reward_fn, z0, delta, alpha, **kwargs)

    monkeypatch.setattr(xlard.explain, "faithfulness", spy)
    pairs = [(i, s) for s in (0, 1) for i in range(3)]
    for batch_size in (1, 4):
        rows = [r for batch in ev.evaluate_pairs(shapes, _corrector(head_std=0.5), _meta(), records[:3], pairs,
                                                 batch_size=batch_size, faithfulness_fraction=0.2) for r in batch]
        assert len(rows) == 6
    one, four = dict(draws[1]), dict(draws[4])
    from xlard.train.rollout import derived_generator

    want = sorted(derived_generator(ev.image_seed(s, i), "lam-control").initial_seed() for i, s in pairs)
    assert sorted(one) == sorted(four) == want
    for seed in one:
        assert torch.equal(one[seed], four[seed])


@needs_shapes
def test_the_random_control_does_not_reuse_the_image_noise_stream(shapes, records, monkeypatch):
    """Seeded with the image seed itself, the control's uniforms were the ones behind channel 0's initial noise:
    the "random" cells were those where that noise was large."""
    import xlard.explain

    real, seen = xlard.explain.faithfulness, []

    def spy(reward_fn, z0, delta, alpha, **kwargs):
        seen.extend(g.initial_seed() for g in kwargs["generator"])
        return real(reward_fn, z0, delta, alpha, **kwargs)

    monkeypatch.setattr(xlard.explain, "faithfulness", spy)
    pairs = [(i, 0) for i in range(3)]
    list(ev.evaluate_pairs(shapes, _corrector(head_std=0.5), _meta(), records[:3], pairs, batch_size=3,
                           faithfulness_fraction=0.2))
    images = [ev.image_seed(s, i) for i, s in pairs]
    assert len(seen) == 3 and not set(seen) & set(images)


@needs_shapes
def test_run_evaluation_checks_its_seeds_before_the_folder_is_made(shapes, records, tmp_path):
    """seeds=3 failed with "'int' object is not iterable", "0,1" named image_seed, numpy ints reached run.json
    ("not JSON-serializable") and [2**70] wrote run.json before the generator refused it, so that a rerun with
    good seeds into that folder was refused as "another evaluation"; all named now, before anything is written."""
    out = tmp_path / "run"
    for seeds, match in ((3, "seeds must be a list of evaluation seeds .*got 3"), (None, "got None"),
                         ("0,1", r"got '0,1' \(parse_seeds reads '0,1'\)"),
                         ([2**70], r"seeds\[0\]: seed must be at most"),
                         ([0, -1], r"seeds\[1\]: seed must be a non-negative integer")):
        with pytest.raises(ValueError, match=match):
            ev.run_evaluation(shapes, _corrector(), _meta(), records[:1], seeds=seeds, out=out, quiet=True)
        assert not out.exists(), seeds
    report = ev.run_evaluation(shapes, _corrector(), _meta(), records[:1], seeds=np.arange(1), out=out, quiet=True,
                               num_resamples=40, faithfulness_fraction=None)
    assert json.loads((out / "run.json").read_text())["seeds"] == [0] and report["table"]
    # a damaged run.json is named (it was "Expecting value: line 1 column 1 (char 0)", or an AttributeError)
    for text, match in (("", r"out: .*run.json is not valid JSON"),
                        ("[]", r"run.json is not the run.json of a paired evaluation \(damaged or another's: list\)"),
                        # {} read as "holds another evaluation (different alpha, backbone, ...)"
                        ("{}", r"run.json is not the run.json of a paired evaluation \(damaged or another's: a JSON "
                               r"object without corrector_sha256, records_sha256, seeds\); remove the folder's")):
        (out / "run.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            ev.run_evaluation(shapes, _corrector(), _meta(), records[:1], seeds=[0], out=out, quiet=True,
                              num_resamples=40, faithfulness_fraction=None)


@needs_shapes
def test_paired_run_with_a_nonzero_head(shapes, records, tmp_path):
    corrector = _corrector(head_std=0.5)
    out = tmp_path / "run"
    report = ev.run_evaluation(shapes, corrector, _meta(), records, seeds=[0, 1], out=out, batch_size=4,
                               num_resamples=300, save_images=True, quiet=True, corrector_source="test")
    table = report["table"]
    assert list(table) == ["single_object", "two_object", "counting", "colors", "position", "color_attr",
                           "overall"]
    for tag, row in table.items():
        assert row["records"] == (6 if tag == "overall" else 1) and row["images"] == (12 if tag == "overall" else 2)
        assert row["prompts"] == (6 if tag == "overall" else 1)
        assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])  # one record per tag: no interval
        assert math.isclose(row["diff"], row["corrected"] - row["base"])
    assert report["lam_mass"] > 0
    assert report["faithfulness"] is not None
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {(r["index"], r["seed"]) for r in rows} == {(i, s) for i in range(6) for s in (0, 1)}
    assert _same(json.loads((out / "eval.json").read_text())["table"], table)  # NaN written as null

    def strict(name):  # JSON has no NaN: an undefined share (no gain) was written as a bare NaN
        raise ValueError(f"not strict JSON: {name}")

    for name in ("eval.json", "run.json", "pairs.jsonl"):
        for line in (out / name).read_text().splitlines() if name.endswith("l") else [(out / name).read_text()]:
            json.loads(line, parse_constant=strict)
    if report["faithfulness"]["share_lost_top"] is None or math.isnan(report["faithfulness"]["share_lost_top"]):
        assert json.loads((out / "eval.json").read_text())["faithfulness"]["share_lost_top"] is None
    md = (out / "eval.md").read_text()
    assert "| **overall** | 6 | 6 | 12 |" in md and "LAM faithfulness" in md and "excludes 0" in md
    # Same seeds, same records: the base images are what the backbone makes without a corrector.
    from xlard.explain import read_png

    base_png = read_png(out / "images" / "base" / "00003" / "samples" / "0001.png")
    state = shapes.encode([records[3]["prompt"]], seed=[ev.image_seed(1, 3)])
    plain = (shapes.decode(state).images[0].clamp(0, 1) * 255).round().to(torch.uint8)
    # Batched (4) vs alone (1): CPU kernels may sum in another order by batch size and thread
    # count, moving a few pixels by one level across a rounding edge; another seed or record
    # would change the whole image.
    diff = (base_png.int() - plain.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, (int(diff.max()), float((diff > 0).float().mean()))
    corrected_pngs = sorted((out / "images" / "corrected").glob("*/samples/*.png"))
    assert len(corrected_pngs) == 12 and len(list((out / "images" / "lam").glob("*.png"))) == 12
    assert any(not torch.equal(read_png(p), read_png(str(p).replace("corrected", "base"))) for p in corrected_pngs)

    # Resume: cut the last pair (and leave half a line), rerun: only that pair is generated again.
    lines = (out / "pairs.jsonl").read_text().splitlines()
    (out / "pairs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls = []
    encode = shapes.encode

    def counting_encode(prompts, seed=0):
        calls.append(len(prompts))
        return encode(prompts, seed=seed)

    shapes.encode = counting_encode
    try:
        again = ev.run_evaluation(shapes, corrector, _meta(), records, seeds=[0, 1], out=out, batch_size=4,
                                  num_resamples=300, save_images=True, quiet=True, corrector_source="test",
                                  log=lambda s: None)
    finally:
        del shapes.encode
    assert calls == [1]
    # (compared as JSON text: a share with no gain to divide is NaN, and NaN != NaN)
    assert _same(again["table"], report["table"])
    assert json.dumps(again["faithfulness"], sort_keys=True) == json.dumps(report["faithfulness"], sort_keys=True)
    # A damaged line in the middle is named with the fix: delete it and resume (that pair is judged again).
    lines = (out / "pairs.jsonl").read_text().splitlines()
    (out / "pairs.jsonl").write_text("\n".join([*lines[:2], lines[2][:15], *lines[3:]]) + "\n")
    kwargs = dict(seeds=[0, 1], out=out, batch_size=4, num_resamples=300, save_images=True, quiet=True,
                  corrector_source="test", log=lambda s: None)
    with pytest.raises(ValueError, match="pairs.jsonl: line 3 is not a pair row .*delete that line and rerun "
                                         "with --resume"):
        ev.run_evaluation(shapes, corrector, _meta(), records, **kwargs)
    (out / "pairs.jsonl").write_text("\n".join([*lines[:2], *lines[3:]]) + "\n")
    again = ev.run_evaluation(shapes, corrector, _meta(), records, **kwargs)
    assert _same(again["table"], report["table"])
    # Well-formed rows that are no pair of this run, or a pair judged twice, are named (a duplicate weighed its
    # pair twice in the table, a foreign seed failed with a KeyError after the whole evaluation had run).
    lines = (out / "pairs.jsonl").read_text().splitlines()
    third = json.loads(lines[2])
    for edit, match in (({}, rf"line {len(lines) + 1} is the pair \(record {third['index']}, seed {third['seed']}\) "
                              r"judged again \(line 3\)"),
                        ({"index": 99}, rf"line {len(lines) + 1} is a pair of record 99, but the prompts hold "
                                        rf"{len(records)} records"),
                        ({"seed": 7}, r"line \d+ is a pair of seed 7, which is not among --seeds \[0, 1\]"),
                        ({"prompt": "a photo of a cat"},
                         r"line \d+ is a pair of prompt 'a photo of a cat', but record"),
                        ({"index": "2"}, rf"line {len(lines) + 1} is not a pair row")):
        (out / "pairs.jsonl").write_text("\n".join([*lines, json.dumps({**third, **edit})]) + "\n")
        with pytest.raises(ValueError, match=r"pairs.jsonl: " + match + ".*delete that line and rerun"):
            ev.run_evaluation(shapes, corrector, _meta(), records, **kwargs)
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    # The same folder with other settings is refused, not mixed.
    with pytest.raises(ValueError, match=r"holds another evaluation \(different seeds: seeds: the folder's \[0, 1\], "
                                         r"now \[0\]\)"):
        ev.run_evaluation(shapes, corrector, _meta(), records, seeds=[0], out=out, save_images=True, quiet=True)
    with pytest.raises(ValueError, match="different corrector_sha256"):
        ev.run_evaluation(shapes, _corrector(), _meta(), records, seeds=[0, 1], out=out, save_images=True,
                          quiet=True)
    # The same weights with another config (here: inference under autocast) are another corrector too.
    import copy

    other = copy.deepcopy(corrector).set_autocast("bfloat16")
    with pytest.raises(ValueError, match="different corrector_sha256"):
        ev.run_evaluation(shapes, other, _meta(), records, seeds=[0, 1], out=out, save_images=True, quiet=True)
    with pytest.raises(ValueError, match="--mask-fraction"):
        ev.run_evaluation(shapes, corrector, _meta(), records, seeds=[0], out=tmp_path / "b",
                          faithfulness_fraction=1.5)
    # A record the backbone cannot use is named before the folder is made (not at its batch, after others).
    long = dict(records[0], prompt="a photo of a square" + " and a red circle" * 12)
    with pytest.raises(ValueError, match=r"^record 2: prompt 'a photo of a square.*falls beyond the 16-token"):
        ev.run_evaluation(shapes, corrector, _meta(), [*records[:2], long], seeds=[0], out=tmp_path / "c",
                          quiet=True)
    assert not (tmp_path / "c").exists()
    # Records that are not GenEval records are named (were a KeyError or TypeError from inside).
    for bad, pattern in [({"tag": "counting"}, "missing the key 'include'"), ("x", "must be a JSON object")]:
        with pytest.raises(ValueError, match=rf"run_evaluation: records: record 0: .*{pattern}"):
            ev.run_evaluation(shapes, corrector, _meta(), [bad], seeds=[0], out=tmp_path / "d", quiet=True)
    assert not (tmp_path / "d").exists()


@needs_shapes
def test_cli_eval_and_generate_with_a_corrector(tmp_path, records, capsys):
    from xlard.shapes import prompts as P

    corrector_dir = ev.save_corrector_dir(tmp_path / "corr", _corrector(head_std=0.5), _meta())
    prompts = tmp_path / "p.jsonl"
    P.write_jsonl(prompts, records[:3])
    out = tmp_path / "eval"
    assert cli.main(["eval", "--prompts", str(prompts), "--corrector", str(corrector_dir), "--seeds", "0,1",
                     "--out", str(out), "--bootstrap", "200", "--no-faithfulness", "--json",
                     str(tmp_path / "r.json"), "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| **overall** | 3 | 3 | 6 |" in printed and "LAM faithfulness" not in printed
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["seeds"] == [0, 1]
    assert "note:" not in captured.err  # held-out records
    # Training-split records are scored too, with a note that the table is no held-out measurement.
    train_prompts = tmp_path / "t.jsonl"
    P.write_jsonl(train_prompts, P.sample_records(P.make_splits()["train"], 2, seed=0) + records[:1])
    assert cli.main(["eval", "--prompts", str(train_prompts), "--corrector", str(corrector_dir), "--out",
                     str(tmp_path / "eval-t"), "--bootstrap", "50", "--no-faithfulness", "--quiet"]) == 0
    assert "note: 2 of 3 records of " in capsys.readouterr().err

    gen = tmp_path / "gen"
    assert cli.main(["generate", "a photo of three red circles", "--backbone", "shapes", "--corrector",
                     str(corrector_dir), "--out", str(gen), "--seed", "4", "--quiet"]) == 0
    assert sorted(p.name for p in gen.iterdir()) == ["0000_seed4.png", "0000_seed4_base.png", "0000_seed4_lam.png",
                                                     "corrections.jsonl", "xlard-run.json"]
    line, = (gen / "corrections.jsonl").read_text().splitlines()
    assert json.loads(line) == {"image": "0000_seed4.png", "prompt": "a photo of three red circles", "seed": 4,
                                "actions": []}  # a corrector without rules: only its residual acts
    (tmp_path / "gen2" / "corrections.jsonl").mkdir(parents=True)  # a folder where the actions file goes
    assert cli.main(["generate", "a photo of a circle", "--backbone", "shapes", "--corrector", str(corrector_dir),
                     "--out", str(tmp_path / "gen2"), "--quiet"]) == 2
    assert "corrections.jsonl has the name of one of this command's outputs but is not a file" in \
        capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "gen2").iterdir()) == ["corrections.jsonl"]  # nothing generated
    assert cli.main(["generate", "a photo of a circle", "--backbone", "shapes", "--corrector",
                     str(corrector_dir), "--out", str(gen), "--quiet"]) == 2  # an earlier run is not overwritten
    assert "add --overwrite to replace them, --resume to continue that run" in capsys.readouterr().err
    assert cli.main(["generate", "a photo of a circle", "--backbone", "shapes", "--corrector", str(corrector_dir),
                     "--out", str(gen), "--overwrite", "--per-prompt", "2", "--batch", "1"]) == 0
    assert "0001_seed1.png: residual only" in capsys.readouterr().out
    lines = [json.loads(line) for line in (gen / "corrections.jsonl").read_text().splitlines()]
    assert [(d["image"], d["prompt"]) for d in lines] == [("0000_seed0.png", "a photo of a circle"),
                                                          ("0001_seed1.png", "a photo of a circle")]

    # Errors: a corrector trained for other sampler settings, a folder without metadata, no shipped corrector.
    assert cli.main(["eval", "--prompts", str(prompts), "--corrector", str(corrector_dir), "--steps", "20",
                     "--out", str(tmp_path / "e2"), "--quiet"]) == 2
    assert "num_inference_steps: corrector trained at 2, backbone runs 20" in capsys.readouterr().err
    plain = _corrector().save_pretrained(tmp_path / "plain")
    assert cli.main(["eval", "--prompts", str(prompts), "--corrector", str(plain), "--quiet"]) == 2
    assert "has no xlard_corrector.json" in capsys.readouterr().err
    if not (ev._SHIPPED["shapes"] / ev.CORRECTOR_META_NAME).is_file():
        assert cli.main(["generate", "a photo of a red circle", "--backbone", "shapes", "--correct",
                         "--out", str(tmp_path / "g2")]) == 2
        assert "shipped shapes corrector is not installed" in capsys.readouterr().err


@needs_shapes
def test_generate_with_a_corrector_appends_each_batchs_lines_and_resumes(tmp_path, capsys, monkeypatch):
    """corrections.jsonl was rewritten whole after every batch (its cost grew with the square of the image count);
    each batch's lines are appended and synced now: an interrupted run keeps the lines of the images it wrote, a
    --resume makes the rest, and the final file is sorted and equal to an uninterrupted run's."""
    import xlard.explain

    corrector_dir = ev.save_corrector_dir(tmp_path / "corr", _corrector(head_std=0.5), _meta())
    argv = ["generate", "a photo of a circle", "a photo of two squares", "a photo of a red triangle", "--backbone",
            "shapes", "--corrector", str(corrector_dir), "--batch", "1", "--quiet"]
    assert cli.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "corrections.jsonl").read_text()
    assert [json.loads(line)["image"] for line in whole.splitlines()] == [
        "0000_seed0.png", "0001_seed1.png", "0002_seed2.png"]
    saved, calls = xlard.explain.save_png, []

    def interrupted(path, image):
        calls.append(path)
        if len(calls) == 4:  # the second batch's first image
            raise KeyboardInterrupt
        return saved(path, image)

    monkeypatch.setattr(xlard.explain, "save_png", interrupted)
    out = tmp_path / "cut"
    assert cli.main([*argv, "--out", str(out)]) == 130
    kept = (out / "corrections.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in kept] == ["0000_seed0.png"]
    monkeypatch.setattr(xlard.explain, "save_png", saved)
    with open(out / "corrections.jsonl", "a") as f:  # damaged rows naming no file: skipped (a list was a TypeError)
        f.write('{"image": ["0001_seed1.png"]}\n{"image": {"a": 1}}\n{"image": null}\n')
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    assert (out / "corrections.jsonl").read_text() == whole
    capsys.readouterr()


@needs_shapes
def test_the_shipped_shapes_corrector_is_installed_fits_and_corrects(tmp_path, capsys):
    """The corrector in package data: within the 20 MB budget, fits the shapes backbone, used by --correct."""
    folder = ev.shipped_corrector_path("shapes")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 20 * 1024 * 1024
    corrector, meta = ev.load_corrector_dir(folder)
    assert meta.backbone == "shapes"
    assert meta.training["reward_source"] == "shapes"  # trained on the understanding model, not the evaluator
    assert corrector.config.reader and corrector.config.reader_move  # the recipe of configs/shapes_shipped.yaml
    assert (folder / "README.md").is_file()
    backbone = ev.load_backbone_for(meta, corrector=corrector)  # runs check_corrector_fits
    state = backbone.encode(["a photo of three red circles"], seed=[0])
    from xlard.models import corrector_inputs

    with torch.no_grad():  # its own inputs: the parsed fields' tokens for a conditioning: fields corrector
        delta = corrector(state.z0, **corrector_inputs(corrector, state.prompt_embedding, state.specs))
    assert torch.isfinite(delta).all() and float(delta.abs().max()) > 0  # a trained corrector acts
    relation = backbone.encode(["a photo of a circle left of a square"], seed=[0])
    inputs = corrector_inputs(corrector, relation.prompt_embedding, relation.specs)
    n = relation.z0.shape[-2] * relation.z0.shape[-1]
    assert not torch.equal(corrector.sources(relation.z0, **inputs)[0], torch.arange(n))  # its objects are moved
    assert corrector.config.count_edit and not corrector.config.count_move
    from xlard.shapes.latent_eyes import LatentCountEyes
    from xlard.shapes.understanding import CountEyes
    counting = backbone.encode(["a photo of five circles", "a photo of five circles", "a photo of a circle"],
                               seed=[0, 1, 0])
    inputs = corrector_inputs(corrector, counting.prompt_embedding, counting.specs)
    with torch.no_grad():
        corrected = counting.z0 + corrector(counting.z0, **inputs)
    assert isinstance(corrector._count_eyes(), LatentCountEyes)  # the shipped count edit reads the latent itself
    assert corrector.eyes is None  # the default eyes, loaded on use, are not attached: the fit check applies
    from xlard import ops as xops
    from xlard.models import COUNT_MOVE_MIN_AREA
    eyes = CountEyes(corrector.config.reader_nouns)  # counted by the teacher on the decoding, not by the editor's eyes

    def circles(z):  # objects the understanding model finds on the decoded latent, and how many are circles
        probs, foreground = eyes(z)
        labels, _ = xops.label_components(foreground[:, None].contiguous(), threshold=0.5, mode="absolute",
                                          min_area=COUNT_MOVE_MIN_AREA, connectivity=8)
        found = []
        for i in range(z.shape[0]):
            parts = [labels[i, 0] == k for k in range(1, int(labels[i].max()) + 1)]
            parts = [m for m in parts if int(m.sum()) >= COUNT_MOVE_MIN_AREA]
            found.append((len(parts), sum(int(probs[i][:, m].sum(1).argmax()) == 0 for m in parts)))
        return found

    # Seed 1's five circles are not five to the understanding model; redrawn, both samples hold five circles.
    assert circles(counting.z0[:2])[1] != (5, 5)
    assert circles(corrected[:2]) == [(5, 5), (5, 5)]
    # The redraw writes only where the edit touched; a prompt without a count is not edited.
    import dataclasses

    plain = type(corrector)(dataclasses.replace(corrector.config, count_edit=False))
    plain.load_state_dict(corrector.state_dict())
    with torch.no_grad():
        rest = counting.z0 + plain(counting.z0, **inputs)
    assert torch.equal(corrected[2], rest[2]) and not torch.equal(corrected[1], rest[1])
    assert (corrected[1] == rest[1]).all(dim=0).any()  # cells far from every object keep the residual's value
    # What the rules did, per latent: the count edit's redraw of the counting prompts, the relation move's cells.
    with torch.no_grad():
        again, actions = corrector.actions(counting.z0, **inputs)
    torch.testing.assert_close(again, corrected - counting.z0)
    assert any(a.startswith("added 1 circle") for a in actions[1]) and actions[2] == []
    assert all(any(a.startswith("redrew") for a in acts) for acts in actions[:2])
    _, moved = corrector.actions(relation.z0, **corrector_inputs(corrector, relation.prompt_embedding,
                                                                 relation.specs))
    n_moved = int((corrector.sources(relation.z0, **corrector_inputs(corrector, relation.prompt_embedding,
                                                                     relation.specs))[0] != torch.arange(n)).sum())
    assert n_moved > 1 and moved == [[f"moved {n_moved} latent cells"]]  # what sources() says was copied
    out = tmp_path / "gen"
    assert cli.main(["generate", "a photo of five circles", "--backbone", "shapes", "--correct", "--seed", "1",
                     "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000_seed1.png", "0000_seed1_base.png", "0000_seed1_lam.png",
                                                     "corrections.jsonl", "xlard-run.json"]
    assert "0000_seed1.png: redrew" in capsys.readouterr().out
    assert json.loads((out / "corrections.jsonl").read_text())["actions"] == actions[1]


@needs_shapes
def test_generate_interrupted_keeps_the_actions_of_the_images_it_wrote(tmp_path, monkeypatch, capsys):
    import xlard.explain

    corrector_dir = ev.save_corrector_dir(tmp_path / "corr", _corrector(head_std=0.5), _meta())
    real, calls = xlard.explain.save_png, []

    def save_then_stop(path, image):  # Ctrl-C while the second batch is written
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, image)

    monkeypatch.setattr(xlard.explain, "save_png", save_then_stop)
    out = tmp_path / "gen"
    assert cli.main(["generate", "a photo of a circle", "--backbone", "shapes", "--corrector", str(corrector_dir),
                     "--out", str(out), "--per-prompt", "3", "--batch", "1", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "corrections.jsonl").read_text().splitlines()]
    assert [d["image"] for d in lines] == ["0000_seed0.png"]  # the first batch's image, complete
    # --resume makes the rest: the interrupted image (its corrected file was written, its companions not) and the
    # third; the first is reused, byte for byte, and the log is whole again, in image order.
    monkeypatch.setattr(xlard.explain, "save_png", real)
    first = (out / "0000_seed0.png").read_bytes()
    argv = ["generate", "a photo of a circle", "--backbone", "shapes", "--corrector", str(corrector_dir), "--out",
            str(out), "--per-prompt", "3", "--quiet"]
    assert cli.main(argv) == 2 and "--resume to continue that run" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "reusing 1 of 3 images" in captured.err and "wrote 2 corrected images" in captured.out
    assert "(1 reused)" in captured.out and (out / "0000_seed0.png").read_bytes() == first
    lines = [json.loads(line) for line in (out / "corrections.jsonl").read_text().splitlines()]
    assert [d["image"] for d in lines] == ["0000_seed0.png", "0001_seed1.png", "0002_seed2.png"]
    assert all((out / f"{d['image'][:-4]}{end}.png").is_file() for d in lines for end in ("", "_base", "_lam"))
    assert json.loads((out / "xlard-run.json").read_text())["complete"] is True
    # Other settings (here the corrector's weights) are not resumed into.
    other = ev.save_corrector_dir(tmp_path / "corr2", _corrector(head_std=0.7), _meta())
    assert cli.main(argv[:5] + [str(other)] + argv[6:] + ["--resume"]) == 2
    assert "differ: corrector_sha256" in capsys.readouterr().err


def test_a_run_of_a_user_backbone_resumes_with_another_instance_of_it(shapes, records, tmp_path):
    """run.json held repr(backbone): for a Backbone subclass without its own repr, a memory address, so a new
    process (a new instance) was refused as 'another evaluation (different backbone)'."""
    from xlard.backbones import Backbone

    class Mine(Backbone):  # a user's backbone, delegating to the shapes one
        latent_channels = property(lambda self: shapes.latent_channels)
        text_dim = property(lambda self: shapes.text_dim)
        pooled_dim = property(lambda self: shapes.pooled_dim)
        correction_step, num_inference_steps, guidance_scale = STEP, STEPS, GUIDANCE

        def encode(self, prompts, seed=0):
            return shapes.encode(prompts, seed)

        def decode(self, state, z=None):
            return shapes.decode(state, z)

    kwargs = dict(seeds=[0], out=tmp_path / "e", quiet=True, faithfulness_fraction=None, num_resamples=40)
    first = ev.run_evaluation(Mine(), _corrector(), _meta(), records[:2], **kwargs)
    again = ev.run_evaluation(Mine(), _corrector(), _meta(), records[:2], **kwargs)
    assert _same(again["table"], first["table"])
    stored = json.loads((tmp_path / "e" / "run.json").read_text())["backbone"]
    assert stored.endswith("Mine") and "0x" not in stored
    assert ev._backbone_identity(shapes) == repr(shapes)  # a backbone with its own repr keeps it
    assert ev._backbone_source(shapes) == "shapes" and ev._backbone_source(Mine()) is None


def test_the_run_records_which_model_it_ran(tmp_path, monkeypatch):
    """Two models of one pipeline class had one identity in run.json: a paired run resumed on the other model mixed
    both models' pairs in one table. The folder (or hub id) is recorded beside it; a folder from before, without
    it, still resumes."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_pipelines as TP

    from xlard.backbones import DiffusersBackbone

    a = DiffusersBackbone.from_pretrained(str(TP.tiny_sd_pipeline(tmp_path / "a")), num_inference_steps=2)
    b = DiffusersBackbone.from_pretrained(str(TP.tiny_sd_pipeline(tmp_path / "b")), num_inference_steps=2)
    assert repr(a) == repr(b) and ev._backbone_source(a) != ev._backbone_source(b)
    monkeypatch.chdir(tmp_path)
    relative = DiffusersBackbone.from_pretrained("a", num_inference_steps=2)
    assert ev._backbone_source(relative) == ev._backbone_source(a) == str((tmp_path / "a").resolve())
    (tmp_path / "shapes").mkdir()  # a ./shapes folder: "shapes" still names the shapes world's own backbone
    assert ev.other_world_note("shapes") is None
    if shapes_backbone.is_available():  # the shipped corrector failed there: "shapes has no model_index.json"
        assert ev._backbone_source(ev.load_backbone_for(_meta())) == "shapes"
        import shutil

        copy = tmp_path / "retrained"  # what $XLARD_SHAPES_BACKBONE may name: another model, not "shapes"
        shutil.copytree(shapes_backbone.DEFAULT_PATH, copy)
        monkeypatch.setenv("XLARD_SHAPES_BACKBONE", str(copy))
        assert ev._backbone_source(ev.load_backbone_for(_meta())) == str(copy.resolve())


def test_a_paired_run_that_cannot_append_its_pairs_names_the_file(shapes, records, tmp_path, monkeypatch):
    """A full disk or size limit at the pairs.jsonl append was "[Errno 27] File too large", naming no file (and a
    buffered file raised it again when closed). The pairs judged before stay; --resume finishes the run."""
    import errno

    kwargs = dict(seeds=[0], out=tmp_path / "e", quiet=True, faithfulness_fraction=None, num_resamples=40,
                  batch_size=1)
    real_write, appends = os.write, []

    def limited_write(fd, data):
        if b'"base_correct"' in bytes(data):
            appends.append(fd)
            if len(appends) == 2:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", limited_write)
    with pytest.raises(OSError, match=r"^--out: cannot write .*pairs\.jsonl: File too large \(the pairs judged "
                                      r"before are kept: rerun with --resume") as e:
        ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)
    assert e.value.errno == errno.EFBIG
    monkeypatch.undo()
    pairs = tmp_path / "e" / "pairs.jsonl"
    assert len(pairs.read_text().splitlines()) == 1
    # the first batch's line cut by the limit: the resume appended after the fragment, and the next resume
    # found "line 1 is not a pair row"
    pairs.write_text(pairs.read_text()[:30])
    done = ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)
    assert done["table"]["overall"]["images"] == 2
    again = ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)
    assert _same(again["table"], done["table"]) and len(pairs.read_text().splitlines()) == 2


def test_a_paired_run_resumes_only_on_the_model_it_ran(shapes, records, tmp_path):
    kwargs = dict(seeds=[0], out=tmp_path / "e", quiet=True, faithfulness_fraction=None, num_resamples=40)
    first = ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)
    run = tmp_path / "e" / "run.json"
    stored = json.loads(run.read_text())
    assert stored["backbone_source"] == "shapes"
    stored["backbone_source"] = "/somewhere/else"
    run.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"different backbone_source: backbone_source: the folder's "
                                         r"\"/somewhere/else\", now \"shapes\""):
        ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)
    del stored["backbone_source"]  # written before the key existed
    run.write_text(json.dumps(stored))
    assert _same(ev.run_evaluation(shapes, _corrector(), _meta(), records[:2], **kwargs)["table"], first["table"])


def test_saved_images_of_an_unfinished_paired_run_are_refused_by_eval_folder(shapes, records, tmp_path, monkeypatch,
                                                                              capsys):
    """images/base and images/corrected are GenEval folders; an interrupted run's held part of the records and
    `xlard eval --folder` scored them as if complete."""
    from xlard import cli

    real = ev.evaluate_pairs

    def stop_after_first_batch(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            if k:
                raise KeyboardInterrupt
            yield batch

    out = tmp_path / "e"
    kwargs = dict(seeds=[0], out=out, batch_size=1, quiet=True, faithfulness_fraction=None, num_resamples=40,
                  save_images=True)
    monkeypatch.setattr(ev, "evaluate_pairs", stop_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        ev.run_evaluation(shapes, _corrector(), _meta(), records[:3], **kwargs)
    for kind in ("base", "corrected"):
        assert cli.main(["eval", "--folder", str(out / "images" / kind)]) == 2
        assert "holds an unfinished `xlard eval (with a corrector)` run" in capsys.readouterr().err
    monkeypatch.setattr(ev, "evaluate_pairs", real)
    ev.run_evaluation(shapes, _corrector(), _meta(), records[:3], **kwargs)  # resumed to the end
    assert cli.main(["eval", "--folder", str(out / "images" / "base"), "--quiet"]) == 0
    total = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("overall ")]
    assert total and total[0][2] == "3"  # every record's image scored


def test_the_report_counts_each_rows_distinct_prompts():
    """Intervals resample records, conditional on their prompts; a tag may repeat a few prompts over many
    records (held-out single_object: 84 records, 1 prompt), which the report must show beside the interval."""
    rows = [ev.PairRow(i, s, "counting" if i < 6 else "colors", f"p{i % 2}" if i < 6 else f"q{i}", False, i % 2 == 0,
                       "", "", 0.0) for i in range(9) for s in (0, 1)]
    report = ev.build_report(rows, num_resamples=200)
    assert report["table"]["counting"]["prompts"] == 2 and report["table"]["counting"]["records"] == 6
    assert report["table"]["colors"]["prompts"] == 3 and report["table"]["overall"]["prompts"] == 5
    text = ev.format_markdown(report)
    assert "| tag | records | prompts | images |" in text and "| counting | 6 | 2 | 12 |" in text
    assert "conditional on the records' prompts" in text



def test_corrector_meta_records_the_sampler_and_reads_folders_without_it():
    meta = _meta()
    assert meta.sampler == {} and "sampler" not in meta.to_dict()  # folders and stored evaluations read as before
    assert ev.CorrectorMeta.from_dict(meta.to_dict()).sampler == {}
    old = meta.to_dict()  # as a folder written before the field: no "sampler" key
    assert ev.CorrectorMeta.from_dict(old).sampler == {}
    full = ev.CorrectorMeta("f", STEP, 1.0, STEPS, GUIDANCE, sampler={"pipeline": "FluxPipeline", "height": 32,
                                                                        "width": 32, "max_sequence_length": 32,
                                                                        "negative_prompt": None})
    assert ev.CorrectorMeta.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    for bad, pattern in (({"heigth": 32}, "unknown keys"), ({"height": 0}, "sampler.height must be a positive"),
                         ({"pipeline": 3}, "sampler.pipeline must be a string"), ([], "sampler must be a dict"),
                         ({"revision": 3}, "sampler.revision must be a string")):
        with pytest.raises(ValueError, match=pattern):
            ev.CorrectorMeta("f", STEP, 1.0, STEPS, GUIDANCE, sampler=bad)


def test_a_corrector_trained_on_a_hub_revision_loads_that_revision(monkeypatch):
    """backbone.options.revision was lost at export: eval and generate --corrector ran on the id's main branch."""
    from xlard.backbones import DiffusersBackbone

    seen = []

    def loading(name, **kwargs):
        seen.append((name, kwargs.get("revision")))
        raise OSError("stop here")

    monkeypatch.setattr(DiffusersBackbone, "from_pretrained", loading)
    meta = ev.CorrectorMeta("org/model", STEP, 1.0, STEPS, GUIDANCE, sampler={"revision": "v2"})
    assert ev.CorrectorMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    with pytest.raises(ValueError, match=r"at revision v2.*hf download org/model --revision v2"):
        ev.load_backbone_for(meta)
    with pytest.raises(ValueError):  # another id given as the backbone: its own main, not the corrector's revision
        ev.load_backbone_for(meta, backbone="other/finetune")
    assert seen == [("org/model", "v2"), ("other/finetune", None)]


def test_a_corrector_is_refused_on_another_pipeline_size_or_text_length():
    """A FLUX corrector trained at 32 x 32 with 32 text tokens ran at 256 x 256 with 512, and one trained on
    StableDiffusionPipeline ran on PixArt, both without a word."""
    family = SimpleNamespace(vae_scale_factor=4, max_sequence_length=32)
    backbone = SimpleNamespace(latent_channels=8, text_dim=64, pooled_dim=64, correction_step=STEP,
                               num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                               family=family, pipeline=SimpleNamespace(), negative_prompt=None)
    recorded = {"pipeline": "SimpleNamespace", "height": 64, "width": 64, "max_sequence_length": 32,
                "negative_prompt": None}
    meta = ev.CorrectorMeta("x", STEP, 1.0, STEPS, GUIDANCE, sampler=recorded)
    ev.check_corrector_fits(_corrector(), meta, backbone)
    for change, pattern in ((dict(pipeline="PixArtAlphaPipeline"), "pipeline: corrector trained with "
                                                                   "'PixArtAlphaPipeline', backbone runs"),
                            (dict(height=32), "image height: corrector trained with 32, backbone runs 64"),
                            (dict(max_sequence_length=512), r"text length \(max_sequence_length\): corrector "
                                                            r"trained with 512, backbone runs 32"),
                            (dict(negative_prompt="blurry"), "negative prompt")):
        other = ev.CorrectorMeta("x", STEP, 1.0, STEPS, GUIDANCE, sampler={**recorded, **change})
        with pytest.raises(ValueError, match=pattern):
            ev.check_corrector_fits(_corrector(), other, backbone)


@needs_shapes
def test_the_demo_report_shows_the_change_applied(shapes, records, tmp_path):
    """The demo's report cards took the LAM of Delta and the corrector's actions as they were: at alpha 0 a bright LAM
    and "removed ..." over an image that did not change."""
    import types

    from xlard import demo
    from xlard.train.rewarding import build_reward_fn

    cfg = demo.demo_config(tmp_path / "train", 0, 1)
    reward_fn = build_reward_fn(cfg.reward, shapes)
    row = types.SimpleNamespace(index=0, seed=0, tag=records[0]["tag"], base_correct=False, corrected_correct=False)
    items = demo._report_items(shapes, _corrector(head_std=0.5), _meta(alpha=0.0), reward_fn, records[:1], [row])
    assert torch.equal(items[0].before, items[0].after) and float(items[0].lam.abs().max()) == 0.0
    assert "nothing applied (alpha 0)" in items[0].label


def test_a_schnell_folder_names_whose_guidance_it_cannot_take(tmp_path):
    """A FLUX-dev corrector's guidance 5.0 on a schnell-kind folder read "guidance_scale: ... got 5.0", as if the
    caller had given it; it is the corrector's (a CorrectorMismatch, which the command line names --corrector).
    A FLUX corrector that recorded a negative prompt (ignored then; refused now) still loads."""
    import tiny_pipelines

    folder = str(tiny_pipelines.tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False))
    meta = _meta(backbone=folder, guidance_scale=5.0, num_inference_steps=1, sampler={"height": 32, "width": 32})
    with pytest.raises(ev.CorrectorMismatch, match=r"^the corrector was sampled with guidance_scale 5.0, which this "
                                                   r"backbone cannot take: this FluxPipeline has no guidance"):
        ev.load_backbone_for(meta)
    with pytest.raises(ValueError, match=r"^guidance_scale: this FluxPipeline") as e:  # the caller's own: as it is
        ev.load_backbone_for(meta, guidance_scale=3.0)
    assert not isinstance(e.value, ev.CorrectorMismatch)
    import argparse

    args = argparse.Namespace(backbone=None, device=None, steps=None, guidance=3.0, dtype=None)
    with pytest.raises(ValueError, match=r"^--guidance: this FluxPipeline has no guidance embedding"):
        ev._backbone_from_args(args, None, meta)  # xlard eval/demo --guidance 3 (it said "guidance_scale:")
    meta = _meta(backbone=folder, guidance_scale=0.0, num_inference_steps=1,
                 sampler={"height": 32, "width": 32, "negative_prompt": "blurry"})
    loaded = ev.load_backbone_for(meta)
    assert loaded.negative_prompt is None
    corrector = ResidualCorrector(loaded.corrector_config("tiny"))
    ev.check_corrector_fits(corrector, meta, loaded)  # the ignored negative prompt is no mismatch


def test_pair_rows_of_the_wrong_type_are_named_before_any_pair_is_judged(tmp_path):
    """Only index and seed were type-checked: a hand-edited "lam_mass": "0.5", "actions": null or
    "base_correct": "no" crashed (or failed naming no file) in the report, after the remaining pairs had been
    judged; a byte that is not UTF-8 named neither file nor line."""
    good = ev.PairRow(index=0, seed=0, tag="counting", prompt="a photo of two circles", base_correct=True,
                      corrected_correct=False, base_reason="ok", corrected_reason="found 1", lam_mass=0.25,
                      masked_correct=None, random_correct=None, actions=["added 1 circle(s)"]).to_dict()
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert ev._read_rows(path)[0].to_dict() == good
    nan = dict(good, lam_mass=None)  # a NaN mass is written as null
    path.write_text(json.dumps(nan) + "\n")
    assert math.isnan(ev._read_rows(path)[0].lam_mass)
    for key, value, why in (("lam_mass", "0.5", "lam_mass must be a number"),
                            ("lam_mass", True, "lam_mass must be a number"),
                            ("actions", None, "actions must be a list of strings"),
                            ("actions", [1], "actions must be a list of strings"),
                            ("base_correct", "no", "base_correct must be true or false"),
                            ("corrected_correct", 1, "corrected_correct must be true or false"),
                            ("masked_correct", [], "masked_correct must be true or false"),
                            ("tag", 3, "tag must be a string"),
                            ("seed", 1.0, "seed must be an integer")):
        path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, **{key: value})) + "\n" + json.dumps(good)
                        + "\n")
        with pytest.raises(ValueError, match=re.escape(f"line 2 is not a pair row ({why}) (the file was edited")):
            ev._read_rows(path)
    path.write_bytes(json.dumps(good).encode() + b"\n" + json.dumps(good).encode().replace(b"circles", b"\xffx")
                     + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 is not UTF-8 text")):
        ev._read_rows(path)
    path.write_text(json.dumps(good) + "\n[1, 2]\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a pair row"):
        ev._read_rows(path)


def test_an_overall_bound_of_rounding_noise_is_zero():
    """Overall replicates are means over tags of differences of fractions: one that is 0 in exact arithmetic came out
    as -1.8e-17 or 2.8e-17, and '[+0.0, +64.3] | yes' called a gain significant whose interval touches 0."""
    rng = np.random.default_rng(0)
    noisy = 0
    for _ in range(400):
        n1, n2 = rng.integers(2, 12, 2)
        tags = ["colors"] * n1 + ["counting"] * n2
        b = rng.integers(0, 2, n1 + n2).astype(float)
        c = np.where(rng.random(n1 + n2) < 0.5, 1 - b, b)
        o = ev.paired_table(tags, b, c, num_resamples=200)["overall"]
        assert not (0 < abs(o.ci_low) < 1e-12 or 0 < abs(o.ci_high) < 1e-12), (o.ci_low, o.ci_high)
        noisy += o.ci_low == 0.0 or o.ci_high == 0.0
    assert noisy  # bounds of exactly 0 happen here: the snapped ones
    # a case the code before gave as [-2.8e-17, 0.667]
    o = ev.paired_table(["colors"] * 3 + ["counting"] * 6, [0, 0, 0, 0, 0, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0, 1, 0, 0],
                        num_resamples=2000)["overall"]
    assert o.ci_low == 0.0 and o.ci_high == pytest.approx(2 / 3) and not o.excludes_zero
    # a real difference far below 1 (in a large score's units) is kept
    big = ev.paired_bootstrap([1e6] * 4 + [0.0] * 4, [1e6] * 4 + [1e-3] * 4, num_resamples=200)
    assert big.ci_high > 0


def test_too_few_resamples_for_the_interval_are_refused():
    """--bootstrap 1 gave one replicate as the '95% interval' (not even around the estimate), labelled excludes 0."""
    assert ev.min_resamples(0.95) == 40 and ev.min_resamples(0.9) == 20 and ev.min_resamples(0.99) == 200
    # float error in 2 / (1 - c) gave one more for some confidences
    assert [ev.min_resamples(c) for c in (0.9996, 0.9998, 0.9999, 0.8, 0.999)] == [5000, 10000, 20000, 10, 2000]
    assert ev.min_resamples(0.97) == 67  # 66.67: one in each tail needs 67
    with pytest.raises(ValueError, match=r"num_resamples must be at least 40 for a 95% interval \(one replicate in "
                                         r"each tail\), got 5"):
        ev.paired_bootstrap([0, 0, 1], [1, 1, 1], num_resamples=5)
    with pytest.raises(ValueError, match=r"at least 200 for a 99% interval"):
        ev.paired_table(["colors"] * 3, [0, 0, 1], [1, 1, 1], num_resamples=100, confidence=0.99)
    assert ev.paired_bootstrap([0, 0, 1], [1, 1, 1], num_resamples=40).ci_low <= 1
    assert cli.MIN_BOOTSTRAP == ev.min_resamples(0.95)


def test_percentages_in_reports_keep_what_was_given():
    """A 0.975 interval was headed '98% interval', 0.999 '100%'; a mask fraction of 0.004 read 'top 0%'."""
    assert [ev.percent(x) for x in (0.95, 0.975, 0.999, 0.004, 0.125, 0.2)] == \
        ["95%", "97.5%", "99.9%", "0.4%", "12.5%", "20%"]
    rows = [ev.PairRow(i, 0, "colors", f"p{i}", i % 2 == 0, True, "", "", 1.0) for i in range(6)]
    text = ev.format_markdown(ev.build_report(rows, num_resamples=80, confidence=0.975))
    assert "| 97.5% interval |" in text


def test_build_report_refuses_a_pair_twice_and_a_record_of_two_prompts():
    """A pair judged twice weighed twice in its record's cluster (pairs.jsonl is checked, build_report was not)."""
    rows = [ev.PairRow(i, 0, "colors", f"p{i}", False, i < 2, "", "", 0.0) for i in range(10)]
    with pytest.raises(ValueError, match=r"build_report: rows 0 and 10 are the same pair \(record 0, seed 0\)"):
        ev.build_report(rows + [rows[0]])
    with pytest.raises(ValueError, match=r"build_report: rows 0 and 10 give record 0 two prompts \('p0' and "
                                         r"'another'\)"):
        ev.build_report(rows + [ev.PairRow(0, 1, "colors", "another", True, True, "", "", 0.0)])
    assert ev.build_report(rows + [ev.PairRow(0, 1, "colors", "p0", True, True, "", "", 0.0)])["pairs"] == 11


def test_paired_table_takes_tags_from_a_generator():
    """The type check consumed a generator: the lengths then read 'got 0, 2 and 2'."""
    t = ev.paired_table((tag for tag in ["colors", "colors"]), [0, 1], [1, 1], num_resamples=100)
    assert t["colors"].diff == 0.5
