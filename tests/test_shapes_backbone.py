"""The shapes backbone: the shipped pipeline loads offline and generates deterministically,
and the training script runs (and resumes) end to end on tiny settings."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xlard.shapes import backbone

ROOT = Path(__file__).resolve().parents[1]
# The package data, or $XLARD_SHAPES_BACKBONE when set (to test another trained folder).
SHIPPED = backbone.is_available()
needs_weights = pytest.mark.skipif(
    not SHIPPED, reason=f"shapes backbone weights absent at {backbone.backbone_path()}; "
                        f"train them with: {backbone.TRAIN_COMMAND}")


@pytest.fixture(scope="module")
def pipe():
    return backbone.load_pipeline("cpu")


@needs_weights
def test_shipped_pipeline_is_a_small_stable_diffusion_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    size = sum(p.stat().st_size for p in backbone.backbone_path().rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024, f"shipped backbone is {size / 1e6:.1f} MB, over the 20 MB budget"


@needs_weights
def test_tokenizer_keeps_world_words_whole_and_aligns(pipe):
    from xlard.prompts import parse

    tok = pipe.tokenizer
    for word in ("circle", "triangles", "purple", "diamonds", "eight", "left", "below", "photo"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    spec = parse("a photo of three red circles left of a blue square", tok)
    # BOS a photo of three red circles ... : "circles" is token 6, "square" token 11.
    assert [e.token_indices for e in spec.entities] == [(6,), (11,)]
    assert [e.color_token_indices for e in spec.entities] == [(5,), (10,)]


@needs_weights
def test_unknown_words_are_the_words_the_tokenizer_spells_out(pipe, tmp_path):
    words = ["12", "tiny", "dragon", "un", "cercle"]
    for word in words:  # what "never saw" means: no whole-word token
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) > 1, word
    assert backbone.unknown_words("A photo of 12 TINY red dragon, a dragon and un cercle") == words
    assert backbone.unknown_words("a photo of three red circles left of a blue square") == []
    # other scripts and symbols are words too ("café" was cut to "caf", CJK and emoji were missed)
    assert backbone.unknown_words("a photo of a red café, a naïve circle!") == ["café", "naïve"]
    assert backbone.unknown_words("🐉 一只红色的圆") == ["🐉", "一只红色的圆"]
    assert backbone.unknown_words("a dragon", tmp_path) == []  # no tokenizer there: nothing to tell


_TOKENIZER = backbone.DEFAULT_PATH / "tokenizer" / "tokenizer.json"


@pytest.mark.skipif(not _TOKENIZER.is_file(), reason="the shipped tokenizer is absent")
def test_unknown_words_reads_a_tokenizer_installed_or_retrained_later(tmp_path):
    """The vocabulary was cached per folder for good, "no tokenizer" included: a tokenizer copied in later, or
    retrained, was never read in that process."""
    import shutil

    prompt = "a photo of two red dragons"
    assert backbone.unknown_words(prompt, tmp_path) == []  # nothing to tell yet
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(_TOKENIZER, tmp_path / "tokenizer" / "tokenizer.json")
    assert backbone.unknown_words(prompt, tmp_path) == ["dragons"]
    data = json.loads(_TOKENIZER.read_text(encoding="utf-8"))
    data["model"]["vocab"]["dragons</w>"] = len(data["model"]["vocab"])  # retrained: now a whole word
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert backbone.unknown_words(prompt, tmp_path) == []


@pytest.mark.skipif(not (backbone.DEFAULT_PATH / "unet" / "config.json").is_file() or not _TOKENIZER.is_file(),
                    reason="the shipped backbone's configs are absent")
def test_the_module_docstring_describes_the_shipped_latents_and_tokenizer():
    """It said 16x16x4 latents (the UNet takes 8 channels) and a word-level tokenizer (a BPE one, with merges)."""
    unet = json.loads((backbone.DEFAULT_PATH / "unet" / "config.json").read_text(encoding="utf-8"))
    side, channels = unet["sample_size"], unet["in_channels"]
    doc = " ".join(backbone.__doc__.split())
    assert f"{side}x{side}x{channels} latents" in doc
    tokenizer = json.loads(_TOKENIZER.read_text(encoding="utf-8"))["model"]
    assert tokenizer["type"] == "BPE" and tokenizer["merges"] and "BPE tokenizer" in doc
    assert f"{len(tokenizer['vocab'])} tokens" in doc and "word-level" not in doc


@needs_weights
def test_generate_shapes_and_determinism(pipe):
    prompts = ["a photo of three red circles", "a photo of a blue square left of a green triangle"]
    a = backbone.generate(prompts, seed=7, steps=2, guidance=4.0, pipeline=pipe)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    b = backbone.generate(prompts, seed=7, steps=2, guidance=4.0, pipeline=pipe)
    np.testing.assert_array_equal(a, b)
    # Image i is seeded seed + i, whatever the batching.
    c = backbone.generate(prompts[1:], seed=8, steps=2, guidance=4.0, pipeline=pipe)
    np.testing.assert_allclose(c[0].astype(int), a[1].astype(int), atol=2)
    d = backbone.generate(prompts[:1], seed=9, steps=2, guidance=4.0, pipeline=pipe)
    assert np.abs(d[0].astype(int) - a[0].astype(int)).mean() > 1.0


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one prompt"):
        backbone.generate([], pipeline=object())
    with pytest.raises(ValueError, match="seed"):
        backbone.generate(["a photo of a circle"], seed=-1, pipeline=object())
    with pytest.raises(ValueError, match=r"seed must be a non-negative int with seed \+ 1"):  # uint64 math wrapped
        backbone.generate(["a photo of a circle"] * 2, seed=np.uint64(2**64 - 1), pipeline=object())
    with pytest.raises(ValueError, match="steps"):
        backbone.generate(["a photo of a circle"], steps=0, pipeline=object())
    one = ["a photo of a circle"]
    for kwargs, words in ((dict(steps=10**6), r"steps must be an int in \[1, 10000\]"),
                          (dict(guidance=float("nan")), "guidance must be a finite number"),  # silently no CFG
                          (dict(guidance=float("inf")), "guidance must be a finite number"),  # black images
                          (dict(guidance="5"), "guidance must be a finite number"),
                          (dict(seed=2**64), "seed must be a non-negative int"),
                          (dict(batch_size="2"), "batch_size must be an int")):
        with pytest.raises(ValueError, match=words):
            backbone.generate(one, pipeline=object(), **kwargs)
    with pytest.raises(ValueError, match=r"seed \+ 1 \(one seed per prompt\) at most 2\*\*64 - 1"):
        backbone.generate(one * 2, seed=2**64 - 1, pipeline=object())


def test_load_pipeline_checks_dtype_and_device_before_loading(tmp_path):
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        backbone.load_pipeline(dtype="float16", path=tmp_path / "nope")
    with pytest.raises(ValueError, match="load_pipeline: device"):
        backbone.load_pipeline(device="gpu", path=tmp_path / "nope")


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="train_shapes_backbone.py"):
        backbone.load_pipeline(path=tmp_path)
    # A folder chosen by the environment is named as such, by every loader of the shapes backbone.
    monkeypatch.setenv("XLARD_SHAPES_BACKBONE", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"not installed at .*nope \(\$XLARD_SHAPES_BACKBONE\)"):
        backbone.load_pipeline()
    from xlard import cli

    with pytest.raises(cli.UsageError, match=r"--backbone shapes: the shapes backbone is not installed at .*nope "
                                             r"\(\$XLARD_SHAPES_BACKBONE\)"):
        cli.resolve_backbone("shapes")


def _train_module():
    spec = importlib.util.spec_from_file_location("train_shapes_backbone",
                                                  ROOT / "scripts" / "train_shapes_backbone.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--vae-channels", "8", "8", "8", "--unet-channels", "8", "16", "16", "--text-dim", "16",
        "--text-layers", "1", "--batch-size", "2", "--vae-batch-size", "2", "--vae-crop", "16",
        "--vae-max-steps", "2", "--sample-minutes", "0", "--log-every", "1", "--threads", "2", "--no-bf16"]


def test_training_script_smoke_and_resume(tmp_path, capsys):
    train = _train_module()
    work, out = tmp_path / "work", tmp_path / "out"
    common = TINY + ["--work-dir", str(work), "--out", str(out)]
    assert train.main(common + ["--max-steps", "2"]) == 0
    assert (work / "checkpoint.pt").is_file()
    assert train.main(common + ["--max-steps", "4", "--resume"]) == 0
    assert "[resume] phase=unet vae_step=2 step=2" in capsys.readouterr().out
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    assert [r["step"] for r in rows if r.get("phase") == "unet"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r.get("phase") == "vae"] == [1, 2]
    info = json.loads((out / "training_info.json").read_text())
    assert info["unet_steps"] == 4 and info["vae_steps"] == 2
    pipe = backbone.load_pipeline(path=out)
    images = backbone.generate(["a photo of a red circle"], seed=0, steps=2, pipeline=pipe)
    assert images.shape == (1, 64, 64, 3)
    # a numpy int seed (DiffusersBackbone.encode takes one) was refused
    np.testing.assert_array_equal(backbone.generate(["a photo of a red circle"], seed=np.int64(0), steps=2,
                                                    pipeline=pipe), images)
    # --resume with other settings: another architecture was a load_state_dict traceback, another --lr or
    # --seed was taken silently
    for changed, flag in ((["--unet-channels", "8", "16", "24"], "--unet-channels"), (["--lr", "0.5"], "--lr"),
                          (["--seed", "7"], "--seed")):
        args = [a for a in common]
        with pytest.raises(ValueError, match=rf"--resume: the checkpoint in .* was written with other settings "
                                             rf"\({flag} "):
            train.main(args + changed + ["--max-steps", "5", "--resume"])
    # a new run (no --resume) into the same work dir overwrote the checkpoint and appended to the metrics
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--max-steps", "2"])
    assert e.value.code == 2 and "holds an earlier run (checkpoint.pt / metrics.jsonl); pass --resume" in \
        capsys.readouterr().err
    # --out inside or equal to --work-dir: the export replaced the folder and the checkpoint with it
    for out_dir in (tmp_path / "w2", tmp_path / "w2" / "export"):
        with pytest.raises(SystemExit) as e:
            train.parse_args(TINY + ["--work-dir", str(tmp_path / "w2"), "--out", str(out_dir)])
        assert e.value.code == 2 and "must be separate folders" in capsys.readouterr().err
    # one run per work dir at a time
    from helpers import hold_folder_in_subprocess

    proc = hold_folder_in_subprocess(work)
    try:
        with pytest.raises(Exception, match="--work-dir: .* is in use by another running xlard process"):
            train.main(common + ["--max-steps", "6", "--resume"])
    finally:
        proc.communicate("", timeout=60)



def test_an_interrupted_run_resumed_trains_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """Weights, optimiser, EMA and both random streams come back: the steps after a resume draw the same
    scenes, noise and timesteps and reach the same losses as a run that was never stopped."""
    train = _train_module()

    def losses(work):
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("phase") == "unet" and "loss" in r}

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = TINY + ["--max-steps", "5", "--checkpoint-minutes", "0"]
    assert train.main(args + ["--work-dir", str(whole), "--out", str(tmp_path / "o1")]) == 0
    real = train.Trainer.checkpoint

    def stop_at_step_4(self):  # Ctrl-C after UNet step 4 was logged, before its checkpoint: 3 is the last one
        if self.phase == "unet" and self.step == 4:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(train.Trainer, "checkpoint", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--work-dir", str(cut), "--out", str(tmp_path / "o2")])
    monkeypatch.setattr(train.Trainer, "checkpoint", real)
    assert sorted(losses(cut)) == [1, 2, 3, 4]
    assert train.main(args + ["--work-dir", str(cut), "--out", str(tmp_path / "o2"), "--resume"]) == 0
    # the replayed step 4 is logged once (its row from before the interruption stood beside the replay's)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "unet" and "loss" in r] == [1, 2, 3, 4, 5]
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        # (two runs of the same steps differ by about 1e-3 of the loss: threaded reductions are not ordered)
        assert b[step] == pytest.approx(a[step], rel=5e-3), (step, a, b)

def test_training_config_is_validated(capsys):
    """A bad option is one usage line naming it (a ValueError traceback before; --vae-max-steps -2 trained
    no VAE and went on to the UNet)."""
    train = _train_module()
    for bad, text in ((["--minutes", "5", "--vae-minutes", "6"], "--vae-minutes must be below --minutes"),
                      (["--unet-channels", "8", "16"], "--unet-channels must have 3 levels"),
                      (["--minutes", "0"], "--minutes must be in (0, inf)"),
                      (["--vae-max-steps", "-2"], "--vae-max-steps must be >= 0"),
                      (["--lr", "nan"], "--lr must be in (0, 1]"),
                      (["--vae-lr", "1e30"], "--vae-lr must be in (0, 1]"),  # trained to NaN, exported, status 0
                      (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
                      (["--vae-channels", "12", "32", "64"], "--vae-channels must be multiples of 8"),
                      (["--unet-channels", "24", "48", "96", "--unet-heads", "5"], "multiples of --unet-heads"),
                      (["--text-dim", "30"], "--text-dim must be a multiple of 4"),
                      (["--seed", "-1"], "--seed must be in [0, 2**64)"),
                      (["--sample-steps", "0"], "--sample-steps must be >= 1"),
                      # 100000 threads crashed the tokenizers' thread pool; a batch of 10^8 hung without a word
                      (["--threads", "100000"], "--threads must be at most 1024"),
                      (["--batch-size", "100000000"], "--batch-size must be at most 4096"),
                      (["--vae-batch-size", "100000000"], "--vae-batch-size must be at most 4096")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--out", "o"] + bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, (bad, err)
    for args in (["--out", "/proc/no/such"], ["--out", "o", "--work-dir", "/proc/no/such"]):  # before training
        with pytest.raises(SystemExit):
            train.parse_args(args)
    with pytest.raises(SystemExit):  # no default --out: a plain run replaced the shipped weights
        train.parse_args(["--max-steps", "2"])
    assert "required: --out" in capsys.readouterr().err
    # with a step-limited VAE phase the minutes rule for it does not apply (the docstring says so; it was refused)
    args = ["--out", "o", "--minutes", "1", "--vae-max-steps", "2", "--max-steps", "2"]
    assert train.parse_args(args)[0].minutes == 1


def test_the_export_does_not_replace_a_folder_of_the_users(tmp_path, capsys):
    """--out ~/project: the export replaced the folder whole and every file of the user's in it was gone."""
    train = _train_module()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--out", str(mine), "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds files (notes.txt) but no diffusers pipeline (model_index.json)" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    for ok in (tmp_path / "empty", pipeline, tmp_path / "new"):  # a pipeline folder is replaced, as documented
        assert train.parse_args(TINY + ["--out", str(ok), "--work-dir", str(tmp_path / "w")])[0].out == str(ok)


