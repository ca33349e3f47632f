"""scripts/measure_edit_ceiling.py: options, and a small run at a correction step before the last whose
rows agree with what the backbone, the editor and the exact evaluator give directly."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import measure_edit_ceiling as M  # noqa: E402

from xlard.shapes import backbone as shapes_backbone  # noqa: E402


def test_options_are_validated():
    args = M.parse_args(["--per-tag", "2", "--correction-step", "0.3", "--no-count"])
    assert (args.per_tag, args.correction_step, args.no_count, args.no_color) == (2, 0.3, True, False)
    assert M.parse_args([]).correction_step == 1.0
    for bad in (["--per-tag", "0"], ["--batch", "0"], ["--correction-step", "0"], ["--correction-step", "1.5"],
                ["--correction-step", "x"], ["--replace", "--correction-step", "0.5"], ["--margin", "0"],
                ["--out", "/proc/no/table.json"], ["--seed-base", "-5"], ["--seed-base", "99999999999999999999"],
                ["--per-tag", "1000000000"]):
        with pytest.raises(SystemExit):
            M.parse_args(bad)
    args = M.parse_args(["--replace", "--relayout", "--relayout-color", "blue", "--margin", "64"])
    assert (args.replace, args.relayout, args.relayout_color, args.margin) == (True, True, "blue", 64)
    assert M.main(["--relayout-color", "teal"]) == 2  # refused before any model is loaded


@pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")
def test_a_small_run_before_the_last_step(tmp_path, capsys):
    from xlard.shapes import evaluator as E
    from xlard.shapes.editor import EditConfig, edit_images
    from xlard.shapes.understanding import load_model
    from xlard.train import config_from_dict
    from xlard.train.data import Item, balanced_pairs, load_records
    from xlard.train.rollout import encode_items
    from xlard.train.trainer import load_backbone

    out = tmp_path / "c.json"
    assert M.main(["--per-tag", "1", "--correction-step", "0.5", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["items"] == 6 and result["correction_step"] == 0.5
    assert "correction_step 0.5" in capsys.readouterr().out
    # the base and image rows, recomputed directly (the latent row needs the VAE round trip: range only)
    cfg = config_from_dict({"backbone": {"name": "shapes", "correction_step": 0.5, "device": "cpu"}})
    backbone = load_backbone(cfg.backbone, torch.device("cpu"), cfg.reward)
    records, _ = load_records("shapes:train")
    items = [Item(records[r], 100 + s, r) for r, s in balanced_pairs(records, 1, 1)]
    state = encode_items(backbone, items)
    with torch.no_grad():
        images = backbone.decode(state, state.z0).images.float()
    edited = edit_images(load_model(), images, state.specs, EditConfig())
    recs = [it.record for it in items]
    for key, imgs in (("base", images), ("image", edited.images)):
        ok = [bool(v.correct) for v in E.evaluate(imgs, recs)]
        tags = [r["tag"] for r in recs]
        want = {t: sum(o for o, g in zip(ok, tags) if g == t) / tags.count(t) for t in sorted(set(tags))}
        assert result["rows"][key]["tags"] == pytest.approx(want)
    assert 0.0 <= result["rows"]["latent"]["overall"] <= 1.0


@pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")
def test_relaid_out_templates_with_replace_targets(tmp_path):
    out = tmp_path / "r.json"
    assert M.main(["--per-tag", "1", "--replace", "--relayout", "--relayout-color", "blue", "--quiet",
                   "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["replace"] is True and result["edit_config"]["relayout"] is True
    # a relaid-out counting or position image is a clean template of the prompt: the evaluator accepts it
    assert result["rows"]["image"]["tags"]["counting"] == 1.0 and result["rows"]["image"]["tags"]["position"] == 1.0


def test_latent_move_option():
    assert M.parse_args(["--latent-move"]).latent_move is True
    assert M.parse_args([]).latent_move is False
    with pytest.raises(SystemExit):
        M.parse_args(["--latent-move", "--correction-step", "0.5"])


@pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")
def test_latent_move_row(tmp_path):
    out = tmp_path / "m.json"
    assert M.main(["--per-tag", "1", "--latent-move", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latent_move"] is True
    moved, base = result["rows"]["moved"]["tags"], result["rows"]["base"]["tags"]
    # only relations are moved: every tag without one is judged exactly as the uncorrected image
    assert {t: v for t, v in moved.items() if t != "position"} == {t: v for t, v in base.items() if t != "position"}
