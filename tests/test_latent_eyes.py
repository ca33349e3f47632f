"""Latent eyes (xlard.shapes.latent_eyes): the understanding model's maps from the latent, the flat canvas, the
count edit on them, the corrector's choice of eyes, and the training script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xlard.shapes import backbone as shapes_backbone
from xlard.shapes import latent_eyes as LE
from xlard.shapes import understanding as U
from xlard.shapes.world import BACKGROUND, PALETTE

ROOT = Path(__file__).resolve().parents[1]
TINY = LE.LatentEyesConfig(width=8, low_width=8, up_widths=(8, 8))
needs_weights = pytest.mark.skipif(not (LE.is_available() and U.is_available() and shapes_backbone.is_available()),
                                   reason="the shipped latent eyes, understanding model or shapes backbone is absent")


def test_config_checks_name_the_field():
    assert LE.LatentEyesConfig().factor == 4 and TINY.factor == 4
    assert LE.LatentEyesConfig(up_widths=(8, 8, 8)).factor == 8
    for bad, field in ((dict(width=0), "width"), (dict(low_width=True), "low_width"),
                       (dict(up_widths=(8, -1)), "up_widths"), (dict(shapes=("a", "a")), "shapes"),
                       (dict(colors=()), "colors"), (dict(colors=("red", "mauve")), "colors"),
                       (dict(latent_channels=2.0), "latent_channels")):
        with pytest.raises(ValueError, match=f"LatentEyesConfig.{field}"):
            LE.LatentEyesConfig(**bad)
    assert LE.LatentEyesConfig.from_dict(TINY.to_dict()) == TINY


def test_predict_gives_distributions_at_the_factor_and_checks_its_input():
    torch.manual_seed(0)
    model = LE.LatentUnderstanding(TINY)
    out = model.predict(torch.randn(3, 8, 5, 6))
    assert out.shape_probs.shape == (3, len(TINY.shapes), 20, 24)
    assert out.color_probs.shape == (3, 1 + len(TINY.colors), 20, 24)
    torch.testing.assert_close(out.color_probs.sum(1), torch.ones(3, 20, 24))
    assert float(out.shape_probs.sum(1).max()) <= 1.0 + 1e-5
    assert model.training  # predict ran in eval mode and gave the mode back
    for bad, what in ((torch.randn(2, 4, 5, 5), "8, h, w"), (torch.zeros(2, 8, 5, 5, dtype=torch.long), "float"),
                      (np.zeros((1, 8, 4, 4), np.float32), "got numpy.ndarray")):
        with pytest.raises(ValueError, match=f"LatentUnderstanding.predict: z must be.*{what}"):
            model.predict(bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict(torch.full((1, 8, 4, 4), float("nan")))


def test_save_and_load_give_the_same_maps(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = LE.LatentUnderstanding(TINY).eval()
    model.shift.normal_()
    folder = model.save_pretrained(tmp_path / "eyes", extra={"training": {"seed": 1}})
    loaded = LE.LatentUnderstanding.from_pretrained(folder)
    z = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(loaded.predict(z).shape_probs, model.predict(z).shape_probs, rtol=0, atol=0)
    assert json.loads((folder / "config.json").read_text())["training"] == {"seed": 1}
    monkeypatch.setenv("XLARD_SHAPES_LATENT_EYES", str(folder))
    assert LE.latent_model_path() == folder and LE.is_available()
    with pytest.raises(FileNotFoundError, match="train_shapes_latent_eyes.py"):
        LE.LatentUnderstanding.from_pretrained(tmp_path / "absent")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LE.LatentUnderstanding.from_pretrained(folder)


def test_flat_canvas_paints_the_most_likely_color_or_the_background():
    colors = tuple(PALETTE)
    p = torch.zeros(1, 1 + len(colors), 2, 2)
    p[0, 0, 0, 0] = 0.6                       # background more likely than not
    p[0, 1 + colors.index("blue"), 0, 0] = 0.4
    p[0, 0, 0, 1] = 0.4                       # background less likely: the best color, blue, wins
    p[0, 1 + colors.index("blue"), 0, 1] = 0.35
    p[0, 1 + colors.index("red"), 0, 1] = 0.25
    p[0, 1 + colors.index("green"), 1, :] = 1.0
    img = (LE.flat_canvas(p)[0] * 255).round().int().permute(1, 2, 0).tolist()
    assert img[0][0] == list(BACKGROUND) and img[0][1] == list(PALETTE["blue"])
    assert img[1] == [list(PALETTE["green"])] * 2
    with pytest.raises(ValueError, match=r"color_probs must be \[B, 11, H, W\]"):
        LE.flat_canvas(torch.zeros(1, 5, 2, 2))
    for colors in (("mauve",), (), ("red", "red")):  # () raised a bare IndexError, duplicates passed
        with pytest.raises(ValueError, match="colors must be distinct palette names"):
            LE.flat_canvas(torch.zeros(1, 1 + len(colors), 2, 2), colors=colors)
    nan = p.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):  # NaN was painted as background
        LE.flat_canvas(nan)
    with pytest.raises(ValueError, match="must be a torch.Tensor .* got ndarray"):
        LE.flat_canvas(p.numpy())


def test_the_module_does_not_import_the_exact_evaluator():
    code = ("import sys; import xlard.shapes.latent_eyes as L; import xlard.models; "
            "assert 'xlard.shapes.evaluator' not in sys.modules, 'the evaluator was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_count_eyes_setting_picks_the_default_eyes():
    from xlard.models import CorrectorConfig, ResidualCorrector

    base = dict(reader=True, conditioning="fields", reader_nouns=("circle", "square"), reader_colors=("red", "blue"),
                count_edit=True)
    assert CorrectorConfig.tiny(**base).count_eyes == "decoded"
    decoded = ResidualCorrector(CorrectorConfig.tiny(**base))._count_eyes()
    latent = ResidualCorrector(CorrectorConfig.tiny(count_eyes="latent", **base))._count_eyes()
    assert type(decoded) is U.CountEyes and type(latent) is LE.LatentCountEyes
    assert latent.nouns == ("circle", "square")
    with pytest.raises(ValueError, match="count_eyes must be one of 'decoded', 'latent', got 'pixels'"):
        CorrectorConfig.tiny(count_eyes="pixels", **base)
    # a config saved before the setting existed loads with the decoded eyes
    saved = CorrectorConfig.tiny(**base).to_dict()
    saved.pop("count_eyes")
    assert CorrectorConfig.from_dict(saved).count_eyes == "decoded"


@needs_weights
def test_shipped_corrector_uses_the_latent_eyes():
    from xlard import evaluation

    corrector, _ = evaluation.load_corrector_dir(evaluation.shipped_corrector_path("shapes"))
    assert corrector.config.count_edit and corrector.config.count_eyes == "latent"
    assert isinstance(corrector._count_eyes(), LE.LatentCountEyes)


@needs_weights
def test_the_shipped_corrector_adds_objects_in_the_asked_color(tmp_path, capsys):
    """"ten green diamonds" (image 4: no diamond found to copy a color from) got seven red diamonds: the count edit
    was given the noun and the count, not the color."""
    import numpy as np
    from PIL import Image

    from xlard import cli
    from xlard.shapes.world import PALETTE

    out = tmp_path / "g"
    assert cli.main(["generate", "--backbone", "shapes", "--correct", "a photo of ten green diamonds",
                     "--per-prompt", "6", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "corrections.jsonl").read_text().splitlines()]
    assert rows[4]["actions"][0].startswith("added ")  # nothing redrawn: every diamond is new
    pixels = np.asarray(Image.open(out / rows[4]["image"]).convert("RGB")).reshape(-1, 3).astype(int)

    def share(color):
        return int((np.abs(pixels - np.array(PALETTE[color])).sum(1) < 60).sum())

    assert share("green") > 300 and share("red") < 20, (share("green"), share("red"))


def _backbone_latents(prompts, seeds):
    from xlard.backbones import DiffusersBackbone

    backbone = DiffusersBackbone.from_pretrained(
        str(shapes_backbone.backbone_path()), num_inference_steps=shapes_backbone.DEFAULT_STEPS,
        guidance_scale=shapes_backbone.DEFAULT_GUIDANCE, capture=False, torch_dtype=torch.float32)
    return backbone.encode(prompts, seed=seeds).z0


@pytest.fixture(scope="module")
def samples():
    if not (LE.is_available() and U.is_available() and shapes_backbone.is_available()):
        pytest.skip("shipped weights absent")
    prompts = ["a photo of three circles", "a photo of four squares", "a photo of two triangles",
               "a photo of five diamonds"] * 4
    return prompts, _backbone_latents(prompts, list(range(500, 516)))


@needs_weights
def test_shipped_latent_eyes_agree_with_the_understanding_model_on_the_decoded_image(samples):
    """The distilled maps must stay what the teacher reads on the VAE's decoding (weights that broke or drifted
    from the teacher fail here): most pixels' shape class and the objects counted per map agree."""
    from xlard import ops

    _, z = samples
    student = LE.load_latent_model().predict(z)
    teacher = U.load_model().predict(U.CountEyes(("circle",)).images(z))

    def shape_class(out):
        none = (1 - out.shape_probs.sum(1, keepdim=True)).clamp_min(0)
        return torch.cat((none, out.shape_probs), 1).argmax(1)

    pixels = float((shape_class(student) == shape_class(teacher)).float().mean())
    colors = float((student.color_probs.argmax(1) == teacher.color_probs.argmax(1)).float().mean())

    def counts(out):
        _, n = ops.label_components(out.shape_probs.reshape(-1, 1, 64, 64).contiguous(), threshold=0.5,
                                    mode="absolute", min_area=8, connectivity=8)
        return n.reshape(-1)

    same_count = float((counts(student) == counts(teacher)).float().mean())
    assert pixels >= 0.97 and colors >= 0.97 and same_count >= 0.85, (pixels, colors, same_count)