def test_a_diverging_run_stops_before_any_checkpoint_or_export_of_nan_weights(tmp_path, monkeypatch):
    """--lr 1e30 trained to NaN, wrote NaN checkpoints and exported an all-NaN pipeline with exit status 0."""
    train = _train_module()
    real_crops = train.random_crops
    monkeypatch.setattr(train, "random_crops", lambda *a: real_crops(*a) * float("nan"))
    work, out = tmp_path / "work", tmp_path / "out"
    with pytest.raises(ValueError, match=r"--vae-lr: the training loss became nan at VAE step 1: .*nothing was "
                                         r"exported, and no checkpoint was written: rerun"):
        train.main(TINY + ["--max-steps", "2", "--work-dir", str(work), "--out", str(out)])
    assert not out.exists() and not (work / "checkpoint.pt").exists()
    monkeypatch.setattr(train, "random_crops", real_crops)
    assert train.main(TINY + ["--max-steps", "1", "--work-dir", str(work), "--out", str(out), "--resume"]) == 0
    before = (work / "checkpoint.pt").read_bytes()
    trainer = train.Trainer(train.parse_args(TINY + ["--work-dir", str(work), "--out", str(out), "--resume"])[0])
    with torch.no_grad():
        next(trainer.unet.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match=r"the unet weights are no longer finite .* nothing was exported, and the "
                                         r"checkpoint in .* holds the last finite weights"):
        trainer.checkpoint()
    assert (work / "checkpoint.pt").read_bytes() == before


