"""The CLI never hangs, never mixes old and new results, never clobbers what it should not.

Each test is one class of careless or adversarial use: every user error is one
line on stderr naming the argument, exit 2, no traceback; Ctrl-C is one line and
exit 130 with only complete outputs left; output folders holding an earlier
run are refused unless --overwrite or --resume; only regular files are replaced;
files follow the umask.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xlard import cli
from xlard.shapes import evaluator as E
from xlard.shapes import prompts as P

ROOT = Path(__file__).resolve().parents[1]
COUNTING = {"tag": "counting", "include": [{"class": "circle", "count": 3}],
            "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, *must_contain: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert ": error: " in lines[0]
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def write_records(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompt_file(tmp_path, capsys) -> Path:
    path = tmp_path / "p.jsonl"
    assert run(["prompts", path, "-n", 12, "--seed", 1], capsys)[0] == 0
    return path


def units(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# Bounds and bad numbers: one line, exit 2, before any work


@pytest.mark.parametrize("argv, flag", [
    (["prompts", "{tmp}/p.jsonl", "-n", "-5"], "argument -n"),
    (["prompts", "{tmp}/p.jsonl", "-n", "1000000000"], "argument -n"),
    (["prompts", "{tmp}/p.jsonl", "-n", "many"], "argument -n"),
    (["prompts", "{tmp}/p.jsonl", "--seed", "-1"], "argument --seed"),
    (["render", "{tmp}/r", "--prompts", "{tmp}/p.jsonl", "--per-prompt", "0"], "argument --per-prompt"),
    (["render", "{tmp}/r", "--prompts", "{tmp}/p.jsonl", "--overwrite", "--resume"], "argument --resume"),
    (["eval", "--backbone", "shapes", "--prompts", "{tmp}/p.jsonl", "--batch", "0"], "argument --batch"),
    (["generate", "a circle", "--backbone", "shapes", "--steps", "-1"], "argument --steps"),
    (["generate", "a circle", "--backbone", "shapes", "--guidance", "nan"], "argument --guidance"),
    # refused after loading, blamed on --backbone / an unnamed NaN latent, leaving an unfinished folder
    (["generate", "a circle", "--backbone", "shapes", "--guidance", "-5"], "argument --guidance"),
    (["generate", "a circle", "--backbone", "shapes", "--guidance", "1e308"], "argument --guidance"),
    (["generate", "a circle", "--backbone", "shapes", "--per-prompt", "1000000"], "argument --per-prompt"),
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--mask-fraction", "2"], "argument --mask-fraction"),
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--mask-fraction", "0"], "argument --mask-fraction"),
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--bootstrap", "0"], "argument --bootstrap"),
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--bootstrap", "39"],
     "argument --bootstrap: must be in 40..100000"),
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--bootstrap", "10000000"], "argument --bootstrap"),
    (["frobnicate"], "invalid choice"),
    # --correct skipped the seed bound: it wrote 0001_seed2147483648.png
    (["generate", "a circle", "a square", "--backbone", "shapes", "--correct", "--seed", "2147483647", "--out",
      "{tmp}/g"], "--seed: image seeds run up to 2147483648"),
    # a non-UTF-8 byte in a prompt (the shell passes bytes) reached the tokenizer: a traceback
    (["generate", "a blue square \udcff", "--backbone", "shapes", "--out", "{tmp}/g"],
     "PROMPT: prompt 1 of 1 is not UTF-8 text (byte 0xff at character 15"),
    # --seed beside --seeds was ignored without a word
    (["eval", "--correct", "--prompts", "{tmp}/p.jsonl", "--seeds", "0,1", "--seed", "5"], "--seed: give the"),
])
def test_bad_numbers_and_flags_are_one_line_exit_2(tmp_path, capsys, argv, flag):
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    one_line_error(err, flag)
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "r").exists() and not (tmp_path / "g").exists()


def test_the_paired_eval_holds_records_times_seeds_to_the_image_limit(tmp_path, capsys):
    """records x seeds was not held to the 1,000,000 images per command the other forms keep; refused before the
    corrector or the backbone loads now."""
    prompts = tmp_path / "p.jsonl"
    assert run(["prompts", prompts, "-n", "100000"], capsys)[0] == 0
    code, _, err = run(["eval", "--correct", "--prompts", prompts, "--seeds", ",".join(map(str, range(11))),
                        "--out", tmp_path / "e"], capsys)
    assert code == 2
    one_line_error(err, "--prompts and --seeds: 100000 records x 11 seeds make 1100000 pairs; at most 1000000")
    assert not (tmp_path / "e").exists()
    # --overwrite of an earlier run: refused before its files are cleared (they were deleted, then refused)
    small = tmp_path / "one.jsonl"
    small.write_text(prompts.read_text().splitlines()[0] + "\n")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "run.json").write_text("{}")
    (earlier / "pairs.jsonl").write_text('{"index": 0}\n')
    code, _, err = run(["eval", "--correct", "--prompts", prompts, "--seeds", ",".join(map(str, range(11))),
                        "--out", earlier, "--overwrite"], capsys)
    assert code == 2 and sorted(p.name for p in earlier.iterdir()) == ["pairs.jsonl", "run.json"]


def test_error_lines_show_terminal_control_characters_escaped(tmp_path, capsys):
    """A path or an option holding ESC [2J (clear the screen), an OSC title change or a right-to-left override
    was printed raw in the error line; shown escaped now."""
    code, _, err = run(["eval", "--prompts", f"{tmp_path}/no\x1b[2Jsuch\x1b]0;t\x07\u202e.jsonl", "--images",
                        str(tmp_path)], capsys)
    assert code == 2 and "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    one_line_error(err, "--prompts", r"no\x1b[2Jsuch\x1b]0;t\x07\u202e.jsonl")
    code, _, err = run(["generate", "a circle", "--backbone", "shapes", "--bogus\x1b[31m"], capsys)
    assert code == 2 and "\x1b" not in err
    one_line_error(err, r"unrecognized arguments: --bogus\x1b[31m")


def test_sample_records_refuses_a_negative_count():
    pool = P.make_splits()["heldout"]
    with pytest.raises(ValueError, match="n must be a non-negative integer, got -5"):
        P.sample_records(pool, -5)
    assert P.sample_records(pool, 0) == []


def test_a_record_asking_for_a_billion_objects_fails_before_work(tmp_path, capsys):
    prompts = write_records(tmp_path / "p.jsonl", [COUNTING, {**COUNTING, "include": [{"class": "circle",
                                                                                       "count": 10**9}],
                                                            "exclude": []}])
    prompts.write_text(prompts.read_text().replace("\n", "\n\n", 1))  # a blank line: the record is on line 3
    start = time.perf_counter()
    code, _, err = run(["render", tmp_path / "r", "--prompts", prompts, "--quiet"], capsys)
    assert code == 2 and time.perf_counter() - start < 30
    # by its line, as every other error of the file (it said "record 1", counting from 0 without blank lines)
    one_line_error(err, f"--prompts: {prompts}:3: the record asks for 1000000000 objects", "at most 25")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="holds at most 25"):
        P.render_record({**COUNTING, "include": [{"class": "circle", "count": 10**9}], "exclude": []})


# --------------------------------------------------------------------------------------------
# Records: unknown tags and empty folders are errors, not a seventh task or a NaN


def test_an_unknown_tag_is_refused_everywhere(tmp_path, capsys, prompt_file):
    bad = write_records(tmp_path / "bad.jsonl", [{**COUNTING, "tag": "vibes"}])
    code, _, err = run(["render", tmp_path / "r", "--prompts", bad, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--prompts", "'tag' must be one of", "got 'vibes'")
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    code, _, err = run(["eval", "--prompts", bad, "--images", images], capsys)
    assert code == 2
    one_line_error(err, "--prompts", "'vibes'")
    # a GenEval folder whose metadata carries the tag (written by some other tool)
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    (out / "00003" / "metadata.jsonl").write_text(json.dumps({**COUNTING, "tag": "vibes"}) + "\n")
    (out / cli.MANIFEST_NAME).unlink()
    code, _, err = run(["eval", "--folder", out], capsys)
    assert code == 2
    one_line_error(err, "--folder", "'tag' must be one of", "'vibes'")
    # the library says so too, instead of averaging a seventh task into "overall"
    image = P.render_record(COUNTING, seed=0).render()
    with pytest.raises(ValueError, match="'tag' must be one of"):
        E.evaluate_record(image, {**COUNTING, "tag": "vibes"})
    good = E.evaluate_record(image, COUNTING)
    with pytest.raises(ValueError, match="not a GenEval task"):
        E.summarize([good, E.RecordResult(**{**good.__dict__, "tag": "vibes"})])


def test_an_eval_folder_without_samples_is_an_error(tmp_path, capsys, prompt_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["eval", "--folder", empty], capsys)
    assert code == 2
    one_line_error(err, "--folder", "no <index>/metadata.jsonl")
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    for png in (out / "00005" / "samples").glob("*.png"):
        png.unlink()
    code, out_text, err = run(["eval", "--folder", out], capsys)
    assert code == 2 and "nan" not in out_text
    one_line_error(err, "--folder", "1 of 12 prompt folders have no samples", "00005")


# --------------------------------------------------------------------------------------------
# Every user error: one line naming the argument and the fix, exit 2, no traceback


def test_user_errors_name_the_argument_and_the_fix(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "not-a-pipeline").mkdir()
    cases = [
        (["render", tmp_path / "r", "--prompts", tmp_path / "missing.jsonl"], ("--prompts", "no such file")),
        (["eval", "--folder", tmp_path / "missing"], ("--folder", "no such folder")),
        (["eval", "--prompts", tmp_path / "missing.jsonl", "--images", tmp_path], ("--prompts", "no such file")),
        (["prompts", tmp_path / "no" / "p.jsonl"], ("OUT", "does not exist", "create it first")),
        (["generate", "a circle", "--backbone", tmp_path / "not-a-pipeline", "--out", tmp_path / "g"],
         ("--backbone", "no model_index.json", "save_pretrained")),
        (["generate", "a circle", "--backbone", "./no/such/pipeline", "--out", tmp_path / "g"],
         ("--backbone", "no folder at", "check the path")),
        (["generate", "a circle", "--backbone", "someorg/not-cached-model", "--out", tmp_path / "g"],
         ("--backbone", "HF_HUB_OFFLINE", "download it first")),
        (["generate", "a circle", "--backbone", "not a hub id!", "--out", tmp_path / "g"],
         ("--backbone", "nor a valid hub id")),
        (["generate", "a circle", "--backbone", "shapes", "--device", "cuda", "--out", tmp_path / "g"],
         ("--device", "drop --device")),
        (["generate", "a circle", "--backbone", "shapes", "--device", "gpu", "--out", tmp_path / "g"],
         ("--device", "use cpu, cuda")),
        (["eval", "--backbone", "shapes"], ("--backbone", "needs --prompts")),
    ]
    # A record of another world (what neither render draws nor the exact evaluator judges) fails before any
    # output folder is started or any image generated (eval --backbone failed after generating them).
    dragons = tmp_path / "dragons.jsonl"
    dragons.write_text(json.dumps({"tag": "counting", "prompt": "two dragons",
                                   "include": [{"class": "dragon", "count": 2}]}) + "\n")
    teal = tmp_path / "teal.jsonl"
    teal.write_text(json.dumps({"tag": "colors", "prompt": "a teal circle",
                                "include": [{"class": "circle", "count": 1, "color": "teal"}]}) + "\n")
    world = ("--prompts", "dragons.jsonl:1:", "is not a class of this world", "known: circle")
    cases += [
        (["render", tmp_path / "g", "--prompts", dragons], world),
        (["eval", "--backbone", "shapes", "--prompts", dragons, "--out", tmp_path / "g"], world),
        (["eval", "--prompts", dragons, "--correct", "--out", tmp_path / "g"], world),
        (["eval", "--backbone", "shapes", "--prompts", teal, "--out", tmp_path / "g"],
         ("--prompts", "'teal' is not a color of this world")),
    ]
    for argv, texts in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        one_line_error(err, *texts)
    assert not (tmp_path / "g").exists()  # nothing is created when a check fails


@pytest.mark.parametrize("quiet", [True, False])
@pytest.mark.parametrize("correct", [False, True])
def test_quiet_generate_prints_only_its_result(tmp_path, correct, quiet):
    """--quiet hides diffusers/transformers' loading bars too, and loading prints no deprecation warning
    (the shipped corrector's count eyes load the VAE with the dtype keyword the installed diffusers takes).
    Without --quiet, stderr holds progress bars only: no recommendation to install accelerate (printed per
    model diffusers loaded), no transformers notice that image processors fall back to PIL without
    torchvision (neither package is needed; the development environment has neither)."""
    from xlard import evaluation
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    if correct:
        try:
            evaluation.shipped_corrector_path("shapes")
        except FileNotFoundError as e:
            pytest.skip(str(e))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["generate", "a photo of two circles", "--backbone", "shapes", "--out", str(tmp_path / "g"),
            *(["--quiet"] if quiet else []), *(["--correct"] if correct else [])]
    proc = subprocess.run([sys.executable, "-m", "xlard", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("wrote 1 "), proc.stdout
    if quiet:
        assert proc.stderr == "", proc.stderr
        return
    for line in proc.stderr.replace("\r", "\n").splitlines():
        line = line.replace("\x1b[A", "").strip()
        assert not line or "it/s]" in line or "s/it]" in line or "batch/s]" in line or "s/batch]" in line, line


def test_generate_notes_words_the_shapes_backbone_never_saw(tmp_path, capsys):
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    code, out, err = run(["generate", "a photo of a circle", "a photo of two red dragons", "--backbone", "shapes",
                          "--steps", 2, "--out", tmp_path / "g", "--quiet"], capsys)
    assert code == 0 and out.startswith("wrote 2 images"), err
    assert err.splitlines() == ["note: prompt 2: the shapes backbone never saw 'dragons'; it knows the shapes "
                                "world's words only (circle, square, triangle, diamond, ten colors, counts one to "
                                "ten in words, left of/right of/above/below)"]


def test_a_prompt_the_backbone_cannot_use_fails_before_any_output(tmp_path, capsys, prompt_file):
    """A prompt whose object words fall beyond the tokenizer's length limit failed at its own batch: the
    images, prompt folders or pairs before it were written (a started folder left behind, the paired
    eval's pairs.jsonl too) and the message did not say which record. Now every form parses all its
    prompts after loading the backbone and before creating anything, and names the prompt or record."""
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    long = "a photo of a square" + " and a red circle" * 12  # world words only: no note line
    records = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    bad = write_records(tmp_path / "long.jsonl", records[:3] + [dict(records[0], prompt=long)])
    cases = [
        (["generate", "a photo of a circle", long, "--backbone", "shapes", "--steps", 2, "--out", tmp_path / "g",
          "--quiet"],
         ("PROMPT: prompt 2 of 2: prompt 'a photo of a square", "falls beyond the 16-token length limit")),
        (["generate", "a photo of a circle", long, "--backbone", "shapes", "--correct", "--out", tmp_path / "g",
          "--quiet"],
         ("PROMPT: prompt 2 of 2: prompt 'a photo of a square", "falls beyond")),
        (["eval", "--backbone", "shapes", "--steps", 2, "--prompts", bad, "--out", tmp_path / "e", "--quiet"],
         (f"--prompts: {bad} record 3: prompt 'a photo of a square", "falls beyond")),
        (["eval", "--correct", "--prompts", bad, "--seeds", "0", "--out", tmp_path / "e", "--quiet"],
         (f"--prompts: {bad} record 3: prompt 'a photo of a square", "falls beyond")),
    ]
    for argv, texts in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        one_line_error(err, *texts)
        assert not (tmp_path / "g").exists() and not (tmp_path / "e").exists(), argv


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_folder_another_run_writes_into_is_refused_before_any_work(tmp_path, capsys, prompt_file, monkeypatch):
    """Two runs into one folder (a command started twice, a job scheduled twice) would interleave their
    files: the second fails at once, naming the folder, and touches nothing."""
    from helpers import hold_folder_in_subprocess

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = hold_folder_in_subprocess(out)
    try:
        cases = [
            (["render", out, "--prompts", prompt_file], "OUT"),
            (["generate", "a circle", "--backbone", "shapes", "--out", out], "--out"),
            (["generate", "a circle", "--backbone", "shapes", "--correct", "--out", out], "--out"),
            (["eval", "--prompts", prompt_file, "--backbone", "shapes", "--out", out], "--out"),
            (["eval", "--prompts", prompt_file, "--correct", "--out", out], "--out"),
            (["eval", "--prompts", prompt_file, "--correct", "--resume", "--out", out], "--out"),
            (["train", ROOT / "configs" / "shapes.yaml", "--out", out], "--out"),
            (["demo", "--out", out], "--out"),
        ]
        for argv, flag in cases:
            code, _, err = run(argv, capsys)
            assert code == 2, (argv, err)
            one_line_error(err, f"error: {flag}: {out} is in use by another running xlard process")
    finally:
        proc.communicate("", timeout=60)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_user_error_in_a_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "xlard", "prompts", str(tmp_path / "p.jsonl"), "-n", "-5"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    one_line_error(proc.stderr, "argument -n")


# --------------------------------------------------------------------------------------------
# Output folders: refuse, --overwrite, --resume


def test_render_into_a_folder_with_results(tmp_path, capsys, prompt_file):
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")  # not the command's: survives everything below
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "OUT", "already holds results", "--overwrite", "--resume")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before

    # --resume with the same settings reuses everything and says so
    code, stdout, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--resume"], capsys)
    assert code == 0 and "reusing 12 of 12" in err and "0 prompt folders" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before

    # --resume with other settings would mix two runs: refused, naming what differs
    code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--resume", "--seed", "9"], capsys)
    assert code == 2
    one_line_error(err, "--resume", "differ: seed 0 -> 9")  # the values too (it said "differ: seed")

    # --overwrite with a smaller prompt set: only the new run's folders remain, and eval scores 4
    small = write_records(tmp_path / "small.jsonl", P.read_records(prompt_file)[:4])
    code, _, err = run(["render", out, "--prompts", small, "--quiet", "--overwrite"], capsys)
    assert code == 0 and "removed 12 outputs" in err
    assert units(out) == ["00000", "00001", "00002", "00003"]
    assert (out / "notes.txt").read_text() == "mine"
    summary = tmp_path / "s.json"
    assert run(["eval", "--folder", out, "--json", summary, "--quiet"], capsys)[0] == 0
    assert json.loads(summary.read_text())["total"] == 4


def test_resume_without_a_manifest_is_refused(tmp_path, capsys, prompt_file):
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    (out / cli.MANIFEST_NAME).unlink()
    code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--resume"], capsys)
    assert code == 2
    one_line_error(err, "--resume", "use --overwrite")


def test_eval_with_a_backbone_never_scores_stale_prompt_folders(tmp_path, capsys, prompt_file):
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "pipe")
    out = tmp_path / "eval"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0  # 12 earlier folders
    three = write_records(tmp_path / "three.jsonl", P.read_records(prompt_file)[:3])
    argv = ["eval", "--backbone", pipe, "--prompts", three, "--steps", 2, "--out", out, "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 2
    one_line_error(err, "--out", "already holds results")

    results = tmp_path / "results.jsonl"
    code, _, err = run(argv + ["--overwrite", "--results", results], capsys)
    assert code == 0, err
    assert units(out) == ["00000", "00001", "00002"]
    assert len(results.read_text().splitlines()) == 3

    # --resume regenerates only what is missing: the same image (same seed), up to the arithmetic of
    # another batch size (3 prompts per pass before, 1 now)
    import shutil

    import numpy as np

    first, _ = E.load_images(str(out / "00001" / "samples" / "0000.png"))
    kept = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    shutil.rmtree(out / "00001")
    code, _, err = run(argv + ["--resume", "--results", results], capsys)
    assert code == 0 and "reusing 2 of 3" in err
    again, _ = E.load_images(str(out / "00001" / "samples" / "0000.png"))
    diff = np.abs(first[0].astype(int) - again[0].astype(int))
    print("resume vs full run, max |diff| in 8-bit levels:", diff.max(), "mean:", diff.mean())
    assert diff.max() <= 8 and diff.mean() < 1.0
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == kept
    assert len(results.read_text().splitlines()) == 3


def test_dtype_loads_the_backbone_in_half_precision_and_is_part_of_the_settings(tmp_path, capsys, monkeypatch):
    """--dtype (a real model on a GPU needs half precision; every backbone loaded in float32 before)."""
    from tiny_pipelines import tiny_sd_pipeline

    from xlard import evaluation
    from xlard.backbones import DiffusersBackbone

    import torch

    pipe = tiny_sd_pipeline(tmp_path / "pipe")
    capsys.readouterr()  # what building the pipeline printed
    out = tmp_path / "g"
    argv = ["generate", "a red circle", "--backbone", pipe, "--steps", 2, "--out", out, "--quiet"]
    code, _, err = run(argv + ["--dtype", "float16"], capsys)  # before anything loads
    assert code == 2 and not out.exists()
    one_line_error(err, "--dtype: float16 runs on a GPU (--device cuda)")
    prompts = tmp_path / "p.jsonl"  # the corrector forms too (the paired eval ran in float16 on the CPU)
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                   "exclude": [], "prompt": "a photo of a circle"}) + "\n")
    for corrector_argv in (["generate", "a red circle", "--correct", "--out", tmp_path / "gc"],
                           ["eval", "--prompts", prompts, "--correct", "--out", tmp_path / "ec"]):
        code, _, err = run(corrector_argv + ["--backbone", "shapes", "--dtype", "float16", "--quiet"], capsys)
        assert code == 2, err
        one_line_error(err, "--dtype: float16 runs on a GPU (--device cuda)")
    assert not (tmp_path / "gc").exists() and not (tmp_path / "ec").exists()
    loaded = []
    real = DiffusersBackbone.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        backbone = real(cls, *args, **kwargs)
        loaded.append(backbone.dtype)
        return backbone

    monkeypatch.setattr(DiffusersBackbone, "from_pretrained", classmethod(spy))
    assert run(argv + ["--dtype", "bfloat16"], capsys)[0] == 0
    assert loaded == [torch.bfloat16] and (out / "0000_seed0.png").is_file()
    code, _, err = run(argv + ["--resume"], capsys)  # float32 now: other settings
    assert code == 2
    one_line_error(err, "--resume", "differ: dtype")
    # the default given explicitly is the run made without it (it was refused as "dtype (absent) -> float32")
    plain = tmp_path / "plain"
    plain_argv = [a if a != out else plain for a in argv] + ["--per-prompt", 2]
    assert run(plain_argv, capsys)[0] == 0
    (plain / "0000_seed0.png").unlink()  # 0001 stays: the folder holds this run's results
    code, _, err = run(plain_argv + ["--resume", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert (plain / "0000_seed0.png").is_file()
    code, _, err = run(plain_argv + ["--resume", "--dtype", "bfloat16"], capsys)  # named as what each run had
    assert code == 2
    one_line_error(err, '--resume', 'differ: dtype "float32" -> "bfloat16"')
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        evaluation.load_backbone_for(evaluation.CorrectorMeta("shapes", 1.0, 1.0, 2, 5.0), dtype="float64")


def test_generate_refuses_overwrites_and_resumes(tmp_path, capsys):
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "pipe")
    out = tmp_path / "g"
    argv = ["generate", "a red circle", "two blue squares", "--backbone", pipe, "--steps", 2, "--out", out,
            "--quiet"]
    assert run(argv, capsys)[0] == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000_seed0.png", "0001_seed1.png"]
    code, _, err = run(argv, capsys)
    assert code == 2
    one_line_error(err, "--out", "already holds results")
    (out / "0001_seed1.png").unlink()
    code, stdout, err = run(argv + ["--resume"], capsys)
    assert code == 0 and "reusing 1 of 2" in err and "wrote 1 images" in stdout
    code, _, err = run(argv[:2] + argv[3:] + ["--resume"], capsys)  # other prompts: refused
    assert code == 2
    one_line_error(err, "--resume", "differ: prompts")
    code, _, err = run(argv[:2] + argv[3:] + ["--overwrite"], capsys)
    assert code == 0 and sorted(p.name for p in out.glob("*.png")) == ["0000_seed0.png"]


# --------------------------------------------------------------------------------------------
# Only regular files or new paths are written


def test_outputs_that_are_not_regular_files_are_refused(tmp_path, capsys, prompt_file):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run(["prompts", fifo, "-n", 3], capsys)
    assert code == 2
    one_line_error(err, "OUT", "FIFO", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    for flag in ("--json", "--results"):
        code, _, err = run(["eval", "--folder", out, flag, fifo, "--quiet"], capsys)
        assert code == 2
        one_line_error(err, flag, "FIFO")
        code, _, err = run(["eval", "--folder", out, flag, out, "--quiet"], capsys)
        assert code == 2
        one_line_error(err, flag, "is a folder")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    node = tmp_path / "full"  # a private device node (like /dev/full): the system's is never at risk
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        return
    code, _, err = run(["prompts", node, "-n", 3], capsys)
    assert code == 2
    one_line_error(err, "character device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


# --------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130, only complete outputs; --resume finishes the run


def test_ctrl_c_leaves_only_complete_prompt_folders(tmp_path, capsys, prompt_file, monkeypatch):
    out = tmp_path / "r"
    real = cli._write_png
    calls = {"n": 0}

    def interrupted_write(path, image):
        calls["n"] += 1
        if calls["n"] == 6:  # the third prompt folder, second image: mid-folder
            raise KeyboardInterrupt
        real(path, image)

    monkeypatch.setattr(cli, "_write_png", interrupted_write)
    code, _, err = run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet"], capsys)
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0]
    assert units(out) == ["00000", "00001"] and temporaries(out) == []
    for unit in units(out):
        assert len(list((out / unit / "samples").glob("*.png"))) == 2
        assert (out / unit / "metadata.jsonl").is_file()
    code, _, err = run(["eval", "--folder", out], capsys)  # a half run is not scored as if whole
    assert code == 2
    one_line_error(err, "--folder", "unfinished", "--resume")
    monkeypatch.setattr(cli, "_write_png", real)
    code, _, err = run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet", "--resume"], capsys)
    assert code == 0 and "reusing 2 of 12" in err
    assert len(units(out)) == 12
    assert json.loads((out / cli.MANIFEST_NAME).read_text())["complete"] is True
    assert run(["eval", "--folder", out, "--quiet"], capsys)[0] == 0


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_sigint_and_sigterm_to_a_real_process(tmp_path, prompt_file, signum, code, word):
    """Ctrl-C and SIGTERM (kill, timeout, a scheduler's preemption) end the same way: one line, no temporary
    file, complete units only. SIGTERM used to kill the process mid-write, silently (exit -15)."""
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xlard", "render", str(out), "--prompts", str(prompt_file),
                             "--per-prompt", "400", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            # A Ctrl-C at a terminal: SIGINT's default action, even when this test runs in a
                            # background job (whose children inherit SIGINT ignored, as a shell's `cmd &` sets it).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (out / "00000").is_dir():
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"render ended before it could be interrupted: {proc.communicate()}")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "--resume" in lines[0] and "Traceback" not in err
    assert temporaries(out) == []
    assert 1 <= len(units(out)) < 12
    for unit in units(out):
        assert len(list((out / unit / "samples").glob("*.png"))) == 400


# --------------------------------------------------------------------------------------------
# Permissions follow the umask


def test_outputs_follow_the_umask(tmp_path, capsys, monkeypatch):
    old = os.umask(0o022)
    try:
        prompts = tmp_path / "p.jsonl"
        assert run(["prompts", prompts, "-n", 6], capsys)[0] == 0
        out = tmp_path / "r"
        assert run(["render", out, "--prompts", prompts, "--quiet"], capsys)[0] == 0
        summary, results = tmp_path / "s.json", tmp_path / "res.jsonl"
        assert run(["eval", "--folder", out, "--json", summary, "--results", results, "--quiet"], capsys)[0] == 0
        from xlard.models import CorrectorConfig, ResidualCorrector

        model = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8))
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    files = [prompts, summary, results, out / cli.MANIFEST_NAME, out / "00000" / "metadata.jsonl",
             out / "00000" / "samples" / "0000.png", tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json"]
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
    for d in (out, out / "00000", out / "00000" / "samples", tmp_path / "m"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d


def test_ctrl_c_during_overwrite_leaves_no_run_to_mistake_for_whole(tmp_path, capsys, prompt_file, monkeypatch):
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    real = cli.shutil.rmtree
    calls = {"n": 0}

    def interrupted_rmtree(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(cli.shutil, "rmtree", interrupted_rmtree)
    code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--overwrite", "--seed", 5], capsys)
    assert code == 130 and len(units(out)) == 9
    monkeypatch.setattr(cli.shutil, "rmtree", real)
    code, _, err = run(["eval", "--folder", out], capsys)
    assert code == 2
    one_line_error(err, "unfinished")
    for seed in ("0", "5"):  # neither the old run nor the new one may adopt the 9 leftovers
        code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--resume", "--seed", seed], capsys)
        assert code == 2
        one_line_error(err, "--resume", "other settings")
    assert run(["render", out, "--prompts", prompt_file, "--quiet", "--overwrite", "--seed", 5], capsys)[0] == 0
    assert run(["eval", "--folder", out, "--quiet"], capsys)[0] == 0


def test_an_output_never_replaces_an_input(tmp_path, capsys, prompt_file):
    before = prompt_file.read_bytes()
    images = tmp_path / "imgs"
    images.mkdir()
    for flag in ("--results", "--json"):
        code, _, err = run(["eval", "--prompts", prompt_file, "--images", images, flag, prompt_file], capsys)
        assert code == 2
        one_line_error(err, flag, "also given as --prompts")
    code, _, err = run(["eval", "--folder", tmp_path, "--results", tmp_path / "x", "--json", tmp_path / "x"], capsys)
    assert code == 2
    one_line_error(err, "--json", "also given as --results")
    assert prompt_file.read_bytes() == before


def test_a_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P, "write_jsonl", full)
    code, _, err = run(["prompts", tmp_path / "p.jsonl", "-n", 3], capsys)
    assert code == 1
    one_line_error(err, "No space left on device")
    assert not (tmp_path / "p.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Outputs that cannot be written: named before any work (no model loaded, nothing generated)


def _unwritable_cases(locked: Path, prompt_file: Path, rendered: Path) -> list[tuple[list, str]]:
    config = ROOT / "configs" / "shapes.yaml"
    return [
        (["generate", "a circle", "--backbone", "shapes", "--out", locked / "g"], "--out"),
        (["generate", "a circle", "--backbone", "shapes", "--correct", "--out", locked / "g"], "--out"),
        (["eval", "--backbone", "shapes", "--prompts", prompt_file, "--out", locked / "e"], "--out"),
        (["eval", "--correct", "--prompts", prompt_file, "--out", locked / "e"], "--out"),
        (["eval", "--correct", "--prompts", prompt_file, "--out", rendered.parent / "e2", "--json",
          locked / "e.json"], "--json"),
        (["eval", "--correct", "--prompts", prompt_file, "--out", rendered.parent / "e3", "--markdown",
          locked / "e.md"], "--markdown"),
        (["eval", "--backbone", "shapes", "--prompts", prompt_file, "--out", rendered.parent / "e4", "--json",
          locked / "e.json"], "--json"),
        (["eval", "--folder", rendered, "--results", locked / "r.jsonl"], "--results"),
        (["render", locked / "r", "--prompts", prompt_file], "OUT"),
        (["prompts", locked / "p.jsonl", "-n", 3], "OUT"),
        (["demo", "--out", locked / "d"], "--out"),
        (["train", config, "--out", locked / "t"], "--out"),
        (["train", config, "--set", f"out={locked / 't'}"], "out"),
    ]


def _no_work(monkeypatch):
    from xlard import demo, evaluation, train

    def started(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    for owner, name in ((cli, "_load_backbone"), (evaluation, "_corrector_from_args"),
                        (evaluation, "_backbone_from_args"), (demo, "main"), (train, "train"),
                        (E, "evaluate_folder")):
        monkeypatch.setattr(owner, name, started)


def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, capsys, prompt_file, monkeypatch):
    """A folder that takes no new files (a read-only mount, a folder of another user): every command names
    the argument, the place and the reason in one line, exit 2, before any model loads."""
    from xlard import _io

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rendered = tmp_path / "rendered"
    assert run(["render", rendered, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    real_new_temp_folder = _io._new_temp_folder

    def refusing(parent, name):  # what the kernel says for a folder we may not write (as root chmod would not)
        if Path(parent).resolve() == locked.resolve():
            raise PermissionError(13, "Permission denied")
        return real_new_temp_folder(parent, name)

    monkeypatch.setattr(_io, "_new_temp_folder", refusing)
    _no_work(monkeypatch)
    for argv, flag in _unwritable_cases(locked, prompt_file, rendered):
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        line = one_line_error(err, flag, str(locked), "Permission denied")
        assert "cannot" in line and ".tmp-" not in line, line
    assert list(locked.iterdir()) == []
    assert not any((tmp_path / name).exists() for name in ("e2", "e3", "e4"))


def test_an_output_under_a_file_fails_before_any_work(tmp_path, capsys, prompt_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rendered = tmp_path / "rendered"
    assert run(["render", rendered, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    _no_work(monkeypatch)
    for argv, flag in _unwritable_cases(a_file, prompt_file, rendered):
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        one_line_error(err, flag, str(a_file.name))
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self").is_dir(),
                    reason="needs Linux's /proc, a folder that takes no new files even for root")
def test_a_real_unwritable_folder(tmp_path, capsys, prompt_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_work(monkeypatch)
    for argv in (["generate", "a circle", "--backbone", "shapes", "--out", "/proc/xlard-test"],
                 ["prompts", "/proc/xlard-test.jsonl", "-n", 3],
                 ["demo", "--out", "/proc/xlard-test"]):
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        one_line_error(err, "cannot", "/proc", "choose a folder you can write to")


def test_the_paired_eval_and_generate_check_their_arguments_before_loading(tmp_path, capsys, prompt_file,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_work(monkeypatch)
    out = tmp_path / "e"
    cases = [
        (["eval", "--correct", "--prompts", prompt_file, "--seeds", "0,0", "--out", out], ("--seeds", "distinct")),
        (["eval", "--correct", "--prompts", prompt_file, "--seeds", "one", "--out", out], ("--seeds", "integers")),
        # image seeds beyond 2**64 were found after loading, unnamed, leaving a run.json that blocked the rerun
        (["eval", "--correct", "--prompts", prompt_file, "--seeds", "99999999999999999999", "--out", out],
         ("--seeds: must be at most 18446744073708",)),
        (["demo", "--seeds", "99999999999999999999", "--out", out], ("--seeds: must be at most",)),
        (["eval", "--correct", "--prompts", tmp_path / "missing.jsonl", "--out", out], ("--prompts", "no such file")),
        (["eval", "--correct", "--out", out], ("--prompts", "needs --prompts")),
        (["eval", "--correct", "--prompts", prompt_file, "--images", tmp_path, "--out", out], ("drop --folder",)),
        # options of the other form of eval were ignored without a word (--seeds 3,4 scored seed 0 only;
        # --results with a corrector wrote nothing)
        (["eval", "--correct", "--prompts", prompt_file, "--results", tmp_path / "r.jsonl", "--out", out],
         ("--results", "OUT/pairs.jsonl")),
        (["eval", "--backbone", "shapes", "--prompts", prompt_file, "--seeds", "3,4", "--out", out],
         ("--seeds: only with --corrector DIR or --correct",)),
        (["eval", "--folder", tmp_path, "--save-images"], ("--save-images: only with --corrector",)),
        (["eval", "--prompts", prompt_file, "--images", tmp_path, "--bootstrap", "100"], ("--bootstrap: only with",)),
        (["eval", "--prompts", prompt_file, "--images", tmp_path, "--mask-fraction", "0.3"],
         ("--mask-fraction: only with",)),
        (["eval", "--prompts", prompt_file, "--images", tmp_path, "--markdown", tmp_path / "m.md"],
         ("--markdown: only with",)),
        (["generate", "", "--backbone", "shapes", "--out", tmp_path / "g"], ("PROMPT", "prompt 1 of 1 is empty")),
        (["generate", "a circle", "  ", "--backbone", "shapes", "--correct", "--out", tmp_path / "g"],
         ("PROMPT", "prompt 2 of 2 is empty")),
    ]
    for argv, texts in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        one_line_error(err, *texts)
    assert not out.exists() and not (tmp_path / "g").exists()


def test_prompts_says_when_records_repeat(tmp_path, capsys):
    code, out, _ = run(["prompts", tmp_path / "a.jsonl"], capsys)  # the whole split: every prompt once
    assert code == 0 and "distinct" not in out
    code, out, _ = run(["prompts", tmp_path / "b.jsonl", "-n", 600], capsys)
    assert code == 0
    distinct = len({json.loads(line)["prompt"] for line in (tmp_path / "b.jsonl").read_text().splitlines()})
    assert f"wrote 600 heldout records to {tmp_path / 'b.jsonl'} ({distinct} distinct prompts: the heldout split " \
           "holds" in out and distinct < 600


def test_train_checks_its_prompt_files_and_backbone_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_work(monkeypatch)
    config = ROOT / "configs" / "shapes.yaml"
    cases = [
        (["--set", f"data.prompts={tmp_path / 'missing.jsonl'}"], ("train config data.prompts", "no such file")),
        (["--set", f"data.monitor_prompts={tmp_path / 'missing.jsonl'}"],
         ("train config data.monitor_prompts", "no such file")),
        (["--set", f"backbone.name={tmp_path / 'no' / 'pipeline'}"], ("train config backbone.name", "no folder at")),
        (["--set", f"backbone.name={tmp_path}"], ("train config backbone.name", "no model_index.json")),
    ]
    for extra, texts in cases:
        code, _, err = run(["train", config, "--out", tmp_path / "run", *extra], capsys)
        assert code == 2, (extra, err)
        one_line_error(err, *texts)
    assert not (tmp_path / "run").exists()


def test_train_checks_its_reward_settings_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_work(monkeypatch)
    config = ROOT / "configs" / "shapes_ppo.yaml"  # reward.options: {count_confidence: false, soft_count: false}
    for extra, texts in ((["--set", "reward.source=clip"], ("reward.options: ['count_confidence', 'soft_count'] are "
                                                            "not options of the 'clip' source",)),
                         (["--set", "reward.source=clip", "--set", "reward.options={model: ./no/clip}"],
                          ("train config reward.options.model: no folder at ./no/clip",)),
                         (["--set", "reward.source=geneval_evaluator"], ("never a training reward",))):
        code, _, err = run(["train", config, "--out", tmp_path / "run", *extra], capsys)
        assert code == 2, (extra, err)
        one_line_error(err, *texts)
    assert not (tmp_path / "run").exists()


def test_train_names_a_hub_backbone_that_is_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["train", ROOT / "configs" / "shapes.yaml", "--out", tmp_path / "run", "--set",
                        "backbone.name=someorg/not-cached-model"], capsys)
    assert code == 2, err
    one_line_error(err, "train config backbone.name", "HF_HUB_OFFLINE", "download it first")


def test_main_in_process_gives_the_hub_libraries_their_logging_back(tmp_path, capsys):
    """A program calling main() in-process kept diffusers/transformers logging at ERROR and, after --quiet, their
    progress bars off for the rest of the process; both come back as they were now."""
    from xlard import cli
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights absent")
    d = pytest.importorskip("diffusers.utils.logging")
    t = pytest.importorskip("transformers.utils.logging")
    h = pytest.importorskip("huggingface_hub.utils")

    def state():
        return d.get_verbosity(), d.is_progress_bar_enabled(), t.get_verbosity(), t.is_progress_bar_enabled(), \
            h.are_progress_bars_disabled(), h.logging.get_verbosity()  # the hub's level stayed at the command's

    before = state()
    try:
        d.set_verbosity(d.INFO)  # a caller's own setting, not the default
        for quiet in ([], ["--quiet"]):
            mine = state()
            assert run(["generate", "--backbone", "shapes", "--steps", "1", "--out", tmp_path / f"g{len(quiet)}",
                        *quiet, "a photo of a circle"], capsys)[0] == 0
            assert state() == mine, quiet
    finally:
        d.set_verbosity(before[0])


def test_train_quiet_turns_the_progress_bar_off(tmp_path, capsys, monkeypatch):
    """Every other command had --quiet; `xlard train --quiet` was "unrecognized arguments"."""
    from xlard import train

    seen = {}

    def fake_main(config, resume, out, overrides, check):
        seen.update(config=config, overrides=list(overrides))
        return 0

    monkeypatch.setattr(train, "main", fake_main)
    config = ROOT / "configs" / "shapes.yaml"
    assert run(["train", config, "--out", tmp_path / "run", "--set", "steps=3", "--quiet"], capsys)[0] == 0
    assert seen["overrides"] == ["steps=3", "log.progress=false"]
    assert run(["train", config, "--out", tmp_path / "run"], capsys)[0] == 0
    assert seen["overrides"] == []


def test_train_on_a_torchrun_process_other_than_the_first_draws_no_loading_bars(tmp_path, capsys, monkeypatch):
    """Every process of a torchrun run drew diffusers' "Loading weights" bars, interleaved; only process 0 does now
    (its own --quiet aside)."""
    from xlard import cli, train

    calls = []
    monkeypatch.setattr(cli, "_quiet_hub_logging", lambda progress_bars=True: calls.append(progress_bars))
    monkeypatch.setattr(train, "main", lambda config, resume, out, overrides, check: 0)
    config = ROOT / "configs" / "shapes.yaml"
    for rank, bars_off in (("1", True), ("0", False), (None, False)):
        calls.clear()
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        assert run(["train", config, "--out", tmp_path / "run"], capsys)[0] == 0
        assert (False in calls) == bars_off, (rank, calls)


def test_a_command_line_mistake_under_torchrun_prints_one_line_per_machine(tmp_path, capsys, monkeypatch):
    """Every torchrun process printed the same usage error (one line per process); only the first process of
    each machine (LOCAL_RANK 0) prints it now, every process still exits 2. An error met after parsing (which
    can differ between processes) is still printed by each."""
    from xlard import train

    config = ROOT / "configs" / "shapes.yaml"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # torchrun's
    for local_rank, printed in (("1", False), ("0", True), (None, True), ("", True)):
        if local_rank is None:
            monkeypatch.delenv("LOCAL_RANK", raising=False)
        else:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
        code, _, err = run(["train", config, "--out", tmp_path / "run", "--no-such-option"], capsys)
        assert code == 2
        assert (err.splitlines() == ["xlard train: error: unrecognized arguments: --no-such-option (see `xlard "
                                     "train --help`)"]) == printed and (err == "") != printed, (local_rank, err)
        code, _, err = run(["train", config, "--out", ""], capsys)  # an empty path: refused before any work
        assert code == 2 and bool(err) == printed, (local_rank, err)

    def refused(config, resume, out, overrides, check):
        raise ValueError("this process's own reason")

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # LOCAL_RANK outside torchrun (SLURM, accelerate): printed
    code, _, err = run(["render", "--bogus"], capsys)
    assert code == 2 and err.startswith("xlard render: error: ")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(train, "main", refused)
    code, _, err = run(["train", config, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.splitlines() == ["xlard train: error: this process's own reason"], err


def test_sigterm_during_train_ends_like_ctrl_c_and_restores_the_handler(tmp_path, capsys, monkeypatch):
    from xlard import train

    def terminated_main(config, resume, out, overrides, check):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
        pytest.fail("SIGTERM did not interrupt xlard train")

    monkeypatch.setattr(train, "main", terminated_main)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    code, _, err = run(["train", ROOT / "configs" / "shapes.yaml", "--out", tmp_path / "run"], capsys)
    assert code == 143
    assert err.splitlines() == ["xlard train: terminated (SIGTERM); every file written is complete (rerun with "
                                "--resume to continue from the last checkpoint)"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # A caller's own SIGTERM handler (a program that runs xlard's main in-process) is left alone.
    seen = []
    monkeypatch.setattr(train, "main", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or 0)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        code, _, err = run(["train", ROOT / "configs" / "shapes.yaml", "--out", tmp_path / "run"], capsys)
        assert code == 0 and seen == [signal.SIGTERM], err
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_render_names_a_record_no_layout_fits(tmp_path, capsys):
    """24 objects with a left-of relation fit the capacity check but no layout: a RuntimeError traceback before."""
    crowded = {"tag": "position", "prompt": "twelve squares left of twelve circles", "exclude": [],
               "include": [{"class": "circle", "count": 12}, {"class": "square", "count": 12,
                                                              "position": ["left of", 0]}]}
    prompts = write_records(tmp_path / "p.jsonl", [COUNTING, crowded])
    code, _, err = run(["render", tmp_path / "r", "--prompts", prompts, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, f"--prompts: {prompts}:2: could not lay out 24 objects", "use fewer or smaller objects")


@pytest.mark.parametrize("argv, flag", [
    (["prompts", "", "-n", "3"], "OUT"), (["render", "", "--prompts", "p.jsonl"], "OUT"),
    (["generate", "--backbone", "shapes", "--out", "", "a circle"], "--out"),
    (["eval", "--folder", "truth", "--json", ""], "--json"),
    (["eval", "--folder", "truth", "--results", " "], "--results"),
    (["eval", "--prompts", "p.jsonl", "--correct", "--out", ""], "--out"),
    (["eval", "--prompts", "p.jsonl", "--correct", "--markdown", ""], "--markdown"),
    (["eval", "--folder", ""], "--folder"), (["demo", "--out", ""], "--out"), (["train", ""], "CONFIG"),
    (["generate", "--backbone", "", "a circle"], "--backbone"),
])
def test_an_empty_path_is_one_usage_line(tmp_path, capsys, monkeypatch, argv, flag):
    """It was a traceback (prompts, eval --json/--results/--markdown, demo), the current folder (render,
    generate --out) or "not given" (eval --folder, --out)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2
    one_line_error(err, f"{flag}: the path is empty")
    assert list(tmp_path.iterdir()) == []


def test_demo_checks_its_set_prompt_files_before_making_its_folder(tmp_path, capsys, monkeypatch):
    """A --set data.prompts that does not exist failed after demo.json was written, which then blocked the
    corrected command ("already holds an earlier demo")."""
    from xlard.train import trainer

    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "d"
    code, _, err = run(["demo", "--set", f"data.prompts={tmp_path / 'nope.jsonl'}", "--out", out], capsys)
    assert code == 2
    one_line_error(err, f"train config data.prompts: no file at {tmp_path / 'nope.jsonl'}")
    assert not out.exists()


def test_a_paired_eval_that_judged_nothing_does_not_block_the_rerun(tmp_path, capsys, prompt_file, monkeypatch):
    out = tmp_path / "e"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "pairs.jsonl").write_text("")  # what a run that failed before its first batch leaves
    from xlard import evaluation

    seen = []
    monkeypatch.setattr(evaluation, "run_eval_cli", lambda args: seen.append(sorted(os.listdir(out))) or 0)
    assert run(["eval", "--correct", "--prompts", prompt_file, "--out", out], capsys)[0] == 0
    assert seen == [[]]
    (out / "pairs.jsonl").write_text('{"index": 0}\n')  # a judged pair: refused as before
    (out / "run.json").write_text("{}")
    code, _, err = run(["eval", "--correct", "--prompts", prompt_file, "--out", out], capsys)
    assert code == 2 and "holds an earlier run" in err


def test_the_two_evals_have_their_own_default_folders(tmp_path, capsys, prompt_file, monkeypatch):
    """`eval --backbone` then the paired `eval --correct`, both without --out as the docs show them, shared the
    default folder xlard-eval: the second was refused as "the outputs of `xlard eval`" (the user had run `xlard
    eval` both times) and --overwrite did not help."""
    monkeypatch.chdir(tmp_path)
    assert run(["eval", "--backbone", "shapes", "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    assert (tmp_path / "xlard-eval" / "xlard-run.json").is_file()
    few = tmp_path / "few.jsonl"
    few.write_text("".join(prompt_file.read_text().splitlines(keepends=True)[:2]))
    code, _, err = run(["eval", "--correct", "--prompts", few, "--seeds", "0", "--no-faithfulness", "--bootstrap",
                        "100", "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "xlard-eval-paired" / "pairs.jsonl").is_file()
    assert not (tmp_path / "xlard-eval" / "pairs.jsonl").exists()
    # where a user points both at one folder, the message names the command that wrote it as they typed it
    code, _, err = run(["eval", "--correct", "--prompts", prompt_file, "--out", tmp_path / "xlard-eval"], capsys)
    assert code == 2
    one_line_error(err, "holds the outputs of `xlard eval --backbone`")


def test_a_folder_holding_another_commands_run_is_refused(tmp_path, capsys, prompt_file):
    """generate into a render folder wrote its images beside the render's and replaced its manifest (neither
    run could be resumed); train and demo mixed their files in too."""
    rendered = tmp_path / "r"
    assert run(["render", rendered, "--prompts", prompt_file], capsys)[0] == 0
    before = sorted(p.name for p in rendered.iterdir())
    manifest = (rendered / "xlard-run.json").read_text()
    for argv, flag in ((["generate", "--backbone", "shapes", "--out", rendered, "a circle"], "--out"),
                       (["generate", "--backbone", "shapes", "--out", rendered, "--overwrite", "a circle"], "--out"),
                       (["eval", "--prompts", prompt_file, "--correct", "--out", rendered], "--out"),
                       (["demo", "--out", rendered], "--out"),
                       (["train", ROOT / "configs" / "shapes.yaml", "--out", rendered], None)):
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        line = one_line_error(err, "holds the outputs of `xlard render`")
        assert flag is None or f"{flag}: " in line
    assert sorted(p.name for p in rendered.iterdir()) == before
    assert (rendered / "xlard-run.json").read_text() == manifest
    assert run(["render", rendered, "--prompts", prompt_file, "--resume"], capsys)[0] == 0  # still resumable
    # the other way round; `eval --backbone` writes render's kind of folders, which it may --overwrite (see
    # test_eval_with_a_backbone_never_scores_stale_prompt_folders)
    generated = tmp_path / "g"
    generated.mkdir()
    (generated / "xlard-run.json").write_text('{"command": "generate", "settings": {}, "complete": true}')
    for argv in (["render", generated, "--prompts", prompt_file],
                 ["eval", "--backbone", "shapes", "--prompts", prompt_file, "--out", generated]):
        code, _, err = run(argv, capsys)
        assert code == 2
        one_line_error(err, "holds the outputs of `xlard generate`")


def test_an_unreadable_input_names_its_argument(tmp_path, capsys, prompt_file, monkeypatch):
    """Permission denied on an input was a bare "[Errno 13] Permission denied: 'unread.jsonl'" line. (The
    tests may run as root, which reads anything: the denial is simulated at open().)"""
    import builtins

    real_open = builtins.open
    denied = {str(prompt_file), str(ROOT / "configs" / "shapes.yaml")}

    def guarded(file, *args, **kwargs):
        if str(file) in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: guarded(self, "r", *a, **k).read())
    for argv, words in ((["render", tmp_path / "r", "--prompts", prompt_file], f"--prompts: cannot read {prompt_file}"),
                        (["train", ROOT / "configs" / "shapes.yaml", "--out", tmp_path / "t"],
                         "train config: cannot read")):
        code, _, err = run(argv, capsys)
        assert code == 2, err
        one_line_error(err, words, "Permission denied")
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


def test_plain_generate_overwrite_removes_a_corrected_runs_files(tmp_path, capsys):
    """A plain `generate --overwrite` over a `generate --correct` folder removed only the NNNN_seedS.png images:
    the old run's _base/_lam images and corrections.jsonl stayed beside the new image, under the new manifest."""
    from xlard import evaluation
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    try:
        evaluation.shipped_corrector_path("shapes")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "g"
    assert run(["generate", "two red circles", "--backbone", "shapes", "--correct", "--per-prompt", "2", "--out", out,
                "--quiet"], capsys)[0] == 0
    assert (out / "corrections.jsonl").is_file() and (out / "0001_seed1_lam.png").is_file()
    code, _, err = run(["generate", "a green triangle", "--backbone", "shapes", "--out", out, "--overwrite",
                        "--quiet"], capsys)
    assert code == 0 and "removed 7 outputs of the earlier run" in err
    assert sorted(p.name for p in out.iterdir()) == ["0000_seed0.png", "xlard-run.json"]


# --------------------------------------------------------------------------------------------
# Options of another eval form, records no image can pass (from a fresh-eyes probe of the CLI)


def test_eval_refuses_options_its_form_does_not_use(tmp_path, capsys, prompt_file):
    """--out, --steps, --device, --seed, --resume ... were ignored without a word by the forms that score existing
    images; --backbone silently generated new images instead of scoring --images."""
    folder = tmp_path / "r"
    assert run(["render", folder, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    images = tmp_path / "imgs"
    images.mkdir()
    for flags, named in ((["--out", tmp_path / "zz"], "--out"), (["--steps", 5], "--steps"),
                         (["--device", "cuda"], "--device"), (["--seed", 0], "--seed"), (["--resume"], "--resume"),
                         (["--overwrite"], "--overwrite"), (["--batch", 8], "--batch"), (["--guidance", 3], "--guidance"),
                         (["--dtype", "bfloat16"], "--dtype")):
        code, _, err = run(["eval", "--folder", folder, "--quiet", *flags], capsys)
        assert code == 2, flags
        one_line_error(err, f"{named}: only when eval generates images", "--folder scores the images it is given")
        code, _, err = run(["eval", "--prompts", prompt_file, "--images", images, "--quiet", *flags], capsys)
        assert code == 2, flags
        one_line_error(err, f"{named}: only when eval generates images", "--prompts with --images")
    assert not (tmp_path / "zz").exists()
    code, _, err = run(["eval", "--prompts", prompt_file, "--images", images, "--backbone", "shapes",
                        "--out", tmp_path / "eb", "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--images: with --backbone eval generates its own images")
    assert not (tmp_path / "eb").exists()
    assert run(["eval", "--folder", folder, "--quiet"], capsys)[0] == 0  # the form itself still scores


def test_records_no_image_can_pass_are_refused_up_front(tmp_path, capsys, prompt_file):
    impossible = {"tag": "counting", "include": [{"class": "circle", "count": 1}],
                  "exclude": [{"class": "circle", "count": 1}], "prompt": "x"}
    records = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    bad = write_records(tmp_path / "bad.jsonl", records + [impossible])
    for argv in (["render", tmp_path / "r", "--prompts", bad, "--quiet"],
                 ["eval", "--prompts", bad, "--backbone", "shapes", "--out", tmp_path / "e", "--steps", 1, "--quiet"],
                 ["eval", "--prompts", bad, "--images", tmp_path, "--quiet"]):
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        one_line_error(err, f"--prompts: {bad}:13: record 'x' cannot be satisfied")
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_render_lays_out_every_record_before_writing_any(tmp_path, capsys, prompt_file):
    """A record no layout fits failed after every earlier prompt folder had been written."""
    crowded = {"tag": "position", "include": [{"class": "circle", "count": 12},
                                              {"class": "square", "count": 12, "position": ["left of", 0]}],
               "exclude": [], "prompt": "x"}
    records = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    bad = write_records(tmp_path / "bad.jsonl", records + [crowded])
    code, _, err = run(["render", tmp_path / "r", "--prompts", bad, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, f"--prompts: {bad}:13: ")
    assert not (tmp_path / "r").exists() or units(tmp_path / "r") == []


def test_an_interrupted_paired_eval_says_how_to_continue(tmp_path, capsys, monkeypatch, prompt_file):
    from xlard import evaluation

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "run_eval_cli", interrupted)
    code, _, err = run(["eval", "--prompts", prompt_file, "--correct", "--out", tmp_path / "e", "--quiet"], capsys)
    assert code == 130 and "rerun with --resume to continue" in err


def test_corrector_errors_name_the_option(tmp_path, capsys, prompt_file):
    code, _, err = run(["eval", "--prompts", prompt_file, "--corrector", tmp_path / "none", "--out", tmp_path / "e",
                        "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--corrector: corrector folder", "does not exist")
    code, _, err = run(["eval", "--prompts", prompt_file, "--correct", "--seeds", "0,0", "--out", tmp_path / "e",
                        "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--seeds: must be distinct non-negative integers")


def test_an_unknown_option_is_named_with_its_command(tmp_path, capsys):
    """argparse reported a subcommand's unknown option as `xlard: error: ... (see `xlard --help`)`."""
    code, _, err = run(["train", ROOT / "configs" / "shapes.yaml", "--overwrite"], capsys)
    assert code == 2
    line = one_line_error(err, "xlard train: error: unrecognized arguments: --overwrite",
                          "train has no --overwrite", "(see `xlard train --help`)")
    assert line.startswith("xlard train: ")
    code, _, err = run(["eval", "--folder", tmp_path, "--bogus"], capsys)
    assert code == 2
    one_line_error(err, "xlard eval: error: unrecognized arguments: --bogus (see `xlard eval --help`)")
    code, _, err = run(["eval"], capsys)
    assert code == 2
    one_line_error(err, "--prompts with --corrector DIR or --correct")


# --------------------------------------------------------------------------------------------
# File-system adversity (from a fresh-eyes probe)


def test_a_file_option_never_lands_on_the_runs_own_outputs(tmp_path, capsys, prompt_file):
    """--json OUT/xlard-run.json replaced the manifest (the run could no longer resume); --json OUT/pairs.jsonl
    every per-pair verdict."""
    out = tmp_path / "o"
    (out / "00001").mkdir(parents=True)  # the file options' folders exist (else they are refused for that)
    for flags, named in ((["--json", out / "xlard-run.json"], "--json"), (["--results", out / "00001" / "r.jsonl"],
                                                                          "--results")):
        code, _, err = run(["eval", "--backbone", "shapes", "--prompts", prompt_file, "--out", out, "--steps", 1,
                            "--quiet", *flags], capsys)
        assert code == 2
        one_line_error(err, f"{named}: ", "is one of the files the run writes in --out")
    for flags in (["--json", out / "pairs.jsonl"], ["--markdown", out / "run.json"]):
        code, _, err = run(["eval", "--prompts", prompt_file, "--correct", "--out", out, "--quiet", *flags], capsys)
        assert code == 2
        one_line_error(err, "is one of the files the run writes in --out")
    assert sorted(p.name for p in out.iterdir()) == ["00001"] and not any((out / "00001").iterdir())


def test_writer_temporaries_are_never_scored(tmp_path, capsys, prompt_file):
    """A killed image write leaves .tmp-*.png beside the samples: `eval --folder` read it as a sample."""
    folder = tmp_path / "r"
    assert run(["render", folder, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    code, out_clean, _ = run(["eval", "--folder", folder, "--quiet"], capsys)
    sample = next((folder / "00000" / "samples").glob("*.png"))
    (sample.parent / ".tmp-1a2b3c4d-0000.png").write_bytes(sample.read_bytes())
    code, out_tmp, err = run(["eval", "--folder", folder, "--quiet"], capsys)
    assert code == 0 and out_tmp == out_clean, err


def test_an_entry_of_an_outputs_name_but_the_wrong_kind_is_refused_before_anything_is_deleted(tmp_path, capsys,
                                                                                              prompt_file):
    """--overwrite deleted the earlier folders, then failed on a file named like a prompt folder."""
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    import shutil

    shutil.rmtree(out / "00002")
    (out / "00002").write_text("x")
    for flag in ("--overwrite", "--resume"):
        code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", flag], capsys)
        assert code == 2
        one_line_error(err, "00002 has the name of one of this command's outputs but is not a folder",
                       "nothing was changed")
        assert (out / "00000").is_dir() and (out / "00001").is_dir()


def test_overwrite_names_an_output_it_cannot_remove_before_removing_any(tmp_path, capsys, prompt_file, monkeypatch):
    out = tmp_path / "r"
    assert run(["render", out, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).endswith("00003") else real(p, mode, **k))
    code, _, err = run(["render", out, "--prompts", prompt_file, "--quiet", "--overwrite"], capsys)
    assert code == 2
    one_line_error(err, "--overwrite: cannot remove", "00003", "nothing was removed")
    assert len(units(out)) == 12


def test_dangling_links_and_names_too_long_are_named(tmp_path, capsys, prompt_file):
    link = tmp_path / "L"
    link.symlink_to(tmp_path / "nowhere")
    code, _, err = run(["render", link, "--prompts", prompt_file, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "is a dangling link")
    long_name = tmp_path / ("a" * 256)
    for argv in (["render", long_name, "--prompts", prompt_file, "--quiet"], ["prompts", long_name, "-n", 2]):
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        one_line_error(err, "File name too long")


def test_train_into_a_read_only_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """eval, generate and demo exit 2 on an output folder they cannot write; train exited 1 (a system error)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_work(monkeypatch)
    import errno

    from xlard import _io

    def read_only(path, owner="xlard"):  # what a read-only file system answers (EROFS: an OSError, no subclass)
        raise OSError(errno.EROFS, f"{owner}: cannot create {path}: Read-only file system")

    monkeypatch.setattr(_io, "check_writable_folder", read_only)
    config = tmp_path / "c.yaml"
    config.write_text("steps: 1\n")
    code, _, err = run(["train", str(config), "--out", str(tmp_path / "ro")], capsys)
    assert code == 2, err
    one_line_error(err, "--out", "Read-only file system")


def test_render_without_pillow_says_so_before_any_work(tmp_path, capsys, prompt_file, monkeypatch):
    """It printed "render: 1/3 prompt" and wrote xlard-run.json before "needs pillow"."""
    from xlard import _optional

    real = _optional.require

    def no_pillow(module, user):
        if module.startswith("PIL"):
            raise ImportError(_optional.missing_message(module, user))
        return real(module, user)

    monkeypatch.setattr(_optional, "require", no_pillow)
    out = tmp_path / "r"
    code, _, err = run(["render", str(out), "--prompts", prompt_file, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "xlard render needs pillow: pip install 'xlard[method]'")
    assert not out.exists()


def test_a_geneval_folder_is_scored_whole_or_refused(tmp_path, capsys, prompt_file):
    """eval --folder skipped a prompt folder whose metadata.jsonl was gone (22/22 for 12 prompts, a tag dropped),
    scored a non-index "junk" folder, said nothing of missing indices or of a manifest's count, wrote --results
    over a record it read, scored an unsatisfiable record as a failure and showed no progress."""
    import shutil

    full = tmp_path / "r1"
    assert run(["render", full, "--prompts", prompt_file, "--per-prompt", 2, "--quiet"], capsys)[0] == 0

    def copy(name, keep_manifest=False):
        folder = tmp_path / name
        shutil.copytree(full, folder)
        if not keep_manifest:
            (folder / "xlard-run.json").unlink()
        return folder

    a = copy("a")
    (a / "00003" / "metadata.jsonl").unlink()
    code, _, err = run(["eval", "--folder", a, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--folder: ", "00003: a prompt folder without a metadata.jsonl file")
    b = copy("b")
    shutil.copytree(full / "00000", b / "junk")  # not GenEval's: left alone
    code, out, err = run(["eval", "--folder", b, "--quiet"], capsys)
    assert code == 0 and "24" in out and "25" not in out
    gap = copy("gap")
    shutil.rmtree(gap / "00004")
    shutil.rmtree(gap / "00007")
    code, out, err = run(["eval", "--folder", gap, "--quiet"], capsys)
    assert code == 0 and "note: --folder: 2 prompt folder(s) missing between 0 and 11 (4, 7): the score covers the " \
                         "10 present" in err
    kept = copy("kept", keep_manifest=True)
    shutil.rmtree(kept / "00005")
    code, _, err = run(["eval", "--folder", kept, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "holds 11 of the 12 prompt folders its `xlard render` run wrote; rerun that command with "
                        "--resume")
    ow = copy("ow")
    before = (ow / "00000" / "metadata.jsonl").read_text()
    code, _, err = run(["eval", "--folder", ow, "--results", ow / "00000" / "metadata.jsonl", "--quiet"], capsys)
    assert code == 2 and (ow / "00000" / "metadata.jsonl").read_text() == before
    one_line_error(err, "--results: ", "lies inside --folder", "which is being read")
    code, _, err = run(["eval", "--prompts", prompt_file, "--images", ow / "00000" / "samples", "--json",
                        ow / "00000" / "samples" / "0000.png", "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "--json: ", "lies inside --images")
    unsat = copy("unsat")
    (unsat / "00000" / "metadata.jsonl").write_text(json.dumps(
        {"tag": "counting", "include": [{"class": "square", "count": 1}], "exclude": [{"class": "square", "count": 1}],
         "prompt": "a photo of a square"}) + "\n")
    code, _, err = run(["eval", "--folder", unsat, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "00000/metadata.jsonl: record 'a photo of a square' cannot be satisfied")
    code, _, err = run(["eval", "--folder", copy("shown")], capsys)  # progress, as --images shows it
    assert code == 0 and "12/12" in err


def test_resume_remakes_incomplete_prompt_folders(tmp_path, capsys, prompt_file):
    """--resume reused any prompt folder that existed: one with a sample deleted stayed short, an emptied one was
    scored as nothing (22/22)."""
    import shutil

    out = tmp_path / "m"
    assert run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet"], capsys)[0] == 0
    (out / "00005" / "samples" / "0001.png").unlink()
    for child in (out / "00006").iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    code, out_text, err = run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet", "--resume"],
                              capsys)
    assert code == 0 and "wrote 2 prompt folders" in out_text and "(10 reused)" in out_text
    assert (out / "00005" / "samples" / "0001.png").is_file() and (out / "00006" / "metadata.jsonl").is_file()
    code, out_text, _ = run(["eval", "--folder", out, "--quiet"], capsys)
    assert code == 0 and "24" in out_text


def test_prompt_file_errors_name_the_line_the_reader_counts(tmp_path, capsys):
    """A BOM, CRLF line ends and a blank line before a bad record: the error said line 2 for line 3."""
    good = json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}], "exclude": [],
                       "prompt": "a photo of a circle"})
    bad = json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [],
                      "prompt": "a photo of a dog"})
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff\r\n".encode() + good.encode() + b"\r\n" + "\u00a0\n".encode() + bad.encode() + b"\r\n")
    code, _, err = run(["render", tmp_path / "x", "--prompts", path, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, f"{path}:4: ")


def test_resume_never_remakes_a_linked_prompt_folder(tmp_path, capsys, prompt_file):
    """A prompt folder linked in from elsewhere, incomplete: --resume replaced (and deleted) the folder the link
    pointed at, outside OUT, with a note kept there."""
    out = tmp_path / "R"
    assert run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet"], capsys)[0] == 0
    outside = tmp_path / "ext"
    outside.mkdir()
    (out / "00001").rename(outside / "00001")
    (out / "00001").symlink_to(outside / "00001", target_is_directory=True)
    (outside / "00001" / "samples" / "0001.png").unlink()
    (outside / "00001" / "samples" / "mynote.txt").write_text("keep")
    code, _, err = run(["render", out, "--prompts", prompt_file, "--per-prompt", 2, "--quiet", "--resume"], capsys)
    assert code == 2 and (outside / "00001" / "samples" / "mynote.txt").read_text() == "keep"
    one_line_error(err, "--resume: ", "00001 is incomplete and a link", "complete or remove it by hand")


def test_folder_gaps_are_counted_without_the_range_and_unnumbered_folders_named(tmp_path, capsys, prompt_file):
    """The gap note built range(max + 1): a prompt folder named 30000000 took 3.3 GB; folders not named by numbers
    (scored before) got "no <index>/metadata.jsonl folders" although they hold one."""
    import shutil

    full = tmp_path / "r1"
    assert run(["render", full, "--prompts", prompt_file, "--quiet"], capsys)[0] == 0
    far = tmp_path / "far"
    far.mkdir()
    shutil.copytree(full / "00000", far / "0")
    shutil.copytree(full / "00001", far / "30000000")
    code, _, err = run(["eval", "--folder", far, "--quiet"], capsys)
    assert code == 0 and "note: --folder: 29999999 prompt folder(s) missing between 0 and 30000000 (1, 2, 3, 4, 5, " \
                         "6, 7, 8 ...)" in err
    named = tmp_path / "named"
    named.mkdir()
    shutil.copytree(full / "00000", named / "prompt_a")
    code, _, err = run(["eval", "--folder", named, "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "its prompt folders are not named by numbers (e.g. 'prompt_a')")


def test_a_setting_the_backbone_refuses_is_named_by_its_flag(tmp_path, capsys):
    """--guidance 3 on a schnell-kind FLUX folder was blamed on --backbone ("could not be loaded: guidance_scale:
    ...")."""
    from tiny_pipelines import tiny_flux_pipeline

    folder = tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    capsys.readouterr()  # the tiny pipeline's own build output
    code, _, err = run(["generate", "a photo of two cats", "--backbone", folder, "--guidance", 3, "--steps", 1,
                        "--out", tmp_path / "g", "--quiet"], capsys)
    assert code == 2
    one_line_error(err, "xlard generate: error: --guidance: this FluxPipeline has no guidance embedding", "got 3.0")


def test_abbreviated_options_are_refused(capsys):
    """argparse took `demo --seed 1` as `--seeds 1` and started a full default demo (minutes of work no one asked
    for); every command refuses an abbreviation now, naming it."""
    for argv, word in ((["demo", "--seed", 1], "--seed 1"), (["eval", "--fold", "x"], "--fold x"),
                       (["generate", "a cat", "--backbone", "shapes", "--per", 2], "--per 2"),
                       # no command: the unknown option is named, not just "required: command"
                       (["--vers"], "--vers"), (["-q=3", "--x"], "-q=3 --x")):
        code, _, err = run(argv, capsys)
        assert code == 2
        one_line_error(err, f"unrecognized arguments: {word}")
    code, _, err = run(["--"], capsys)  # no option there: the missing command is the mistake
    assert code == 2 and "unrecognized" not in one_line_error(err, "the following arguments are required: command")
    parser = cli.build_parser()  # one parser, two parses: the first one's words are not the second's
    with pytest.raises(cli.UsageError, match="unrecognized arguments: --vers"):
        parser.parse_args(["--vers"])
    with pytest.raises(cli.UsageError, match="the following arguments are required: command"):
        parser.parse_known_args([])


def test_a_missing_weights_file_is_one_line_on_stderr(tmp_path):
    """diffusers logged "An error occurred while trying to fetch ..." on a line of its own before xlard's error."""
    import subprocess
    import sys

    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "pipe")
    for weights in (pipe / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    out = subprocess.run([sys.executable, "-m", "xlard", "generate", "a red circle", "--backbone", str(pipe),
                          "--steps", "2", "--out", str(tmp_path / "g"), "--quiet"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("xlard generate: error: --backbone:"), out.stderr
    # xlard train too (its loader quieted diffusers to ERROR over the CLI's setting)
    out = subprocess.run([sys.executable, "-m", "xlard", "train", "configs/shapes.yaml", "--set",
                          f"backbone.name={pipe}", "--out", str(tmp_path / "run"), "--quiet"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         cwd=str(Path(__file__).resolve().parents[1]))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("xlard train: error:"), out.stderr
