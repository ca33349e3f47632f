"""scripts/validate_corrector.py: options, and a small run on the shipped shapes backbone whose
rows agree with what the backbone, the training reward and the exact evaluator give directly."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import validate_corrector as V  # noqa: E402

from xlard.shapes import backbone as shapes_backbone  # noqa: E402


def test_options_are_validated(capsys):
    args = V.parse_args(["--correct", "--multipliers", "2,0.5"])
    assert args.multipliers == [0.0, 0.5, 2.0] and args.per_tag == 64
    for bad in (["--correct", "--multipliers", "a,b"], ["--correct", "--multipliers", "-1"],
                ["--correct", "--per-tag", "0"], ["--correct", "--seed-base", "1000003"], [],
                ["--correct", "--corrector", "x"], ["--correct", "--multipliers", "1e300"],
                ["--correct", "--per-tag", "1000000000"], ["--corrector", __file__]):
        with pytest.raises(SystemExit) as e:
            V.parse_args(bad)
        assert e.value.code == 2
    assert "is a file; give a corrector folder" in capsys.readouterr().err
    for out in ("/proc/no/r.json", "."):  # checked before the validation runs, not when its report is written
        with pytest.raises(SystemExit):
            V.parse_args(["--correct", "--out", out])
        assert "--out: " in capsys.readouterr().err


def test_the_training_reward_comes_from_the_corrector_metadata():
    from xlard.evaluation import CorrectorMeta

    def meta(training):
        return CorrectorMeta(backbone="shapes", correction_step=0.6, alpha=1.0, num_inference_steps=20,
                             guidance_scale=5.0, training=training)

    got = V.training_reward_settings(meta({"reward_source": "shapes", "reward_options": {"count_confidence": False},
                                           "reward_bind_color": False}))
    # recorded before the weighed count (no soft_count): the count reward of then, here the integer count
    assert got == {"source": "shapes", "options": {"count_confidence": False, "soft_count": False},
                   "bind_color": False, "recorded": True}
    # recorded since: as recorded
    got = V.training_reward_settings(meta({"reward_source": "shapes",
                                           "reward_options": {"soft_count": True, "count_confidence": False}}))
    assert got == {"source": "shapes", "options": {"soft_count": True, "count_confidence": False}, "recorded": True}
    # another source: nothing added
    got = V.training_reward_settings(meta({"reward_source": "attention", "reward_options": {}}))
    assert got == {"source": "attention", "options": {}, "recorded": True}
    # the clip source's reading changed on 2026-12-07 in a way no option restores: said, not hidden
    got = V.training_reward_settings(meta({"reward_source": "clip", "reward_options": {"model": "m"}}))
    assert got["options"] == {"model": "m"} and "recorded before 2026-12-07" in got["note"]
    got = V.training_reward_settings(meta({"reward_source": "clip",
                                           "reward_options": {"model": "m", "threshold": 0.5}}))
    assert "note" not in got
    # older correctors: the source's defaults, and the report says they were not recorded
    assert V.training_reward_settings(meta({"reward_source": "shapes"})) == {"source": "shapes", "recorded": False}
    with pytest.raises(ValueError, match="reward_options"):
        V.training_reward_settings(meta({"reward_source": "shapes", "reward_options": [1]}))


def test_the_shipped_corrector_records_its_recipe():
    """configs/shapes_shipped.yaml: the edit-target warm start on parsed-field tokens, no PPO steps."""
    from xlard.evaluation import load_corrector_dir, shipped_corrector_path

    try:
        corrector, meta = load_corrector_dir(shipped_corrector_path())
    except FileNotFoundError:
        pytest.skip("shipped corrector not installed")
    assert corrector.config.conditioning == "fields" and corrector.config.reader
    assert meta.training["step"] == 0 and meta.training["distill"]["decoder_epochs"] > 0
    assert meta.correction_step == 1.0
    # the reward it is validated with: the source's defaults when it was exported (the confidence-weighted count;
    # the warm start reads the understanding model, not the reward)
    assert meta.training["reward_options"] == {}
    assert V.training_reward_settings(meta) == {"source": "shapes", "recorded": True,
                                                "options": {"soft_count": False, "count_confidence": True}}


def test_prompt_sets_need_a_run_with_left_out_prompts():
    from xlard.evaluation import CorrectorMeta

    def meta(training):
        return CorrectorMeta(backbone="shapes", correction_step=0.6, alpha=1.0, num_inference_steps=20,
                             guidance_scale=5.0, training=training)

    records = [{"tag": "counting", "prompt": f"a photo of {n} cats", "include": [{"class": "cat", "count": n}]}
               for n in (2, 3, 4)]
    assert V.parse_args(["--correct"]).prompts == "all"
    with pytest.raises(SystemExit):
        V.parse_args(["--correct", "--prompts", "heldout"])
    assert V.select_records(records, meta({}), "all") == records
    with pytest.raises(ValueError, match="trained on every training-split prompt"):
        V.select_records(records, meta({}), "left-out")
    m = meta({"left_out_records": [records[1]]})
    assert V.select_records(records, m, "left-out") == [records[1]]
    assert V.select_records(records, m, "fitted") == [records[0], records[2]]
    with pytest.raises(ValueError, match="not shapes training-split records"):
        V.select_records(records, meta({"left_out_records": [{"tag": "x", "prompt": "y"}]}), "left-out")
    with pytest.raises(ValueError, match="must be a list of GenEval records"):
        V.select_records(records, meta({"left_out_records": "abc"}), "fitted")


def test_a_missing_corrector_is_one_clear_error(tmp_path, capsys):
    assert V.main(["--corrector", str(tmp_path / "none"), "--quiet"]) == 2
    assert torch.is_grad_enabled()  # main() leaves its caller's gradient mode alone
    assert "validate_corrector: error:" in capsys.readouterr().err


@pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")
def test_small_run_matches_direct_scoring(tmp_path, capsys):
    from xlard.evaluation import load_backbone_for, load_corrector_dir, shipped_corrector_path
    from xlard.shapes import evaluator as E
    from xlard.train.data import Item, balanced_pairs, load_records

    out = tmp_path / "v.json"
    assert V.main(["--correct", "--per-tag", "1", "--multipliers", "1", "--batch", "4", "--quiet",
                   "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["items"] == 6 and [r["multiplier"] for r in report["rows"]] == [0.0, 1.0]
    assert "x0:" in printed and "x1:" in printed
    # the shipped corrector recorded {} before the weighed count: scored with the count reward of its time
    assert 'training reward: source shapes, options {"soft_count": false, "count_confidence": true}' in printed
    assert report["reward"]["options"] == {"soft_count": False, "count_confidence": True}
    base, corrected = report["rows"]
    assert base["fixed"] == base["broken"] == 0 and report["delta_rms"] > 0
    assert set(base["tags"]) == set(V.TAGS)
    # the uncorrected row is the backbone's own images judged by the evaluator
    corrector, meta = load_corrector_dir(shipped_corrector_path())
    records, _ = load_records("shapes:train")
    items = [Item(records[r], 100 + s, r) for r, s in balanced_pairs(records, 1, 1)]
    backbone = load_backbone_for(meta)
    state = backbone.encode([it.record["prompt"] for it in items], seed=[it.seed for it in items])
    verdicts = E.evaluate(backbone.decode(state).images, [it.record for it in items])
    by_tag = {it.record["tag"]: float(v.correct) for it, v in zip(items, verdicts)}
    assert base["tags"] == by_tag
    assert corrected["overall"] == pytest.approx(sum(corrected["tags"].values()) / 6)
    assert corrected["gain"] == pytest.approx(corrected["overall"] - base["overall"])
    # one prompt per tag: no interval (a single cluster per tag), and the printout says which tags
    assert corrected["gain_ci"] == [None, None] and corrected["one_prompt_tags"] == list(V.TAGS)
    assert "points n/a" in printed and "rest(s) on one prompt" in printed
    assert base["gain"] == 0.0 and "gain +0.0 points" in printed
    assert torch.isfinite(torch.tensor(corrected["joint"]))