@needs_weights
def test_latent_count_edit_leaves_the_asked_number_of_objects(samples):
    prompts, z = samples
    words = [p.split()[-1].rstrip("s") for p in prompts]
    asked = [{"three": 3, "four": 4, "two": 2, "five": 5}[p.split()[3]] for p in prompts]
    eyes = LE.LatentCountEyes(("circle", "square", "triangle", "diamond"))
    encoded, touched, actions = eyes.edit_counts(z, words, asked)
    assert encoded.shape == z.shape and encoded.dtype == z.dtype
    assert touched.shape == (len(z), 1, 16, 16) and touched.dtype == torch.bool
    assert len(actions) == len(z) and all(isinstance(a, list) for a in actions)
    assert any(a for a in actions) and bool(touched.any())
    edited = torch.where(touched, encoded, z)
    probs, foreground = eyes(edited)
    assert probs.shape == (len(z), 4, 64, 64) and foreground.shape == (len(z), 64, 64)
    # counted by the teacher on the VAE's decoding of the edited latent (not by the student that edited it)
    probs, _ = U.CountEyes(("circle", "square", "triangle", "diamond"))(edited)
    from xlard import ops

    nouns = ["circle", "square", "triangle", "diamond"]
    maps = probs[torch.arange(len(z)), torch.tensor([nouns.index(w) for w in words])][:, None].contiguous()
    _, found = ops.label_components(maps, threshold=0.5, mode="absolute", min_area=8, connectivity=8)
    right = float((found.reshape(-1) == torch.tensor(asked)).float().mean())
    assert right >= 0.75, (found.reshape(-1).tolist(), asked)
    with pytest.raises(ValueError, match="one noun and one count >= 1 per latent of z"):
        eyes.edit_counts(z[:2], ["circle"], [2])
    for counts in (["x", 2], [1.7, 2], [True, 2]):  # "x" raised a bare int() error, 1.7 was read as 1
        with pytest.raises(ValueError, match="counts whole numbers"):
            eyes.edit_counts(z[:2], ["circle", "square"], counts)
    empty = eyes.edit_counts(z[:0], [], [])  # torch.stack failed on the empty lists
    assert empty[0].shape == (0, 8, 16, 16) and empty[1].shape == (0, 1, 16, 16) and empty[2] == []
    with pytest.raises(ValueError, match="z must be a float latent tensor .* got ndarray"):
        eyes.edit_counts(z[:1].numpy(), ["circle"], [2])
    with pytest.raises(ValueError, match="z has 4 channels"):
        eyes.edit_counts(torch.zeros(1, 4, 16, 16), ["circle"], [2])
    with pytest.raises(ValueError, match=r"redraws 64x64 images .* z \[1, 8, 32, 32\] is read at 128x128"):
        eyes.edit_counts(torch.zeros(1, 8, 32, 32), ["circle"], [2])


