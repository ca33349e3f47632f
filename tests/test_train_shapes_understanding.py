"""scripts/train_shapes_understanding.py: options, data from the renderer's ground truth, a tiny
run that exports loadable weights, and resuming from its checkpoint."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import train_shapes_understanding as T  # noqa: E402

from xlard.shapes import understanding as U  # noqa: E402


def test_options_are_validated():
    cfg = T.parse_args(["--out", "o", "--max-steps", "5", "--channels", "4", "4", "4", "4"])
    assert cfg.max_steps == 5 and cfg.channels == (4, 4, 4, 4)
    with pytest.raises(SystemExit):  # no default --out: a plain run replaced the shipped weights
        T.parse_args(["--max-steps", "5"])
    for bad in (["--max-steps", "0"], ["--crop", "8"], ["--vae-share", "1.5"], ["--corrupt", "-0.1"],
                ["--morph", "2"], ["--morph-min-iou", "-1"], ["--lr", "nan"], ["--lr", "0"], ["--lr", "1e300"], ["--threads", "0"],
                ["--weight-decay", "-1"], ["--final-lr-fraction", "2"], ["--channels", "8", "8"], ["--seed", "-1"],
                ["--vae-noise", "nan"], ["--log-every", "0"],
                ["--threads", "100000"], ["--batch-size", "100000000"], ["--vae-pool", "10000000"],
                ["--work-dir", "/proc/no/such"]):  # 100000 threads crashed, 10^8 a batch hung
        with pytest.raises(SystemExit):
            T.parse_args(["--out", "o"] + bad)
    with pytest.raises(SystemExit):  # outputs: before training
        T.parse_args(["--out", "/proc/no/such"])


def test_a_backbone_folder_is_named_when_unused_or_missing(capsys, tmp_path):
    """--backbone is read only for the VAE pool: with it off (the default) a mistyped folder went unnoticed."""
    for args, words in ((["--backbone", str(tmp_path)], "--backbone .* is read only for the VAE pool, which is off"),
                        (["--backbone", "/no/such", "--vae-share", "0.5"],
                         "--backbone: no pipeline folder at /no/such")):
        with pytest.raises(SystemExit):
            T.parse_args(["--out", "o"] + args)
        assert re.search(words, capsys.readouterr().err)
    assert T.parse_args(["--out", "o", "--backbone", str(tmp_path), "--vae-share", "0.5"]).backbone == str(tmp_path)


def test_batches_come_from_ground_truth_and_corruptions_are_unlabelled():
    rng = np.random.default_rng(0)
    records = T.make_splits(T.PromptConfig(), seed=0)["train"]
    config = U.UnderstandingConfig()
    x, s, c = T.render_batch(rng, records, 6, 0.5, config)
    assert x.shape == (6, 3, 64, 64) and s.shape == c.shape == (6, 64, 64)
    assert ((s > 0) <= (c > 0)).all()  # every shape core is colored
    # Two-tone objects lose their shape label; their pixels keep their colors.
    from xlard.shapes.world import Scene, SceneObject

    scene = Scene(64, (SceneObject("square", "red", (10, 10, 30, 30)),))
    image = scene.render()
    shape, color = U.scene_targets(scene, config)
    T.corrupt_scene(image, shape, color, scene, np.random.default_rng(1), 1.0, config)
    assert (shape == 0).all()
    assert len(set(np.unique(color[10:30, 10:30]).tolist())) == 2


def test_superellipses_span_diamond_circle_square():
    iou = lambda a, b: float((a & b).sum()) / float((a | b).sum())  # noqa: E731
    assert iou(T.superellipse_mask(1.0, 20, 20), T.shape_mask("diamond", 20, 20)) > 0.95
    assert iou(T.superellipse_mask(2.0, 20, 20), T.shape_mask("circle", 20, 20)) > 0.95
    assert iou(T.superellipse_mask(50.0, 20, 20), T.shape_mask("square", 20, 20)) > 0.95


def test_morphed_objects_are_labelled_by_the_shape_they_overlap_best_or_none():
    from xlard.shapes.world import Scene, SceneObject

    config = U.UnderstandingConfig()
    seen = set()
    for seed in range(40):
        scene = Scene(64, (SceneObject("circle", "blue", (10, 10, 30, 30)),
                           SceneObject("triangle", "red", (40, 40, 56, 56))))
        image = scene.render()
        shape, color = U.scene_targets(scene, config)
        before = image.copy()
        T.morph_scene(image, shape, color, scene, np.random.default_rng(seed), 1.0, config, 0.85)
        # the triangle is never morphed; the object keeps its color on exactly its new pixels
        assert (image[40:56, 40:56] == before[40:56, 40:56]).all()
        drawn = (image[10:30, 10:30] == np.array([0, 0, 0]) + T.PALETTE["blue"]).all(-1)
        assert ((color[10:30, 10:30] == 1 + config.colors.index("blue")) == drawn).all()
        assert ((image[10:30, 10:30] == np.array(scene.background)).all(-1) == ~drawn).all()
        labels = set(np.unique(shape[10:30, 10:30]).tolist()) - {0}
        assert len(labels) <= 1
        ious = {n: float((T.shape_mask(n, 20, 20) & drawn).sum()) / float((T.shape_mask(n, 20, 20) | drawn).sum())
                for n in T.MORPHABLE}
        best = max(ious, key=ious.get)
        if ious[best] >= 0.85:
            assert labels == {1 + config.shapes.index(best)}
            seen.add(best)
        else:
            assert labels == set()
            seen.add(None)
    assert len(seen) >= 3  # several outcomes over the seeds: relabelled shapes and unlabelled blobs


def test_augment_keeps_targets_aligned_and_images_in_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    s = torch.arange(16).repeat(4, 16, 1)
    c = s.clone()
    xa, sa, ca = T.augment(x, s, c, gen)
    assert xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(sa, ca)
    flipped = sa[:, 0, 0] == 15
    assert flipped.any() and (~flipped).any()
    xc, sc, cc = T.random_crop(xa, sa, ca, 8, gen)
    assert xc.shape == (4, 3, 8, 8) and sc.shape == (4, 8, 8)


def test_tiny_run_exports_weights_and_resumes(tmp_path, capsys):
    args = ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--max-steps", "3",
            "--batch-size", "2", "--vae-pool", "0", "--channels", "4", "4", "4", "4", "--log-every", "1"]
    assert T.main(args) == 0
    model = U.ShapesUnderstanding.from_pretrained(tmp_path / "out")
    assert model.config.channels == (4, 4, 4, 4)
    info = json.loads((tmp_path / "out" / "config.json").read_text())["training"]
    assert info["steps"] == 3 and info["config"]["seed"] == 0
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    capsys.readouterr()
    # rows logged after the checkpoint (an interrupted run's last steps) are replayed: they were logged twice
    with open(tmp_path / "work" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    # the temporaries of checkpoint writes killed mid-way (SIGKILL) stayed behind for good, one per kill
    leftovers = [tmp_path / "work" / ".tmp-0badc0de-checkpoint.pt", tmp_path / "work" / ".tmp-12345678-x"]
    leftovers[0].write_bytes(b"x" * 1000)
    leftovers[1].mkdir()
    assert T.main(args) == 0  # the finished checkpoint is picked up, not retrained
    assert "resumed at step 3" in capsys.readouterr().err
    assert not any(p.exists() for p in leftovers)
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # where it writes, logging, threads and the budget may change on a resume; anything else is named
    assert T.main(args[:-2] + ["--log-every", "2", "--threads", "2", "--max-steps", "3"]) == 0
    with pytest.raises(ValueError, match=r"written with other settings \(--batch-size 2 -> 3\)"):
        T.train(T.parse_args([a if a != "2" else "3" for a in args]))
    # a diverged run stops before exporting (it wrote NaN weights and exited 0)
    bad = ["--out", str(tmp_path / "out2"), "--work-dir", str(tmp_path / "work2"), "--max-steps", "40",
           "--batch-size", "2", "--vae-pool", "0", "--channels", "4", "4", "4", "4", "--lr", "1", "--log-every", "40"]
    cfg = T.parse_args(bad)
    original = T.F.cross_entropy
    calls = []

    def nan_after_two(*a, **k):  # a divergence, deterministically
        calls.append(1)
        return original(*a, **k) * (float("nan") if len(calls) > 4 else 1.0)

    T.F.cross_entropy = nan_after_two
    try:
        with pytest.raises(ValueError, match=r"training diverged at step 3 \(loss nan\); lower --lr"):
            T.train(cfg)
    finally:
        T.F.cross_entropy = original
    assert not (tmp_path / "out2").exists()
    # one run per work dir at a time
    from helpers import hold_folder_in_subprocess

    proc = hold_folder_in_subprocess(tmp_path / "work")
    try:
        with pytest.raises(Exception, match="--work-dir: .* is in use by another running xlard process"):
            T.main(args)
    finally:
        proc.communicate("", timeout=60)


def test_sigterm_ends_the_script_in_one_line(tmp_path):
    """SIGTERM (a scheduler stopping the job) killed the script silently; now it ends like Ctrl-C, with the way
    to continue."""
    from helpers import sigterm_once

    work = tmp_path / "work"
    code, err = sigterm_once([sys.executable, T.__file__, "--out", str(tmp_path / "out"), "--work-dir", str(work),
                              "--minutes", "5", "--log-every", "1"], (work / "metrics.jsonl").exists,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 143, err
    assert err.strip().splitlines()[-1] == ("train_shapes_understanding.py: terminated (SIGTERM); every file written "
                                            "is complete (rerun the same command to continue from the last checkpoint)")
    assert "Traceback" not in err and not list(tmp_path.rglob(".tmp-*"))


def test_folders_of_other_tools_are_refused_and_a_damaged_checkpoint_is_named(tmp_path, capsys):
    """--out given a corrector's folder replaced its weights and config (a broken corrector); --work-dir given a
    training run's folder appended to its metrics; a damaged checkpoint.pt was a traceback."""
    from helpers import fake_corrector_folder

    corrector = fake_corrector_folder(tmp_path / "corrector")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-00000001.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    eyes = tmp_path / "eyes"
    eyes.mkdir()
    (eyes / "config.json").write_text('{"model": {"latent_channels": 8}}')
    for args, words in ((["--out", str(corrector)], "--out: .*corrector holds a corrector"),
                        (["--out", str(eyes)], "--out: .*eyes holds a config.json of something else"),
                        (["--out", "o", "--work-dir", str(run)], "--work-dir: .*run holds the checkpoints of `xlard "
                                                                 "train`")):
        with pytest.raises(SystemExit):
            T.parse_args(args)
        assert re.search(words, capsys.readouterr().err)
    own = tmp_path / "own"  # an earlier export of this script (and notes beside it) is retrained in place
    own.mkdir()
    (own / "config.json").write_text('{"model": {"core_radius": 1, "image_size": 64}}')
    (own / "model.safetensors").write_bytes(b"x")
    (own / "agreement_heldout.md").write_text("notes")
    assert T.parse_args(["--out", str(own), "--work-dir", str(own)]).out == str(own)
    (own / "config.json").write_text("{")  # its own, damaged: said so, not "of something else"
    with pytest.raises(SystemExit):
        T.parse_args(["--out", str(own)])
    assert "holds a config.json that is not JSON (damaged? remove it to write here)" in capsys.readouterr().err
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    cfg = T.parse_args(["--out", str(tmp_path / "o"), "--work-dir", str(work), "--max-steps", "1", "--vae-pool", "0"])
    with pytest.raises(ValueError, match=r"--work-dir: .*checkpoint.pt cannot be read \(.*\): it is damaged; delete "
                                         r"it to start the run over"):
        T.train(cfg)
    torch.save({"something": "else"}, work / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a checkpoint of this script"):
        T.train(cfg)
