"""``xlard demo`` end to end at a tiny size: train, paired held-out evaluation, report, refusal and resume.

The demo's defaults (edit targets, records) are sized for its 15-minute budget;
here the same code path runs with one edit target per tag, one epoch of each
fit, one PPO step after them and one record per tag, so what is checked is
behaviour (files, table, report, folder rules), not learning.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from xlard import demo  # noqa: E402
from xlard.cli import main as cli_main  # noqa: E402
from xlard.shapes import backbone as shapes_backbone  # noqa: E402
from xlard.shapes import prompts as P  # noqa: E402

pytestmark = pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")


# Smaller fits and batches than the demo's own (the code path is the same).
SMALL = ["--set", "distill.epochs=1", "--set", "distill.decoder_epochs=1", "--set", "ppo.prompts_per_step=2",
         "--set", "ppo.group_size=2"]
ARGS = ["--items-per-tag", "1", "--steps", "1", "--per-tag", "1", "--seeds", "0", "--quiet"] + SMALL


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = cli_main(["demo", "--out", str(out)] + ARGS)
    assert rc == 0
    return out


def test_demo_writes_train_eval_report_and_summary(tiny_demo, capsys):
    out = tiny_demo
    summary = json.loads((out / "demo.json").read_text())
    assert summary["complete"] is True
    assert summary["settings"]["steps"] == 1 and summary["settings"]["per_tag"] == 1
    assert summary["settings"]["items_per_tag"] == 1
    assert summary["settings"]["overrides"] == {"distill.epochs": 1, "distill.decoder_epochs": 1,
                                                "ppo.prompts_per_step": 2, "ppo.group_size": 2}
    config = json.loads((out / "train" / "config.json").read_text())
    assert config["ppo"]["group_size"] == 2 and config["distill"]["items_per_tag"] == 1
    # demo.json records the training config that ran (it showed the base recipe: 1000 targets per tag)
    recorded = summary["settings"]["training"]
    assert recorded["distill"]["items_per_tag"] == 1 and recorded["ppo"]["group_size"] == 2
    assert {k: v for k, v in config.items() if k != "out"} == {**recorded, "log": {**recorded["log"],
                                                                                   "progress": False}}
    assert config["model"]["corrector_overrides"]["conditioning"] == "fields"
    # The warm start ran on the training split (6 items: one per tag), then the PPO step.
    assert json.loads((out / "train" / "distill" / "summary.json").read_text())["items"] == 6
    # The corrector came from the training split's run, in a corrector folder.
    assert (out / "train" / "corrector" / "xlard_corrector.json").is_file()
    assert json.loads((out / "train" / "summary.json").read_text())["steps"] == 1
    # Evaluated on held-out records only: one per tag, paired.
    heldout = {r["prompt"] for r in P.make_splits(P.PromptConfig(), seed=0)["heldout"]}
    pairs = [json.loads(line) for line in (out / "eval" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(P.TAGS)
    assert {p["tag"] for p in pairs} == set(P.TAGS)
    assert all(p["prompt"] in heldout for p in pairs)
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert set(report["table"]) == set(P.TAGS) | {"overall"}
    assert summary["overall"]["diff"] == pytest.approx(report["table"]["overall"]["diff"])
    page = (out / "report.html").read_text()
    assert "Held-out gains" in page and "the edit-target warm start" in page and "Training: PPO" in page
    assert "edited the way their prompts ask (colors);" in page and "then through the VAE decoder" in page
    assert page.count("<article") == len(P.TAGS)  # one card per pair (fewer pairs than REPORT_CARDS)
    assert page.count("corrector: ") == len(P.TAGS) and "corrector: redrew" in page  # the count edit says so
    assert "data:image/png;base64," in page and "<script" not in page


def test_demo_refuses_an_earlier_demo_without_a_flag(tiny_demo, capsys):
    before = (tiny_demo / "demo.json").read_bytes()
    rc = cli_main(["demo", "--out", str(tiny_demo)] + ARGS)
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--resume" in err and "--overwrite" in err
    assert (tiny_demo / "demo.json").read_bytes() == before


def test_demo_resume_with_other_settings_is_refused(tiny_demo, capsys):
    rc = cli_main(["demo", "--out", str(tiny_demo), "--items-per-tag", "1", "--steps", "3", "--per-tag", "1",
                   "--seeds", "0", "--quiet", "--resume"] + SMALL)
    assert rc == 2
    assert "other settings (--steps 1 -> 3 differ)" in capsys.readouterr().err  # which one and its values, named
    rc = cli_main(["demo", "--out", str(tiny_demo), "--items-per-tag", "2", "--steps", "1", "--per-tag", "1",
                   "--seeds", "0", "--quiet", "--resume"] + SMALL)
    assert rc == 2
    assert "other settings (--items-per-tag 1 -> 2 differ)" in capsys.readouterr().err
    rc = cli_main(["demo", "--out", str(tiny_demo), "--resume"] + ARGS[:-2])  # other --set
    assert rc == 2
    assert "other settings (" in capsys.readouterr().err


def test_demo_resume_names_the_training_fields_that_differ(tiny_demo, tmp_path, capsys):
    """Only the resolved training config differing (another xlard version's recipe) showed two JSON dumps cut at 60
    characters that looked the same; a demo.json that is not an object listed every setting as "(absent) -> ..."."""
    import json
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_demo, out)
    summary = json.loads((out / "demo.json").read_text())
    summary["settings"]["training"]["distill"]["epochs"] += 1
    (out / "demo.json").write_text(json.dumps(summary))
    assert cli_main(["demo", "--out", str(out), "--resume"] + ARGS) == 2
    err = capsys.readouterr().err
    assert "the training config (--set, or another xlard version's recipe): distill.epochs 2 -> 1 differ" in err, err
    (out / "demo.json").write_text("[]")
    assert cli_main(["demo", "--out", str(out), "--resume"] + ARGS) == 2
    assert "demo.json holds no demo settings: not a demo's (or damaged)" in capsys.readouterr().err


def test_demo_resume_reuses_the_finished_run(tiny_demo, capsys):
    weights = (tiny_demo / "train" / "corrector").glob("*.safetensors")
    stamp = {p.name: p.stat().st_mtime_ns for p in weights}
    rc = cli_main(["demo", "--out", str(tiny_demo), "--resume"] + ARGS)
    assert rc == 0
    captured = capsys.readouterr()
    assert "reusing the finished run" in captured.err
    assert "| **overall** |" in captured.out
    # Rows in GenEval's order with overall last, though eval.json is written with sorted keys.
    rows = [line.split("|")[1].strip() for line in captured.out.splitlines() if line.startswith("| ")][1:]
    assert rows[:7] == list(P.TAGS) + ["**overall**"]
    assert {p.name: p.stat().st_mtime_ns for p in (tiny_demo / "train" / "corrector").glob("*.safetensors")} == stamp


def test_demo_names_its_own_remedy_for_a_damaged_eval_folder(tiny_demo, tmp_path, capsys):
    """A damaged eval/run.json read as "holds another evaluation (different alpha, backbone, ...)", and both it and a
    missing run.json advised `xlard eval --overwrite`, a command for another folder (and `xlard demo --overwrite`
    would throw the finished training away)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_demo, copy)
    for damage in (lambda p: p.write_text("{}"), lambda p: p.write_text("{cut"), lambda p: p.unlink()):
        run_json = copy / "eval" / "run.json"
        saved = run_json.read_bytes()
        damage(run_json)
        assert cli_main(["demo", "--out", str(copy), "--resume"] + ARGS) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"delete {copy / 'eval'} and rerun `xlard demo --resume` with the same options" in err, err
        assert "xlard eval --overwrite" not in err and "holds another evaluation" not in err
        run_json.write_bytes(saved)
    shutil.rmtree(copy / "eval")  # the advice works
    assert cli_main(["demo", "--out", str(copy), "--resume"] + ARGS) == 0
    assert "reusing the finished run" in capsys.readouterr().err


