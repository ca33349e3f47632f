"""The xlard command line: prompts -> render -> eval round trip, info, clear errors."""
from __future__ import annotations

import json

from xlard import cli
from xlard.shapes import backbone as shapes_backbone


def test_prompts_render_eval_round_trip(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    assert cli.main(["prompts", str(prompts), "--split", "heldout", "-n", "24", "--seed", "3"]) == 0
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(records) == 24 and len({r["tag"] for r in records}) == 6
    out = tmp_path / "renders"
    assert cli.main(["render", str(out), "--prompts", str(prompts), "--quiet"]) == 0
    assert len(list(out.glob("*/samples/0000.png"))) == 24
    summary = tmp_path / "summary.json"
    results = tmp_path / "results.jsonl"
    assert cli.main(["eval", "--folder", str(out), "--json", str(summary), "--results", str(results),
                     "--quiet"]) == 0
    table = json.loads(summary.read_text())
    assert table["overall"] == 1.0  # ground-truth renders are judged correct
    assert len(results.read_text().splitlines()) == 24
    assert "overall" in capsys.readouterr().out


def test_eval_images_are_taken_in_the_order_of_their_numbers(tmp_path, capsys):
    """Files named 0.png .. 11.png were paired with records by text (10.png before 2.png): ground-truth renders
    scored 0.25, each record judged on another record's image, without a word."""
    import shutil

    prompts = tmp_path / "p.jsonl"
    assert cli.main(["prompts", str(prompts), "--split", "heldout", "-n", "12", "--seed", "1"]) == 0
    out = tmp_path / "renders"
    assert cli.main(["render", str(out), "--prompts", str(prompts), "--quiet"]) == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        shutil.copy(out / f"{i:05d}" / "samples" / "0000.png", flat / f"{i}.png")
    summary = tmp_path / "s.json"
    capsys.readouterr()
    assert cli.main(["eval", "--prompts", str(prompts), "--images", str(flat), "--json", str(summary), "--quiet"]) == 0
    assert json.loads(summary.read_text())["overall"] == 1.0
    assert ("files taken in the order of the numbers in their names: record 2 is 2.png (by text it would be "
            "10.png)") in capsys.readouterr().err
    from pathlib import Path

    odd = [Path(n) for n in ("²3.png", "1²2.png", "b.png", "a10.png", "a9.png")]  # superscripts are no numbers
    assert [p.name for p in sorted(odd, key=cli._number_order)] == ["1²2.png", "a9.png", "a10.png", "b.png", "²3.png"]


def test_prompts_keeps_an_edited_prompt_file(tmp_path, capsys):
    """`xlard prompts OUT` replaced an existing file without a word (a hand-edited prompt set was lost); a rerun
    with the same records still needs no flag."""
    path = tmp_path / "p.jsonl"
    assert cli.main(["prompts", str(path), "-n", "6"]) == 0
    assert cli.main(["prompts", str(path), "-n", "6"]) == 0  # the same records: nothing lost
    edited = path.read_text().replace("a photo of", "a picture of", 1)
    path.write_text(edited)
    capsys.readouterr()
    assert cli.main(["prompts", str(path), "-n", "6"]) == 2
    assert "holds other records; pass --overwrite to replace it" in capsys.readouterr().err
    assert path.read_text() == edited
    assert cli.main(["prompts", str(path), "-n", "6", "--overwrite"]) == 0
    assert path.read_text() != edited
    empty = tmp_path / "empty.jsonl"  # e.g. made by mktemp: nothing to lose
    empty.write_text("")
    assert cli.main(["prompts", str(empty), "-n", "6"]) == 0 and empty.read_text() == path.read_text()
    bom = tmp_path / "bom.jsonl"  # the same records saved by an editor that writes a BOM: a rerun, not "other"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert cli.main(["prompts", str(bom), "-n", "6"]) == 0, capsys.readouterr().err


def test_eval_folder_with_an_odd_manifest_scores_the_images(tmp_path, capsys):
    """A manifest whose settings are not an object (hand-edited, another tool's) crashed `eval --folder` with an
    AttributeError traceback."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "r"
    assert cli.main(["prompts", str(prompts), "-n", "2"]) == 0
    assert cli.main(["render", str(out), "--prompts", str(prompts), "--quiet"]) == 0
    for settings in ("null", "[1]", '"x"', '{"backbone": 5, "count": "2"}'):
        (out / cli.MANIFEST_NAME).write_text(f'{{"command": "render", "settings": {settings}, "complete": true}}')
        capsys.readouterr()
        assert cli.main(["eval", "--folder", str(out), "--quiet"]) == 0, (settings, capsys.readouterr().err)


def test_eval_errors_are_clear(tmp_path, capsys):
    assert cli.main(["eval", "--folder", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_version_and_help_return_their_exit_code(capsys):
    """main() "returns the exit code": --version and --help raised argparse's SystemExit(0) instead."""
    import xlard

    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"xlard {xlard.__version__}\n"
    assert cli.main(["info", "--help"]) == 0 and "usage: xlard info" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0 and "usage: xlard" in capsys.readouterr().out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"]["loaded"] is True
    assert info["extension"]["cpu_isa"] in ("baseline", "avx2", "avx512")
    assert {row["op"] for row in info["providers"]} >= {"count_components", "sample_correction"}


def test_generate_and_eval_with_a_diffusers_backbone(tmp_path, capsys):
    from tiny_pipelines import tiny_sd_pipeline

    folder = tiny_sd_pipeline(tmp_path / "pipe")
    out = tmp_path / "images"
    assert cli.main(["generate", "a red circle", "two blue squares", "--backbone", str(folder), "--steps", "2",
                     "--out", str(out), "--seed", "5", "--quiet"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000_seed5.png", "0001_seed6.png"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a circle",
                                   "include": [{"class": "circle", "count": 1}]}) + "\n")
    assert cli.main(["eval", "--backbone", str(folder), "--prompts", str(prompts), "--steps", "2",
                     "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    assert (tmp_path / "eval" / "00000" / "samples" / "0000.png").is_file()
    captured = capsys.readouterr()
    assert "overall" in captured.out  # a random tiny model draws nothing: the table still prints
    # ... with a note that the exact evaluator judges the shapes world only (a table of zeros read as a verdict)
    assert "note: the exact evaluator judges images of the shapes world" in captured.err
    # ... and when that folder is scored again (it printed the table alone: the run's backbone is in its manifest)
    assert cli.main(["eval", "--folder", str(tmp_path / "eval"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "overall" in captured.out and "note: the exact evaluator judges images of the shapes world" in captured.err
    from xlard.evaluation import other_world_note

    assert other_world_note("shapes") is None and other_world_note(shapes_backbone.backbone_path()) is None


def test_shapes_backbone_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XLARD_SHAPES_BACKBONE", str(tmp_path / "absent"))
    assert cli.main(["generate", "a red circle", "--backbone", "shapes", "--out", str(tmp_path / "o")]) == 2
    assert "shapes backbone is not installed" in capsys.readouterr().err


def test_prompts_seed_picks_the_sample_never_another_split(tmp_path):
    """`xlard prompts --split heldout --seed 1` once drew from the split made with seed 1: 243 prompts, 193 of them
    training prompts of the split xlard trains on. --seed now picks only which records -n samples."""
    from xlard.shapes import prompts as P

    train = {r["prompt"] for r in P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["train"]}
    heldout = {r["prompt"] for r in P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["heldout"]}
    samples = []
    for seed in (0, 1, 7):
        path = tmp_path / f"h{seed}.jsonl"
        assert cli.main(["prompts", str(path), "--split", "heldout", "-n", "60", "--seed", str(seed)]) == 0
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
        assert set(prompts) <= heldout and not set(prompts) & train
        samples.append(prompts)
    assert samples[0] != samples[1] != samples[2]  # the seed still changes the sample
    whole = tmp_path / "all.jsonl"
    assert cli.main(["prompts", str(whole), "--split", "heldout", "--seed", "5"]) == 0
    assert {json.loads(line)["prompt"] for line in whole.read_text().splitlines()} == heldout


def test_prompts_to_stdout(tmp_path, capsys, monkeypatch):
    """`xlard prompts - ...` wrote a file named "-"; it writes the records to stdout (the summary to stderr), so
    they pipe."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prompts", "-", "-n", "3", "--split", "train"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 3 and all({"tag", "include", "prompt"} <= set(r) for r in records)
    assert captured.err.strip() == "wrote 3 train records to stdout"
    assert not (tmp_path / "-").exists()
    assert cli.main(["prompts", str(tmp_path / "p.jsonl"), "-n", "3", "--split", "train"]) == 0
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == records


def test_python_m_xlard_info_refuses_unknown_arguments(capsys):
    """`python -m xlard.info --js` (or any typo) printed the text report as if nothing had been asked."""
    from xlard import info

    assert info.main(["--js"]) == 2
    assert "unrecognized arguments: --js (it takes only --json)" in capsys.readouterr().err
    assert info.main(["--json"]) == 0 and capsys.readouterr().out.lstrip().startswith("{")
