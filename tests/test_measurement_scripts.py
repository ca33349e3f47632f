"""scripts/eval_shapes_backbone.py and scripts/measure_eval_cost.py: a bad option is one usage line naming it,
before any model loads (a ZeroDivisionError, FileNotFoundError or RuntimeError traceback before)."""
from __future__ import annotations

import json
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


def test_eval_shapes_backbone_bounds_the_last_image_seed(capsys):
    """Image i is seeded --seed + i: 2**64 failed only after the pipeline had loaded, naming "seed", not --seed."""
    for seed, n in ((2 ** 64, 1), (2 ** 64 - 1, 2)):
        with pytest.raises(SystemExit) as e:
            EB.parse_args(["--seed", str(seed), "--n", str(n)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--seed: image i is generated with seed --seed + i, which must be below " \
            f"2**64: with --n {n}, --seed must be at most {2 ** 64 - n}, got {seed}" in err, err
    assert EB.parse_args(["--seed", str(2 ** 64 - 2), "--n", "2"]).seed == 2 ** 64 - 2


def test_eval_shapes_backbone_refuses_an_out_dir_with_earlier_outputs(tmp_path, capsys):
    """A user's results.jsonl or eval_heldout.md in --out-dir was replaced without a word, after the whole run."""
    for name in ("results.jsonl", "eval_heldout.md", "eval_heldout.json"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text("mine\n")
        with pytest.raises(SystemExit) as e:
            EB.parse_args(["--n", "2", "--out-dir", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--out-dir: {out} already holds outputs of an earlier run ({name}); add " \
            "--overwrite to replace them" in err, err
        assert EB.parse_args(["--n", "2", "--out-dir", str(out), "--overwrite"]).overwrite
        assert (out / name).read_text() == "mine\n"
    images = tmp_path / "pictures" / "images"
    images.mkdir(parents=True)
    (images / "0001.png").write_bytes(b"mine")
    EB.parse_args(["--n", "1", "--out-dir", str(images.parent), "--save-images"])  # 0001.png is not written
    EB.parse_args(["--n", "2", "--out-dir", str(images.parent)])  # no images written
    (images / "00000.png").write_bytes(b"mine")  # no name the script writes (it writes 0000.png)
    (images / "0001.png").rename(images / "mine-0001.png")
    EB.parse_args(["--n", "2", "--out-dir", str(images.parent), "--save-images"])
    (images / "mine-0001.png").rename(images / "0001.png")
    for argv, text in ((["--n", "2", "--out-dir", str(images.parent), "--save-images"],
                        "already holds outputs of an earlier run (images/0001.png)"),
                       (["--overwrite"], "--overwrite needs --out-dir")):
        with pytest.raises(SystemExit) as e:
            EB.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err, err
    odd = tmp_path / "odd"
    (odd / "results.jsonl").mkdir(parents=True)
    (odd / "images").write_text("")
    for argv, text in ((["--out-dir", str(odd), "--overwrite"], f"--out-dir: {odd / 'results.jsonl'} is a folder"),
                       (["--out-dir", str(odd), "--save-images"], f"--out-dir: {odd / 'images'} exists and is not a "
                                                                  "folder")):
        with pytest.raises(SystemExit) as e:
            EB.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err, err


def test_eval_shapes_backbone_writes_only_its_own_files(tmp_path, capsys, monkeypatch):
    """--save-images deleted every images/NNNN.png of the folder (a user's 0001-0003.png with --n 1) and the
    reports were written with plain write_text; --overwrite now removes only the images the earlier run recorded."""
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    out = tmp_path / "eval"
    (out / "images").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    for i in (2, 3):
        (out / "images" / f"{i:04d}.png").write_bytes(b"mine")
    common = ["--steps", "1", "--threads", "1", "--out-dir", str(out)]
    assert EB.main(["--n", "2", "--save-images", *common]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert (out / "images" / "0002.png").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "eval_heldout.json").read_text())
    assert report["saved_images"] == 2 and "overwrite" not in report["settings"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert not [p for p in out.rglob(".tmp*")]
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before --out-dir was checked")

    with monkeypatch.context() as m:
        m.setattr(shapes_backbone, "load_pipeline", no_load)
        with pytest.raises(SystemExit) as e:
            EB.main(["--n", "1", *common])
    assert e.value.code == 2 and "add --overwrite" in capsys.readouterr().err
    # --overwrite with one image: 0001.png (the earlier run's) goes, the user's 0002/0003.png stay
    assert EB.main(["--n", "1", "--save-images", "--overwrite", *common]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0002.png", "0003.png"]
    assert json.loads((out / "eval_heldout.json").read_text())["saved_images"] == 1
    assert EB.main(["--n", "1", "--overwrite", *common]) == 0  # no images now: the earlier run's one goes
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0002.png", "0003.png"]
    assert (out / "notes.txt").read_text() == "mine" and not [p for p in out.rglob(".tmp*")]


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a file-size limit (RLIMIT_FSIZE) as on Linux")
def test_measure_eval_cost_keeps_the_earlier_out_when_the_write_fails(tmp_path):
    """--out was written with open() and json.dump: a write cut by a file-size limit (or a full disk) destroyed the
    earlier results and left invalid JSON, and "[Errno 27] File too large" named no flag."""
    import resource
    import subprocess

    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    out = tmp_path / "cost.json"
    earlier = json.dumps({"records": 48, "settings": [{"correction_step": 1.0, "note": "x" * 1500}]})
    out.write_text(earlier)

    def limit_file_size():  # 1 KiB: the measurements (about 1.3 KB) cannot be written, reading is unaffected
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "measure_eval_cost.py"), "--records", "1",
                          "--seeds", "0", "--steps", "1.0", "--batch", "1", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("measure_eval_cost.py: error: measure_eval_cost --out: cannot write ") and \
        "File too large" in last and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert out.read_text() == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["cost.json"]