def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, capsys):
    """A cut checkpoint, a list, a dict without the optimiser: tracebacks (PytorchStreamReader, AttributeError,
    KeyError 'opt')."""
    train = _train_module()
    work, out = tmp_path / "work", tmp_path / "out"
    common = TINY + ["--work-dir", str(work), "--out", str(out)]
    assert train.main(common + ["--max-steps", "1"]) == 0
    good = (work / "checkpoint.pt").read_bytes()
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    del state["opt"]
    for damage, text in ((lambda: (work / "checkpoint.pt").write_bytes(good[:len(good) // 2]), "cannot be read"),
                         (lambda: torch.save([1, 2], work / "checkpoint.pt"), "holds no settings of this script"),
                         (lambda: torch.save(state, work / "checkpoint.pt"), "it has no opt")):
        damage()
        with pytest.raises(ValueError, match=rf"--resume: .*checkpoint.pt {'' if 'read' in text else 'is not'}.*"
                                             rf"{text}.*give another --work-dir"):
            train.main(common + ["--max-steps", "2", "--resume"])


def test_resume_without_a_checkpoint_keeps_the_earlier_rows_apart(tmp_path, capsys):
    """A run stopped before its first checkpoint, rerun with --resume as the interrupt line says: it started over
    and appended to the earlier run's metrics (two runs, other settings even, in one log)."""
    train = _train_module()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"phase": "vae", "step": 1, "rec_loss": 0.5}\n')
    assert train.main(TINY + ["--max-steps", "1", "--work-dir", str(work), "--out", str(out), "--resume"]) == 0
    assert "its metrics moved to metrics.before-resume.jsonl" in capsys.readouterr().out
    assert (work / "metrics.before-resume.jsonl").read_text() == '{"phase": "vae", "step": 1, "rec_loss": 0.5}\n'
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "vae"] == [1, 2] and "rec_loss" in rows[0]
    assert rows[0]["rec_loss"] != 0.5