@pytest.mark.skipif(not (U.is_available() and shapes_backbone.is_available()),
                    reason="the understanding model or the shapes backbone is absent")
def test_training_script_writes_loadable_eyes_and_reuses_its_data(tmp_path):
    if not (ROOT / "xlard" / "data" / "shapes_corrector" / "config.json").is_file():
        pytest.skip("shipped corrector absent")
    cmd = [sys.executable, str(ROOT / "scripts" / "train_shapes_latent_eyes.py"), "--out", str(tmp_path / "eyes"),
           "--work", str(tmp_path / "work"), "--batches", "1", "--epochs", "1", "--batch-size", "8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sampling: 1/1 batches" in first.stderr and "epoch 1/1" in first.stderr
    model = LE.LatentUnderstanding.from_pretrained(tmp_path / "eyes")
    info = json.loads((tmp_path / "eyes" / "config.json").read_text())["training"]
    assert info["latents"] >= 2 and info["epochs"] == 1 and info["held_back"] >= 1
    assert info["held_back_loss"] is not None and "--work" not in info["command"]
    assert model.predict(torch.zeros(1, 8, 16, 16)).shape_probs.shape == (1, 4, 64, 64)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "using the sampled data" in again.stderr, again.stderr[-3000:]
    # damaged sampled data (a traceback before) is a cache: named, and sampled again
    (tmp_path / "work" / "data.pt").write_bytes(b"PK\x03\x04 cut short")
    damaged = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert damaged.returncode == 0, damaged.stderr[-3000:]
    assert "data.pt: cannot be read (" in damaged.stderr and "sampling again" in damaged.stderr
    assert not list((tmp_path / "work").glob(".tmp*"))
    # a corrector's folder as --out, a training run's as --work: refused before any work (their files were replaced)
    from helpers import fake_corrector_folder

    corrector = fake_corrector_folder(tmp_path / "corrector")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "ckpt-00000001.pt").write_bytes(b"x")
    for extra, words in ((["--out", str(corrector)], "--out: " + str(corrector) + " holds a corrector"),
                         (["--out", str(tmp_path / "x"), "--work", str(run)], "--work: " + str(run) + " holds the "
                                                                               "checkpoints of `xlard train`")):
        bad = subprocess.run(cmd[:2] + extra, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and words in bad.stderr and "sampling" not in bad.stderr, bad.stderr[-2000:]
    assert (corrector / "config.json").read_text() == "{}"
    bad = subprocess.run(cmd[:2] + ["--out", str(tmp_path / "x"), "--epochs", "0"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--epochs must be >= 1, got 0" in bad.stderr
    for extra, words in ((["--seed", "-1"], "--seed must be in [0, 2**64), got -1"), (["--out", ""], "--out"),
                         (["--corrector", str(tmp_path / "nowhere")], "is not a corrector folder")):
        bad = subprocess.run(cmd[:2] + ["--out", str(tmp_path / "x"), *extra], env=env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    (tmp_path / "a-file").write_text("")
    bad = subprocess.run(cmd[:2] + ["--out", str(tmp_path / "a-file")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "a-file" in bad.stderr and "sampling" not in bad.stderr, bad.stderr[-2000:]


def _latent_eyes_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes_latent_eyes",
                                                  ROOT / "scripts" / "train_shapes_latent_eyes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_training_script_bounds_lr_and_seed_before_any_work(tmp_path, capsys):
    """--lr 1e30 trained to NaN and saved the NaN weights; --seed 2**64 failed after the backbone had loaded with
    "Overflow when unpacking long long", naming no flag."""
    script = _latent_eyes_script()
    base = ["--out", str(tmp_path / "eyes"), "--work", str(tmp_path / "work")]
    for extra, words in ((["--lr", "1e30"], "--lr must be a number in (0, 1], got 1e+30"),
                         (["--lr", "0"], "--lr must be a number in (0, 1], got 0.0"),
                         (["--seed", str(2 ** 64)], f"--seed must be in [0, 2**64), got {2 ** 64}"),
                         (["--seed", "-1"], "--seed must be in [0, 2**64), got -1")):
        with pytest.raises(SystemExit) as e:
            script.parse_args(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, err
    args = script.parse_args(base + ["--lr", "1", "--seed", str(2 ** 64 - 1)])
    assert (args.lr, args.seed) == (1.0, 2 ** 64 - 1)
    assert not (tmp_path / "eyes").exists() and not (tmp_path / "work").exists()


@pytest.mark.skipif(not U.is_available(), reason="the understanding model (the teacher's config) is absent")
@pytest.mark.parametrize("epochs, batch, loss", [(1, 16, "held-back loss"), (2, 4, "training loss")])
def test_training_script_stops_on_a_diverging_fit_and_keeps_the_saved_eyes(tmp_path, monkeypatch, epochs, batch,
                                                                           loss):
    """A learning rate past any sense (1e30, which --lr now refuses) trained to NaN, printed "held-back loss nan",
    exited 0 and replaced the eyes in --out with NaN weights: a loss that is not finite ends the fit, naming --lr,
    and --out keeps what it held."""
    script = _latent_eyes_script()
    out, work = tmp_path / "eyes", tmp_path / "work"
    LE.LatentUnderstanding(TINY).save_pretrained(out, extra={"training": {"note": "the earlier eyes"}})
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    gen = torch.Generator().manual_seed(0)
    shape = torch.rand(12, 5, 64, 64, generator=gen).softmax(1)[:, 1:]
    color = torch.rand(12, 11, 64, 64, generator=gen).softmax(1)
    work.mkdir()
    torch.save({"key": repr({"test": 1}), "z": torch.randn(12, 8, 16, 16, generator=gen), "shape": shape.half(),
                "color": color.half()}, work / "data.pt")  # the sampled data, as a rerun reuses it
    monkeypatch.setattr(script, "_data_key", lambda args: {"test": 1})
    args = script.parse_args(["--out", str(out), "--work", str(work), "--epochs", str(epochs),
                              "--batch-size", str(batch)])
    args.lr = 1e30  # past the bound parse_args now sets: the fit's own check is tested
    monkeypatch.setattr(script, "parse_args", lambda argv=None: args)
    with pytest.raises(ValueError, match=f"training diverged in epoch .*{loss} (nan|inf).*; lower --lr "
                                         r"\(now 1e\+30\) and rerun .*nothing was written to --out"):
        script.main([])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert (work / "data.pt").is_file()


@pytest.mark.skipif(not (U.is_available() and shapes_backbone.is_available()),
                    reason="the understanding model or the shapes backbone is absent")
def test_training_script_ends_in_one_line_on_sigterm(tmp_path):
    """The script had no signal handling: Ctrl-C printed an 80-line traceback, SIGTERM ended it without a word."""
    if not (ROOT / "xlard" / "data" / "shapes_corrector" / "config.json").is_file():
        pytest.skip("shipped corrector absent")
    from helpers import sigterm_once

    work = tmp_path / "work"
    code, err = sigterm_once([sys.executable, str(ROOT / "scripts" / "train_shapes_latent_eyes.py"), "--out",
                              str(tmp_path / "eyes"), "--work", str(work)], work.exists,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert code == 143, err
    assert err.strip().splitlines()[-1] == ("train_shapes_latent_eyes.py: terminated (SIGTERM); every file written is "
                                            "complete (rerun the same command: the sampled data, once written, is "
                                            "reused)")
    assert "Traceback" not in err and not list(tmp_path.rglob(".tmp*"))


@needs_weights
def test_loading_the_shapes_models_leaves_the_callers_rng_alone():
    """Building a module initialises its weights randomly before the saved ones replace them: the first
    get_source("shapes") or corrected generate moved a caller's torch.manual_seed stream."""
    torch.manual_seed(0)
    want = torch.randn(3)
    torch.manual_seed(0)
    U.ShapesUnderstanding.from_pretrained()
    LE.LatentUnderstanding.from_pretrained()
    assert torch.equal(torch.randn(3), want)


def test_config_refuses_one_string_for_a_vocabulary():
    """shapes="square" was split into the shapes 's', 'q', 'u', ... (and up_widths=b"ab" into widths 97, 98)."""
    for bad, field in ((dict(shapes="square"), "shapes"), (dict(colors="red"), "colors"),
                       (dict(shapes=b"square"), "shapes"), (dict(up_widths=b"ab"), "up_widths")):
        with pytest.raises(ValueError, match=f"LatentEyesConfig.{field} must"):
            LE.LatentEyesConfig(**bad)
    assert LE.LatentEyesConfig(shapes=["circle"], colors=["red"]).shapes == ("circle",)


@needs_weights
def test_the_shipped_latent_eyes_still_load_their_config():
    assert LE.LatentUnderstanding.from_pretrained().config.shapes == U.load_model().config.shapes


@needs_weights
def test_count_eyes_name_z_and_take_an_integer_tensor_of_counts():
    """A NaN latent was blamed on "images" (the VAE's decoding of it) by CountEyes; a numpy z was reported by its
    shape alone; counts=torch.tensor([2, 1]) was "not whole numbers"."""
    nouns = ("circle", "square", "triangle", "diamond")
    z = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    nan = z.clone()
    nan[0, 0, 0, 0] = float("nan")
    for eyes, owner in ((U.CountEyes(nouns), "CountEyes"), (LE.LatentCountEyes(nouns), "LatentUnderstanding.predict")):
        with pytest.raises(ValueError, match=f"{owner}: z holds NaN or infinite values"):
            eyes(nan)
        with pytest.raises(ValueError, match=f"{owner}: z holds NaN or infinite values"):
            eyes.edit_counts(nan, ["circle", "square"], [2, 1])
    with pytest.raises(ValueError, match=r"CountEyes: z must be a float latent \[B, C, h, w\], got a numpy.ndarray "
                                         r"\(float32, shape \[2, 8, 16, 16\]"):
        U.CountEyes(nouns)(z.numpy())
    eyes = LE.LatentCountEyes(nouns)
    want = eyes.edit_counts(z, ["circle", "square"], [2, 1])
    got = eyes.edit_counts(z, ["circle", "square"], torch.tensor([2, 1]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    for counts in (torch.tensor([True, True]), torch.tensor([1.5, 2.0]), torch.tensor([[2, 1]])):
        with pytest.raises(ValueError, match="counts whole numbers"):
            eyes.edit_counts(z, ["circle", "square"], counts)