def test_demo_pick_cards_puts_fixed_pairs_first():
    from xlard.evaluation import PairRow

    def row(i, tag, base, corr):
        return PairRow(index=i, seed=0, tag=tag, prompt=str(i), base_correct=base, corrected_correct=corr,
                       base_reason="", corrected_reason="", lam_mass=0.0)

    rows = [row(0, "a", True, True), row(1, "b", True, False), row(2, "a", False, True), row(3, "b", False, True)]
    picked = demo._pick_cards(rows, 3)
    assert [r.index for r in picked] == [2, 3, 1]


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="per_tag"):
        demo.demo_records(0)
    with pytest.raises(ValueError, match="--steps"):
        demo.run_demo(tmp_path / "x", steps=-1)
    with pytest.raises(ValueError, match="--items-per-tag"):
        demo.run_demo(tmp_path / "x", items_per_tag=1.5)
    with pytest.raises(ValueError, match="trains nothing"):
        demo.run_demo(tmp_path / "x", steps=0, items_per_tag=0)
    with pytest.raises(ValueError, match="--items-per-tag 0: the demo's corrector has a latent reader"):
        demo.run_demo(tmp_path / "x", steps=1, items_per_tag=0)  # before anything loads
    with pytest.raises(ValueError, match="--items-per-tag"):
        demo.run_demo(tmp_path / "x", overrides={"distill.items_per_tag": 3})
    # inside a section's mapping too (it was accepted and then replaced by the demo's value without a word)
    with pytest.raises(ValueError, match=r"--set distill.items_per_tag: use the demo's own --items-per-tag"):
        demo.run_demo(tmp_path / "x", overrides={"distill": {"items_per_tag": 3, "epochs": 2}})
    with pytest.raises(ValueError, match="--items-per-tag 0: the demo's corrector has a latent reader"):
        demo.run_demo(tmp_path / "x", steps=1, items_per_tag=0, overrides={"model.corrector_overrides": {"width": 8}})
    assert demo._override({"model": {"corrector_overrides": {"reader": False}}},
                          "model.corrector_overrides.reader") == (True, False)
    assert demo._override({"model.corrector_overrides": {"reader": False}, "model.corrector_overrides.reader": 1},
                          "model.corrector_overrides.reader") == (True, 1)
    assert demo._override({"model": {"corrector_overrides": {}}}, "model.corrector_overrides.reader") == (False, None)
    with pytest.raises(ValueError, match="exclude"):
        demo.run_demo(tmp_path / "x", overwrite=True, resume=True)
    with pytest.raises(ValueError, match="--set steps"):
        demo.run_demo(tmp_path / "x", overrides={"steps": 3})
    with pytest.raises(ValueError, match="unknown key"):
        demo.run_demo(tmp_path / "x", overrides={"ppo.group": 3})
    # reward settings no run can use: refused before the folder and its demo.json were made (they were left)
    with pytest.raises(ValueError, match="never a training reward"):
        demo.run_demo(tmp_path / "x", overrides={"reward.source": "evaluator"})
    with pytest.raises(ValueError, match="reward.options.model: the 'clip' source reads a CLIP model"):
        demo.run_demo(tmp_path / "x", overrides={"reward.source": "clip"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        demo.run_demo(tmp_path / "file", steps=1)
    assert not (tmp_path / "x").exists()


def test_demo_overwrite_replaces_only_its_own_outputs(tiny_demo, capsys):
    (tiny_demo / "mine.txt").write_text("keep me")
    (tiny_demo / "eval" / "pairs.jsonl").write_text("")  # an earlier demo's (here: emptied) verdicts
    rc = cli_main(["demo", "--out", str(tiny_demo), "--overwrite"] + ARGS)
    assert rc == 0
    assert "removed 4 outputs of the earlier demo" in capsys.readouterr().err
    assert (tiny_demo / "mine.txt").read_text() == "keep me"
    assert len((tiny_demo / "eval" / "pairs.jsonl").read_text().splitlines()) == len(P.TAGS)
    assert json.loads((tiny_demo / "demo.json").read_text())["complete"] is True


def test_demo_resume_keeps_the_recorded_seconds(tiny_demo):
    import json

    before = json.loads((tiny_demo / "demo.json").read_text())["seconds"]
    assert cli_main(["demo", "--out", str(tiny_demo), "--resume"] + ARGS) == 0
    after = json.loads((tiny_demo / "demo.json").read_text())["seconds"]
    assert after["train"] >= before["train"] and after["total"] >= before["total"]  # not reset to this part's 0.0


def test_an_interrupted_demo_keeps_the_seconds_it_spent(tmp_path, monkeypatch):
    """demo.json was written with no seconds at the start and filled only at the end: a demo interrupted in its
    evaluation, then resumed, reported the resumed part's time as the whole (its training's minutes lost)."""
    from xlard import evaluation

    out = tmp_path / "cut"
    real = evaluation.run_evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "run_evaluation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, steps=1, items_per_tag=1, per_tag=1, seeds=[0], quiet=True,
                      overrides=demo_overrides())
    cut = json.loads((out / "demo.json").read_text())
    assert cut["complete"] is False and cut["seconds"]["train"] > 0 and "eval" in cut["seconds"]
    assert cut["seconds"]["total"] >= cut["seconds"]["train"]
    monkeypatch.setattr(evaluation, "run_evaluation", real)
    assert cli_main(["demo", "--out", str(out), "--resume"] + ARGS) == 0
    done = json.loads((out / "demo.json").read_text())
    assert done["complete"] is True and done["seconds"]["train"] >= cut["seconds"]["train"]
    assert done["seconds"]["total"] > cut["seconds"]["total"]
    assert done["seconds"]["total"] >= sum(done["seconds"][k] for k in ("train", "eval", "report")) - 0.5


def demo_overrides():
    from xlard.train import parse_overrides

    return parse_overrides([SMALL[i + 1] for i in range(0, len(SMALL), 2)])


def test_demo_leaves_a_folder_without_demo_json_alone(tmp_path, capsys):
    out = tmp_path / "proj"
    (out / "train" / "mydata").mkdir(parents=True)
    (out / "train" / "mydata" / "x.txt").write_text("precious")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert cli_main(["demo", "--out", str(out)] + ARGS + extra) == 2
        assert "no demo.json: not a demo's outputs" in capsys.readouterr().err
    assert (out / "train" / "mydata" / "x.txt").read_text() == "precious"
    # any demo.json claimed the folder: --resume said "not a demo's ... use --overwrite", and --overwrite deleted
    # the user's train/ and report.html
    (out / "report.html").write_text("my page")
    for marker in ('{"name": "my web demo"}', "[1, 2]", "{cut"):
        (out / "demo.json").write_text(marker)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert cli_main(["demo", "--out", str(out)] + ARGS + extra) == 2
            err = capsys.readouterr().err
            assert "demo.json holds no demo settings: not a demo's (or damaged)" in err and "--overwrite" not in err
    assert (out / "train" / "mydata" / "x.txt").read_text() == "precious"
    assert (out / "report.html").read_text() == "my page"


def test_demo_resumes_a_run_killed_right_after_its_config(tmp_path):
    """Killed after the trainer wrote train/config.json and before anything else: --resume was refused for good
    ("already holds config.json ... pass --resume")."""
    import json
    import shutil

    out = tmp_path / "killed"
    assert cli_main(["demo", "--out", str(out)] + ARGS) == 0
    for path in list((out / "train").iterdir()):  # what a SIGKILL right after the trainer's start leaves
        if path.name != "config.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / "eval")
    (out / "report.html").unlink()
    summary = json.loads((out / "demo.json").read_text())
    (out / "demo.json").write_text(json.dumps({"settings": summary["settings"], "complete": False, "seconds": {}}))
    assert cli_main(["demo", "--out", str(out), "--resume"] + ARGS) == 0
    assert (out / "report.html").is_file() and (out / "train" / "corrector").is_dir()


def test_an_incomplete_shapes_backbone_is_not_available(tmp_path):
    import shutil

    copy = tmp_path / "bb"
    shutil.copytree(shapes_backbone.backbone_path(), copy)
    assert shapes_backbone.is_available(copy)
    shutil.rmtree(copy / "tokenizer")  # it loaded, then failed mid-run with an OverflowError
    assert not shapes_backbone.is_available(copy)
