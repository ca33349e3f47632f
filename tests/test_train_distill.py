"""The edit-target warm start (``distill`` in a run config): dataset shards, fit, export, resume, refusals."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from xlard.shapes import backbone as shapes_backbone  # noqa: E402
from xlard.train import config_from_dict  # noqa: E402

needs_shapes = pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")

BASE = {
    "steps": 0, "seed": 1, "reward_model": "image", "confidence": "uniform", "anchor": "none",
    "backbone": {"name": "shapes", "correction_step": 1.0, "num_inference_steps": 2, "device": "cpu"},
    "data": {"prompts": "shapes:train", "balance": "tag", "items_per_tag": 1, "monitor_size": 0},
    "distill": {"items_per_tag": 1, "epochs": 2, "batch_size": 2, "chunk": 4, "val_fraction": 0.2},
    "model": {"corrector_overrides": {"patch": 2, "width": 16, "depth": 1}, "projector_overrides": {"patch": 2,
                                                                                                     "width": 16,
                                                                                                     "depth": 1}},
    "ppo": {"prompts_per_step": 2, "group_size": 2, "epochs": 1, "minibatches": 2},
    "projector": {"warmup_batches": 0},
    "log": {"monitor_every": 0, "evaluate_every": 0, "checkpoint_every": 1, "progress": False, "tensorboard": "off"},
}


def config(out: Path, **changes):
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_from_dict(data, overrides={"out": str(out)})


@pytest.fixture(scope="module")
def shapes_final():
    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    from xlard.train.trainer import load_backbone

    cfg = config(Path("unused"))
    return load_backbone(cfg.backbone, torch.device("cpu"), cfg.reward)


def test_config_checks():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        config(Path("x"), distill={"items_per_tag": 0})
    with pytest.raises(ValueError, match="distill.epochs"):
        config(Path("x"), distill={"epochs": 0})
    with pytest.raises(ValueError, match="distill.val_fraction"):
        config(Path("x"), distill={"val_fraction": 0.9})
    with pytest.raises(ValueError, match="distill.fix_count"):
        config(Path("x"), distill={"fix_count": "yes"})
    with pytest.raises(ValueError, match="distill.placement"):
        config(Path("x"), distill={"placement": "anywhere"})
    with pytest.raises(ValueError, match="unknown key"):
        config(Path("x"), distill={"item_per_tag": 3})
    cfg = config(Path("x"), distill={"fix_position": False, "placement": "grid", "remove": "last", "draw_size": 14})
    edits = cfg.distill.edit_config()
    assert edits.fix_position is False and edits.redraw is True
    assert (edits.placement, edits.remove, edits.draw_size) == ("grid", "last", 14)
    assert (edits.relayout, edits.margin, cfg.distill.replace) == (False, 6, False)
    cfg = config(Path("x"), distill={"relayout": True, "margin": 64, "replace": True, "relayout_color": "blue"})
    edits = cfg.distill.edit_config()
    assert (edits.relayout, edits.margin, cfg.distill.replace, edits.relayout_color) == (True, 64, True, "blue")
    with pytest.raises(ValueError, match="distill.relayout_color"):
        config(Path("x"), distill={"relayout_color": "teal"})
    with pytest.raises(ValueError, match="distill.margin"):
        config(Path("x"), distill={"margin": 0})
    with pytest.raises(ValueError, match="distill.replace"):
        config(Path("x"), distill={"replace": "yes"})
    assert config(Path("x")).distill.decoder_epochs == 0
    for bad in ({"decoder_epochs": -1}, {"decoder_lr": 0.0}, {"decoder_pixel_weight": 0.0},
                {"decoder_latent_weight": -1.0}):
        with pytest.raises(ValueError, match="distill.decoder_"):
            config(Path("x"), distill=bad)


def test_decoder_space_fit_lowers_the_decoded_error():
    """fit_corrector_decoded on a toy decoder (a fixed 1x1 convolution and a sigmoid): the corrected
    latent's decoded error falls below the latent-only fit's, and bad weights are refused."""
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.train import distill as dl

    g = torch.Generator().manual_seed(0)
    n = 48
    z0 = torch.randn(n, 4, 8, 8, generator=g)
    data = {"z0": z0, "target": torch.tanh(-0.8 * z0.flip(1)), "tokens": torch.randn(n, 3, 8, generator=g),
            "mask": torch.ones(n, 3, dtype=torch.bool), "pooled": torch.randn(n, 8, generator=g)}
    weight = torch.randn(3, 4, 1, 1, generator=g)

    def decode(z):
        return torch.sigmoid(torch.nn.functional.conv2d(z, weight) * 4.0)

    torch.manual_seed(0)
    corrector = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2, width=16,
                                                       depth=1, heads=2, cond_dim=8))
    common = dict(batch_size=8, weight_decay=0.0, val_fraction=0.25, seed=3, progress=False)
    dl.fit_corrector(corrector, data, epochs=3, lr=3e-3, **common)

    def decoded_error(model):
        with torch.no_grad():
            mean = model(data["z0"], data["tokens"], data["pooled"], data["mask"])
            return float((decode(data["z0"] + mean) - decode(data["z0"] + data["target"])).square().mean())

    latent_only = copy.deepcopy(corrector)
    before = decoded_error(corrector)
    stats = dl.fit_corrector_decoded(corrector, data, decode, epochs=15, lr=1e-2, pixel_weight=100.0, **common)
    assert stats["decoder_epochs"] == 15
    assert stats["decoder_val_pixel_mse"] < stats["decoder_val_zero_pixel_mse"]
    # the same 15 epochs on the latent loss alone leave a clearly larger decoded error (0.036 vs 0.022 here)
    dl.fit_corrector(latent_only, data, epochs=15, lr=1e-2, **common)
    assert decoded_error(corrector) < before
    assert decoded_error(corrector) < 0.8 * decoded_error(latent_only)
    with pytest.raises(ValueError, match="pixel_weight must be > 0"):
        dl.fit_corrector_decoded(corrector, data, decode, epochs=1, lr=1e-3, pixel_weight=0.0, **common)


@needs_shapes
def test_distill_run_exports_a_trained_corrector(tmp_path, shapes_final, capsys):
    from xlard.evaluation import load_corrector_dir
    from xlard.train import train
    from xlard.train.distill import DISTILL_SEED_BASE

    out = tmp_path / "run"
    summary = train(config(out, distill={"decoder_epochs": 1}), backbone=shapes_final)
    folder = out / "distill"
    assert sorted(p.name for p in folder.glob("data-*.pt")) == ["data-0000.pt", "data-0001.pt"]  # 6 items, chunks of 4
    shard = torch.load(folder / "data-0000.pt", weights_only=False)
    assert shard["z0"].shape == shard["target"].shape and len(shard["actions"]) == 4
    assert all(s >= DISTILL_SEED_BASE for s in shard["seeds"])
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows] == [1, 2, None]  # the latent fit's epochs, then the decoder-space one
    assert rows[2]["decoder_epoch"] == 1 and rows[2]["decoder_val_zero_pixel_mse"] >= 0
    assert json.loads((folder / "summary.json").read_text())["decoder_epochs"] == 1
    corrector, meta = load_corrector_dir(summary["corrector"])
    info = meta.training["distill"]
    assert info["items"] == 6 and info["epochs"] == 2 and "val_r2" in info and info["items_per_tag"] == 1
    assert meta.correction_step == 1.0 and meta.training["step"] == 0
    assert corrector.head.weight.abs().max() > 0  # the zero-initialised head was fitted
    assert json.loads((folder / "summary.json").read_text())["items"] == 6
    # The fit's curve (latent epochs, then the decoder-space one) is drawn beside its metrics.
    from PIL import Image

    from xlard.train.metrics import distill_curve_rows

    assert Image.open(folder / "curve.png").size[0] == 900
    assert [r["epoch_all"] for r in distill_curve_rows(rows)] == [1, 2, 3]

    # scripts/train_shapes_corrector.py installs such a run with a card that states the warm start.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_shapes_corrector", Path(__file__).resolve().parents[1] / "scripts" / "train_shapes_corrector.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    target = tmp_path / "installed"
    script.TARGET = target
    assert script.install(out, seconds=12.0) == target
    card = (target / "README.md").read_text()
    assert "edit-target warm start: 6 items" in card and "2 latent + 1 decoder-space epochs" in card
    assert "PPO steps: 0" in card and str(tmp_path) not in card  # no machine path in package data
    installed, installed_meta = load_corrector_dir(target)
    assert installed_meta.training["run"] == "run"
    assert torch.equal(installed.head.weight, corrector.head.weight)
    with pytest.raises(SystemExit):  # an unwritable run folder fails before training, not after it
        script.main(["--out", "/proc/no/such"])
    # --install-only of a folder with no finished run: a FileNotFoundError traceback before; and together with
    # --no-install it did nothing without a word (the package data is never reached: TARGET is the tmp copy)
    for argv in (["--install-only", "--out", str(tmp_path / "no_run")], ["--install-only", "--no-install"]):
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        assert e.value.code == 2
    assert "holds no finished run (missing corrector, summary.json" in capsys.readouterr().err
    # --install-only of a finished run of another config installed it with a card naming configs/shapes_shipped.yaml
    with pytest.raises(SystemExit) as e:
        script.main(["--install-only", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "was not trained with configs/shapes_shipped.yaml (its config.json differs in " in err and "steps" in err
    assert script.config_differences(out) and "out" not in script.config_differences(out)
    same = tmp_path / "same"
    same.mkdir()
    from xlard.train import load_config

    shipped = load_config(script.CONFIG, overrides={"out": str(same), "log.progress": False})
    (same / "config.json").write_text(json.dumps(shipped.to_dict(), default=list))
    assert script.config_differences(same) == []  # the run folder and the progress bar are no part of it


@needs_shapes
def test_dataset_build_resumes_at_the_first_missing_shard(tmp_path, shapes_final, monkeypatch):
    from xlard.shapes.understanding import load_model
    from xlard.train import distill as dl
    from xlard.train.data import Item, load_records

    records, _ = load_records("shapes:train")
    items = [Item(records[i], dl.DISTILL_SEED_BASE + i, i) for i in range(5)]
    model = load_model()
    dl.build_dataset(shapes_final, model, items, tmp_path / "d", chunk=2, progress=False)
    first = torch.load(tmp_path / "d" / "data-0001.pt", weights_only=False)
    first_0 = torch.load(tmp_path / "d" / "data-0000.pt", weights_only=False)
    (tmp_path / "d" / "data-0001.pt").unlink()
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest.pop("correction_step") == 1.0  # a folder from before the field existed is still reused
    assert manifest["edits"].pop("relayout") is False and manifest["edits"].pop("relayout_color") == "found"
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    calls = []
    real = dl.encode_items
    monkeypatch.setattr(dl, "encode_items", lambda bb, part: calls.append(len(part)) or real(bb, part))
    dl.build_dataset(shapes_final, model, items, tmp_path / "d", chunk=2, progress=False)
    assert calls == [2]  # only the missing shard was rebuilt
    again = torch.load(tmp_path / "d" / "data-0001.pt", weights_only=False)
    assert torch.equal(first["target"], again["target"]) and first["seeds"] == again["seeds"]
    data = dl.load_dataset(tmp_path / "d", 5, 2)
    from xlard.shapes.editor import EditConfig

    with pytest.raises(ValueError, match="other items or edits"):  # stale shards are never reused
        dl.build_dataset(shapes_final, model, items, tmp_path / "d", chunk=2, progress=False,
                         edit_config=EditConfig(redraw=False))
    with pytest.raises(ValueError, match="other items or edits"):
        dl.build_dataset(shapes_final, model, items[:4], tmp_path / "d", chunk=2, progress=False)
    assert data["z0"].shape[0] == 5 and data["tokens"].shape[:2] == data["mask"].shape
    # Build time: each shard records its own, so a resumed build still reports all of it.
    shards = [torch.load(tmp_path / "d" / f"data-000{k}.pt", weights_only=False) for k in range(3)]
    assert all(sh["seconds"] > 0 for sh in shards)
    assert data["build_seconds"] == pytest.approx(sum(sh["seconds"] for sh in shards))
    assert shards[0]["seconds"] == first_0["seconds"]  # the kept shard is the first build's
    # A damaged shard (empty, cut, overwritten) or manifest is named with the fix; the fix works (they were a
    # traceback: EOFError, "PytorchStreamReader failed", UnpicklingError; the manifest "Expecting value").
    shard1 = (tmp_path / "d" / "data-0001.pt").read_bytes()
    for damage in (b"", shard1[:2000], bytes(range(256)) * 8):
        (tmp_path / "d" / "data-0001.pt").write_bytes(damage)
        with pytest.raises(ValueError, match=r"distill: .*data-0001\.pt cannot be read \(\w+: .*\); the file is "
                                             r"damaged: delete it and rerun with --resume"):
            dl.load_dataset(tmp_path / "d", 5, 2)
    (tmp_path / "d" / "data-0001.pt").unlink()
    dl.build_dataset(shapes_final, model, items, tmp_path / "d", chunk=2, progress=False)
    assert torch.equal(dl.load_dataset(tmp_path / "d", 5, 2)["target"], data["target"])
    (tmp_path / "d" / "manifest.json").write_text('{"items": [')
    with pytest.raises(ValueError, match=r"distill: .*manifest\.json is damaged \(Expecting value.*\); delete "
                                         r".*d \(its edit targets are built again\)"):
        dl.build_dataset(shapes_final, model, items, tmp_path / "d", chunk=2, progress=False)
    del shards[2]["seconds"]  # a shard from before the record: no total
    torch.save(shards[2], tmp_path / "d" / "data-0002.pt")
    assert dl.load_dataset(tmp_path / "d", 5, 2)["build_seconds"] is None


@needs_shapes
def test_dataset_build_closes_its_bar_when_interrupted(tmp_path, shapes_final, monkeypatch):
    """Ctrl-C during the edit targets left the bar open: the interrupt line was glued to it."""
    from helpers import raise_keyboard_interrupt, record_progress_bars

    from xlard.shapes.understanding import load_model
    from xlard.train import distill as dl
    from xlard.train.data import Item, load_records

    records, _ = load_records("shapes:train")
    items = [Item(records[i], dl.DISTILL_SEED_BASE + i, i) for i in range(2)]
    opened = record_progress_bars(monkeypatch)
    monkeypatch.setattr(dl, "encode_items", raise_keyboard_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dl.build_dataset(shapes_final, load_model(), items, tmp_path / "d", chunk=2, progress=True)
    assert opened and all(bar.disable for bar in opened)  # tqdm marks a closed bar disabled


@needs_shapes
def test_ppo_continues_after_distill_and_resume_skips_it(tmp_path, shapes_final, monkeypatch):
    from xlard.train import distill as dl
    from xlard.train import train

    out = tmp_path / "run"
    train(config(out, steps=1), backbone=shapes_final)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    calls = []
    monkeypatch.setattr(dl, "fit_corrector", lambda *a, **k: calls.append(1))
    from xlard.train.trainer import Trainer

    trainer = Trainer(config(out, steps=1), resume=True, backbone=shapes_final)
    assert trainer.distilled and trainer.distill_stats["items"] == 6
    trainer.run()
    assert calls == []  # the resumed run did not distil again


@needs_shapes
def test_a_fields_corrector_distils_trains_and_evaluates_on_the_parsed_fields(tmp_path, shapes_final, monkeypatch):
    """model.corrector_overrides.conditioning: fields. The fit, the PPO step and the evaluation all
    hand the corrector the parsed fields' tokens (counted through field_tokens)."""
    import xlard.prompts.fields as fields
    from xlard.evaluation import load_corrector_dir
    from xlard.models import corrector_inputs
    from xlard.train import train
    from xlard.train.rollout import encode_items

    calls = []
    real = fields.field_tokens
    monkeypatch.setattr(fields, "field_tokens", lambda specs, dim, **k: calls.append(len(list(specs))) or
                        real(specs, dim, **k))
    out = tmp_path / "run"
    overrides = dict(BASE["model"]["corrector_overrides"], conditioning="fields")
    summary = train(config(out, steps=1, model={"corrector_overrides": overrides}), backbone=shapes_final)
    assert calls[0] == 6  # the fit: all six distillation items at once
    assert len(calls) > 1  # then the PPO step's rollouts
    corrector, meta = load_corrector_dir(summary["corrector"])
    assert corrector.config.conditioning == "fields"
    calls.clear()
    from xlard.train.data import Item, load_records

    records, _ = load_records("shapes:train")
    state = encode_items(shapes_final, [Item(records[0], 5, 0)])
    got = corrector_inputs(corrector, state.prompt_embedding, state.specs)
    assert calls == [1] and float(got["pooled"].abs().sum()) == 0.0
    assert got["text_tokens"].shape[-1] == corrector.config.text_dim


@needs_shapes
def test_targets_before_the_final_step_are_scaled_by_the_signal_level(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from xlard.shapes.understanding import load_model
    from xlard.train import distill as dl
    from xlard.train.data import Item, load_records
    from xlard.train.rollout import encode_items
    from xlard.train.trainer import load_backbone

    cfg = config(tmp_path / "a", backbone={"correction_step": 0.5, "num_inference_steps": 4})
    backbone = load_backbone(cfg.backbone, torch.device("cpu"), cfg.reward)
    records, _ = load_records("shapes:train")
    items = [Item(records[i], dl.DISTILL_SEED_BASE + i, i) for i in range(3)]
    state = encode_items(backbone, items)
    assert state.step_index == 2 and state.remaining_steps == 2
    # sqrt(abar_t) of the timestep the corrected latent sits at, from a scheduler built here
    sched = DPMSolverMultistepScheduler.from_config(backbone.family.pipe.scheduler.config)
    sched.set_timesteps(4)
    expected = float(sched.alphas_cumprod[int(sched.timesteps[2])]) ** 0.5
    assert 0.05 < expected < 0.99
    assert dl.signal_scale(state) == pytest.approx(expected, rel=1e-6)
    model = load_model()
    dl.build_dataset(backbone, model, items, tmp_path / "d", chunk=3, progress=False)
    shard = torch.load(tmp_path / "d" / "data-0000.pt", weights_only=False)
    assert shard["signal_scale"] == pytest.approx(expected, rel=1e-6)
    assert shard["z0"].shape == shard["target"].shape and torch.isfinite(shard["target"]).all()
    # reader targets added to these shards afterwards would read the VAE decoding of the intermediate z0, not the
    # image the backbone makes of it (29 vs 38 object cells, colors 83% alike): refused, nothing rewritten
    before = (tmp_path / "d" / "data-0000.pt").read_bytes()
    with pytest.raises(ValueError, match=r"distill: reader \(cell\) targets can be added to edit-target shards "
                                         r"built without them only at correction_step 1.0, got 0.5; .* delete that "
                                         r"folder"):
        dl.build_dataset(backbone, model, items, tmp_path / "d", chunk=3, progress=False, cells=True)
    assert (tmp_path / "d" / "data-0000.pt").read_bytes() == before
    # ... also with a shard missing (an interrupted build): refused before that shard is built with them
    more = items + [Item(records[3], dl.DISTILL_SEED_BASE + 3, 3)]
    dl.build_dataset(backbone, model, more, tmp_path / "f", chunk=3, progress=False)
    (tmp_path / "f" / "data-0001.pt").unlink()
    with pytest.raises(ValueError, match=r"reader \(cell\) targets .* only at correction_step 1.0"):
        dl.build_dataset(backbone, model, more, tmp_path / "f", chunk=3, progress=False, cells=True)
    assert not (tmp_path / "f" / "data-0001.pt").exists()
    # the same items at correction_step 1.0: a separate folder (the manifest records the step) ...
    final = load_backbone(config(tmp_path / "b").backbone, torch.device("cpu"), cfg.reward)
    with pytest.raises(ValueError, match="other items or edits"):
        dl.build_dataset(final, model, items, tmp_path / "d", chunk=3, progress=False)
    assert dl.signal_scale(encode_items(final, items)) == 1.0
    # ... and a scheduler without alphas_cumprod is refused with the reason
    state.resume["scheduler"] = object()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dl.signal_scale(state)


def test_the_distill_config_loads_with_the_validated_edits():
    from xlard.train import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes_distill.yaml")
    assert cfg.steps == 0 and cfg.distill.items_per_tag > 0 and cfg.backbone.correction_step == 1.0
    edits = cfg.distill.edit_config()
    assert not edits.redraw and not edits.fix_count and edits.fix_color and edits.fix_position


@needs_shapes
def test_replace_targets_land_on_the_edited_encoding_and_need_the_final_step(tmp_path, shapes_final):
    from xlard.shapes.editor import EditConfig
    from xlard.shapes.understanding import load_model
    from xlard.train import distill as dl
    from xlard.train.data import Item, load_records
    from xlard.train.trainer import Trainer, load_backbone

    records, _ = load_records("shapes:train")
    counting = [i for i, r in enumerate(records) if r.get("tag") == "counting"][:3]
    items = [Item(records[i], dl.DISTILL_SEED_BASE + k, i) for k, i in enumerate(counting)]
    model = load_model()
    edits = EditConfig(relayout=True)
    dl.build_dataset(shapes_final, model, items, tmp_path / "r", chunk=3, progress=False, edit_config=edits,
                     replace=True)
    shard = torch.load(tmp_path / "r" / "data-0000.pt", weights_only=False)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["replace"] is True
    assert all(a[0].startswith("relaid out") for a in shard["actions"])
    # on the touched cells z0 + target is the edited image's encoding
    from xlard.shapes.editor import edit_images
    from xlard.train.rollout import encode_items

    state = encode_items(shapes_final, items)
    images = shapes_final.decode(state, state.z0).images.float()
    edited = edit_images(model, images, state.specs, edits)
    encoded = dl.vae_encoder(shapes_final)(edited.images)
    touched = shard["target"].abs().amax(1) > 0
    assert touched.any()
    moved = shard["z0"] + shard["target"]
    assert torch.allclose(moved.permute(1, 0, 2, 3)[:, touched], encoded.permute(1, 0, 2, 3)[:, touched], atol=1e-4)
    # difference targets for the same items are another dataset, never mixed with these
    with pytest.raises(ValueError, match="other items or edits"):
        dl.build_dataset(shapes_final, model, items, tmp_path / "r", chunk=3, progress=False, edit_config=edits)
    # before the final step the latent is noisy: replace is refused, by the builder and by the trainer
    early = load_backbone(config(tmp_path / "e", backbone={"correction_step": 0.5}).backbone, torch.device("cpu"),
                          None)
    with pytest.raises(ValueError, match="correction_step 1.0"):
        dl.build_dataset(early, model, items, tmp_path / "e", chunk=3, progress=False, replace=True)
    with pytest.raises(ValueError, match="distill.replace"):
        Trainer(config(tmp_path / "t", backbone={"correction_step": 0.5}, distill={"replace": True}),
                backbone=early)
    with pytest.raises(ValueError, match="distill.decoder_epochs"):
        Trainer(config(tmp_path / "t2", backbone={"correction_step": 0.5}, distill={"decoder_epochs": 2}),
                backbone=early)
    # a given backbone must run as the config (which the run folder records) says: it trained with the object's
    # settings and recorded the config's, so a resume without the object continued on another backbone
    with pytest.raises(ValueError, match=r"Trainer: the given backbone runs with correction_step 0.5 \(config "
                                         r"backbone.correction_step: 1.0\)"):
        Trainer(config(tmp_path / "t3"), backbone=early)
    with pytest.raises(ValueError, match=r"num_inference_steps 2 \(config backbone.num_inference_steps: 3\)"):
        Trainer(config(tmp_path / "t4", backbone={"correction_step": 0.5, "num_inference_steps": 3}), backbone=early)
    assert not (tmp_path / "t3" / "config.json").exists()


def _shift_data(n: int, seed: int):
    """Toy move targets on 8x8 latents: a 2x2 object (channel 0 = 2) somewhere in the left half is the
    subject, to be moved 4 columns to the right (no object slot); the cells it leaves copy a free neighbour."""
    from xlard.models import move_sources

    g = torch.Generator().manual_seed(seed)
    z0 = 0.1 * torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.zeros(n, 64, dtype=torch.int64)
    shifts = torch.zeros(n, 2, 2, dtype=torch.int64)
    for i in range(n):
        y, x = int(torch.randint(0, 7, (1,), generator=g)), int(torch.randint(0, 3, (1,), generator=g))
        z0[i, 0, y:y + 2, x:x + 2] = 2.0
        labels[i].view(8, 8)[y:y + 2, x:x + 2] = 1
        shifts[i, 0, 1] = 4
    return {"z0": z0, "target": torch.zeros_like(z0), "source": move_sources(labels, shifts, 8, 8),
            "move_labels": labels, "move_shifts": shifts, "tokens": torch.zeros(n, 1, 8),
            "mask": torch.ones(n, 1, dtype=torch.bool), "pooled": torch.zeros(n, 8)}


def test_the_move_head_learns_where_cells_come_from():
    """fit_corrector with move targets: the head's hard choice gets the moved cells right on held-back
    items (it copies none at initialisation), keeps the others, and the corrected latent is the target."""
    from xlard.models import CorrectorConfig, ResidualCorrector, copy_cells
    from xlard.train import distill as dl

    data = _shift_data(256, 0)
    torch.manual_seed(0)
    corrector = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2, width=32,
                                                       depth=2, heads=2, cond_dim=8, move=True, move_range=7))
    common = dict(batch_size=16, weight_decay=0.0, val_fraction=0.25, seed=3, progress=False)
    stats = dl.fit_corrector(corrector, data, epochs=30, lr=3e-3, move_weight=1.0, **common)
    assert stats["val_none_cell_acc"] > 0.98 and stats["val_object_cell_acc"] > 0.9, stats
    assert stats["val_shift_acc"] > 0.9, stats
    fresh = _shift_data(32, 1)
    with torch.no_grad():
        zc, _ = corrector.correct(fresh["z0"], fresh["tokens"], fresh["pooled"], fresh["mask"])
    goal = copy_cells(fresh["z0"], fresh["source"]) + fresh["target"]
    assert (zc - goal).square().mean() < 0.2 * (fresh["z0"] - goal).square().mean()
    # The decoder-space fit adds the residual to the targets' own moves (a toy decoder: the identity).
    more = dl.fit_corrector_decoded(corrector, data, lambda z: z, epochs=1, lr=1e-3, move_weight=1.0, **common)
    assert more["decoder_val_pixel_mse"] < more["decoder_val_zero_pixel_mse"]
    # An auxiliary noun head (move_nouns) is fitted too, on the targets' nouns; it needs them.
    nouns = ResidualCorrector(corrector.config.replace(move_nouns=1))
    with_nouns = {**data, "move_nouns": (data["move_labels"] > 0).long()}
    before = nouns.move_noun.weight.detach().clone()
    dl.fit_corrector(nouns, with_nouns, epochs=1, lr=1e-3, **common)
    assert not torch.equal(nouns.move_noun.weight, before)
    with pytest.raises(ValueError, match="name no nouns"):
        dl.fit_corrector(nouns, data, epochs=1, lr=1e-3, **common)
    # A move head needs move targets, and move targets a move head.
    plain = ResidualCorrector(corrector.config.replace(move=False))
    with pytest.raises(ValueError, match="has no move head"):
        dl.fit_corrector(plain, data, epochs=1, lr=1e-3, **common)
    with pytest.raises(ValueError, match="no move targets"):
        dl.fit_corrector(corrector, {k: v for k, v in data.items() if k != "source"}, epochs=1, lr=1e-3, **common)


def test_move_config_checks(tmp_path):
    with pytest.raises(ValueError, match="fix_position: false"):
        config(tmp_path, distill={"move": True})
    with pytest.raises(ValueError, match="distill.move_margin"):
        config(tmp_path, distill={"move": True, "fix_position": False, "move_margin": 0})
    assert config(tmp_path).distill.move is False and config(tmp_path).distill.move_margin == 64


@needs_shapes
def test_a_move_run_writes_sources_and_exports_a_move_head(tmp_path, shapes_final):
    """distill.move with a move-head corrector: every shard carries the cells' sources (a moved cell's
    residual target is zero: the copy is the head's job), the fit reports the head's accuracy, the exported
    corrector has the head; a folder built without moves gets them added in place; mismatches are refused."""
    from xlard.evaluation import load_corrector_dir
    from xlard.shapes.understanding import load_model
    from xlard.train import distill as dl
    from xlard.train import train
    from xlard.train.data import Item, load_records
    from xlard.train.trainer import Trainer

    heads = {"corrector_overrides": {"patch": 2, "width": 16, "depth": 1, "move": True},
             "projector_overrides": {"patch": 2, "width": 16, "depth": 1}}
    with pytest.raises(ValueError, match="move head is on"):
        Trainer(config(tmp_path / "t1", model=heads), backbone=shapes_final)
    with pytest.raises(ValueError, match="move head is off"):
        Trainer(config(tmp_path / "t2", distill={"move": True, "fix_position": False}), backbone=shapes_final)
    out = tmp_path / "run"
    summary = train(config(out, model=heads, distill={"move": True, "fix_position": False}), backbone=shapes_final)
    shard = torch.load(out / "distill" / "data-0000.pt", weights_only=False)
    assert shard["source"].shape == (4, 256) and shard["move_margin"] == 64
    assert shard["move_nouns"].shape == (4, 256) and 0 <= int(shard["move_nouns"].min())
    assert int(shard["move_nouns"].max()) <= 4 and (shard["move_nouns"] > 0).any()
    moved = shard["source"] != torch.arange(256)
    assert torch.all(shard["target"].permute(0, 2, 3, 1).reshape(4, 256, -1)[moved] == 0)
    stats = json.loads((out / "distill" / "summary.json").read_text())
    assert "val_shift_acc" in stats and 0.0 <= stats["val_none_cell_acc"] <= 1.0
    corrector, _ = load_corrector_dir(summary["corrector"])
    assert corrector.config.move

    # Adding move targets to a finished target set: the sources appear, the color/count edits stay.
    records, _ = load_records("shapes:train")
    position = [r for r in records if r.get("tag") == "position"][:4]
    items = [Item(r, dl.DISTILL_SEED_BASE + i, i) for i, r in enumerate(position)]
    model = load_model()
    folder = tmp_path / "d"
    dl.build_dataset(shapes_final, model, items, folder, chunk=4, progress=False)
    before = torch.load(folder / "data-0000.pt", weights_only=False)
    dl.build_dataset(shapes_final, model, items, folder, chunk=4, progress=False, move_margin=64)
    after = torch.load(folder / "data-0000.pt", weights_only=False)
    assert after["source"].shape == (4, 256) and json.loads((folder / "manifest.json").read_text())["move_margin"] == 64
    moved = after["source"] != torch.arange(256)
    assert moved.any() and any("in the latent" in a for acts in after["actions"] for a in acts)
    assert torch.all(after["target"].permute(0, 2, 3, 1).reshape(4, 256, -1)[moved] == 0)
    kept = ~moved.view(4, 1, 16, 16).expand_as(after["target"])
    assert torch.equal(after["target"][kept], before["target"][kept])  # the editor's own targets stay
    from xlard.models import move_sources

    assert torch.equal(after["source"], move_sources(after["move_labels"], after["move_shifts"], 16, 16))
    with pytest.raises(ValueError, match="move targets"):
        dl.build_dataset(shapes_final, model, items, folder, chunk=4, progress=False)  # a move folder, no moves
    with pytest.raises(ValueError, match="move_margin"):
        dl.build_dataset(shapes_final, model, items, folder, chunk=4, progress=False, move_margin=0)


@needs_shapes
def test_a_reader_run_fits_the_reader_first_and_exports_it(tmp_path, shapes_final, monkeypatch):
    """model.corrector_overrides reader: true: the shards carry the understanding model's reading per latent
    cell, the reader is fitted before the corrector (its weights leave their initialisation, its accuracies are
    reported), it stays frozen through the corrector's fit, and the exported corrector reads with it."""
    from xlard.evaluation import load_corrector_dir
    from xlard.models import field_inputs
    from xlard.prompts import parse
    from xlard.train import train
    from xlard.train.trainer import Trainer

    heads = {"corrector_overrides": {"patch": 2, "width": 16, "depth": 1, "conditioning": "fields", "reader": True,
                                     "reader_width": 8},
             "projector_overrides": {"patch": 2, "width": 16, "depth": 1}}
    with pytest.raises(ValueError, match="reader: true needs the edit-target warm start"):
        Trainer(config(tmp_path / "t1", model=heads, distill={"items_per_tag": 0}, steps=1), backbone=shapes_final)
    for name in ("count_move", "count_edit"):
        counting = json.loads(json.dumps(heads))
        counting["corrector_overrides"][name] = True
        with pytest.raises(ValueError, match=f"{name}: true decodes the corrected latent.*correction_step 1.0, got 0.5"):
            Trainer(config(tmp_path / "t3", model=counting, backbone={"correction_step": 0.5}), backbone=shapes_final)
        # latent eyes asked for but not installed: said when the run starts, not at the export minutes later
        counting["corrector_overrides"]["count_eyes"] = "latent"
        monkeypatch.setenv("XLARD_SHAPES_LATENT_EYES", str(tmp_path / "no-eyes"))
        with pytest.raises(FileNotFoundError, match="count_eyes: latent reads counts with the shapes latent eyes, "
                                                    "and there are no latent eyes at .*no-eyes.*train_shapes_latent_eyes.py"):
            Trainer(config(tmp_path / "t4", model=counting), backbone=shapes_final)
        monkeypatch.delenv("XLARD_SHAPES_LATENT_EYES")
    wrong = json.loads(json.dumps(heads))
    wrong["corrector_overrides"]["reader_nouns"] = ["circle", "square"]
    with pytest.raises(ValueError, match="understanding model that labels its targets"):
        train(config(tmp_path / "t2", model=wrong), backbone=shapes_final)
    out = tmp_path / "run"
    from xlard.train import distill as dl

    seen = {}
    real_fit = dl.fit_reader

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(dl, "fit_reader", spy)
    summary = train(config(out, model=heads, distill={"reader_epochs": 2, "reader_batch_size": 2}),
                    backbone=shapes_final)
    assert seen["batch_size"] == 2 and seen["epochs"] == 2  # distill.reader_batch_size reaches the fit
    shard = torch.load(out / "distill" / "data-0000.pt", weights_only=False)
    assert shard["cell_nouns"].shape == (4, 4, 16, 16) and shard["cell_colors"].shape == (4, 11, 16, 16)
    assert torch.allclose(shard["cell_colors"].float().sum(1), torch.ones(4, 16, 16), atol=1e-2)
    stats = json.loads((out / "distill" / "summary.json").read_text())
    assert 0.0 <= stats["reader_val_color_acc"] <= 1.0 and stats["reader_epochs"] == 2
    rows = [json.loads(line) for line in (out / "distill" / "reader_metrics.jsonl").read_text().splitlines()]
    assert [r["reader_epoch"] for r in rows] == [1, 2]
    corrector, _ = load_corrector_dir(summary["corrector"])
    assert corrector.config.reader and corrector.config.reader_nouns == ("circle", "square", "triangle", "diamond")
    assert not any(p.requires_grad for p in corrector.reader.parameters())
    fresh = type(corrector)(corrector.config)
    assert not torch.equal(fresh.reader.out.weight, corrector.reader.out.weight)  # fitted, then saved
    assert not torch.equal(corrector.reader.scale, torch.ones_like(corrector.reader.scale))
    specs = [parse("a photo of a red circle left of a blue square")]
    z0 = torch.load(out / "distill" / "data-0000.pt", weights_only=False)["z0"][:1].float()
    evidence = corrector.read(z0, **{k: v for k, v in field_inputs(corrector.config, specs).items()
                                     if k != "pooled"})
    assert evidence.shape == (1, 4, 16, 16) and 0.0 <= float(evidence.min()) and float(evidence.max()) <= 1.0


@needs_shapes
def test_ppo_after_a_reader_fit_clips_the_policy_gradients_only(tmp_path, shapes_final, monkeypatch):
    """The reader's fit left its last gradients on the frozen reader, and PPO's clip counted every parameter with a
    gradient: each policy step's norm held the stale reader's too (about twice the policy's own, so real updates
    were clipped), and a resumed run, whose reader came from a file, had none: it trained another corrector."""
    from xlard.train import train
    from xlard.train.trainer import Trainer

    heads = {"corrector_overrides": {"patch": 2, "width": 16, "depth": 1, "conditioning": "fields", "reader": True,
                                     "reader_width": 8},
             "projector_overrides": {"patch": 2, "width": 16, "depth": 1}}
    seen = []
    real_clip = Trainer._clip

    def clip_spy(self):
        stale = [n for n, p in self.corrector.reader.named_parameters() if p.grad is not None]
        value = {id(p) for p in self.corrector.value_head.parameters()} \
            if getattr(self.corrector, "value_head", None) is not None else set()
        stepped = [p for g in self.policy_opt.param_groups for p in g["params"]
                   if p.grad is not None and id(p) not in value]
        want = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in stepped])))
        weight = next(self.corrector.reader.parameters())
        weight.grad = torch.full_like(weight, 100.0)  # a frozen part's gradient must not enter the norm
        got = real_clip(self)
        weight.grad = None
        seen.append((stale, want, got))
        return got

    monkeypatch.setattr(Trainer, "_clip", clip_spy)
    train(config(tmp_path / "run", model=heads, steps=1, distill={"reader_epochs": 1, "reader_batch_size": 2}),
          backbone=shapes_final)
    assert seen, "no PPO minibatch ran"
    for stale, want, got in seen:
        assert stale == [] and got == pytest.approx(want, rel=1e-5)


def test_a_reader_move_corrector_fits_its_residual_only():
    """The warm start fits the residual of a reader_move corrector exactly as without the move (which has no
    parameters and is not in the edit targets): both fits give the same weights, though the move acts."""
    from xlard.models import CorrectorConfig, ResidualCorrector, field_inputs
    from xlard.prompts import parse
    from xlard.train import distill as dl

    nouns, colors = ("circle", "square", "triangle", "diamond"), ("red", "blue")
    cfg = CorrectorConfig.tiny(latent_channels=4, text_dim=16, pooled_dim=16, patch=2, width=16, depth=1, heads=2,
                               cond_dim=8, conditioning="fields", reader=True, reader_nouns=nouns,
                               reader_colors=colors, reader_width=8)
    n = 16
    g = torch.Generator().manual_seed(0)
    inputs = field_inputs(cfg, [parse("a photo of a square left of a triangle")] * n)
    z0 = torch.randn(n, 4, 16, 16, generator=g)
    data = {"z0": z0, "target": 0.3 * torch.randn(n, 4, 16, 16, generator=g), "tokens": inputs["text_tokens"],
            "mask": inputs["text_mask"], "pooled": inputs["pooled"],
            "prompts": ["a photo of a square left of a triangle"] * n}
    probs = torch.zeros(n, 4, 16, 16)
    probs[:, 1, 6:9, 11:14] = 0.9  # the square on the right, the triangle on the left: both get moved
    probs[:, 2, 6:9, 2:5] = 0.9
    torch.manual_seed(0)
    plain = ResidualCorrector(cfg)
    moving = ResidualCorrector(cfg.replace(reader_move=True))
    moving.load_state_dict(plain.state_dict())
    for c in (plain, moving):
        c.reader.maps = lambda z: (probs[:z.shape[0]], torch.full((z.shape[0], 3, 16, 16), 1 / 3))
    assert not torch.equal(moving.sources(z0[:2], inputs["text_tokens"][:2], inputs["pooled"][:2],
                                          inputs["text_mask"][:2]), plain.sources(z0[:2], inputs["text_tokens"][:2],
                                                                                  inputs["pooled"][:2],
                                                                                  inputs["text_mask"][:2]))
    common = dict(batch_size=8, weight_decay=0.0, val_fraction=0.25, seed=3, progress=False)
    for c in (plain, moving):
        dl.fit_corrector(c, data, epochs=2, lr=3e-3, **common)
        dl.fit_corrector_decoded(c, data, lambda z: torch.tanh(z), epochs=1, lr=1e-3, **common)
    for (name, a), (_, b) in zip(plain.state_dict().items(), moving.state_dict().items()):
        assert torch.equal(a, b), name
    assert float(plain.head.weight.detach().abs().sum()) > 0  # the fits did train


def test_install_only_names_a_damaged_run_file(tmp_path, capsys):
    """--install-only of a run whose summary.json was {} ended in a KeyError traceback; a summary.json cut short or a
    cut last line of metrics.jsonl in "error: Unterminated string ..." naming no file. Each is one usage line naming
    the file and what to do, and the package data is left as it was."""
    import importlib.util

    from xlard.evaluation import CorrectorMeta, save_corrector_dir
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.train import load_config

    spec = importlib.util.spec_from_file_location(
        "train_shapes_corrector", Path(__file__).resolve().parents[1] / "scripts" / "train_shapes_corrector.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.TARGET = tmp_path / "installed"
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_corrector_dir(run / "corrector", ResidualCorrector(CorrectorConfig.tiny(latent_channels=8)),
                       CorrectorMeta("shapes", 1.0, 1.0, 20, 5.0, training={"note": "test"}))
    shipped = load_config(script.CONFIG, overrides={"out": str(run)})
    (run / "config.json").write_text(json.dumps(shipped.to_dict(), default=list))
    good = {"summary.json": '{"steps": 2}\n', "metrics.jsonl": '{"step": 1, "time/step": 1.5}\n{"step": 2, '
                                                                 '"time/step": null}\n'}
    for name, text in good.items():
        (run / name).write_text(text)
    assert script.main(["--install-only", "--out", str(run)]) == 0
    assert "PPO steps: 2" in (script.TARGET / "README.md").read_text()
    installed = {p.name: p.read_bytes() for p in script.TARGET.iterdir()}
    capsys.readouterr()
    for name, text, words in (
            ("summary.json", "{}", "summary.json is not the summary of a finished run (no step count \"steps\"); "
                                   "rerun with --resume (not --install-only)"),
            ("summary.json", '{"steps": 2, "out": "ru', "summary.json is not valid JSON (Unterminated string"),
            ("metrics.jsonl", good["metrics.jsonl"] + '{"step": 3, "time/st', "metrics.jsonl line 3 is not a metrics "
                                                                              "row"),
            ("metrics.jsonl", good["metrics.jsonl"] + "[1, 2]\n", "metrics.jsonl line 3 is not a metrics row")):
        (run / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            script.main(["--install-only", "--out", str(run)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--install-only: {run / name}" in err, err
        assert words in err and "Traceback" not in err, err
        # install() after a training run reads them the same way
        with pytest.raises(ValueError, match="^" + re.escape(f"train_shapes_corrector: {run / name}")):
            script.install(run, seconds=1.0)
        (run / name).write_text(good[name])
    assert {p.name: p.read_bytes() for p in script.TARGET.iterdir()} == installed


def _toy_data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(n, 4, 8, 8, generator=g)
    return {"z0": z0, "target": 0.1 * z0.flip(1), "tokens": torch.randn(n, 3, 8, generator=g),
            "mask": torch.ones(n, 3, dtype=torch.bool), "pooled": torch.randn(n, 8, generator=g)}


def test_fits_refuse_bad_arguments_and_data_by_name():
    """epochs 0 was a ZeroDivisionError and -1 returned untrained; batch_size -4 trained on order[0:-4]; a
    val_fraction of -0.1 held back 90%; a [N, 4, 1, 8] target broadcast; a NaN target left NaN weights."""
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.train import distill as dl

    corrector = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=8, patch=2, width=16,
                                                       depth=1, heads=2, cond_dim=8))
    common = dict(epochs=1, lr=1e-3, batch_size=4, weight_decay=0.0, val_fraction=0.2, seed=0, progress=False)
    data = _toy_data()
    short, broad, nan = dict(data), dict(data), dict(data)
    short["target"] = data["target"][:10]
    broad["target"] = data["target"][:, :, :1]
    nan["target"] = data["target"].clone()
    nan["target"][3, 0, 0, 0] = float("nan")
    for change, words in (({"epochs": 0}, "epochs must be an int >= 1, got 0"),
                          ({"epochs": -1}, "epochs must be an int >= 1, got -1"),
                          ({"batch_size": -4}, "batch_size must be an int >= 1, got -4"),
                          ({"val_fraction": -0.1}, r"val_fraction must be a number in \[0, 1\), got -0.1"),
                          ({"data": short}, r"one row per item \(20, as z0\), got \{'target': 10\}"),
                          ({"data": broad}, r"target must have z0's shape \(20, 4, 8, 8\), got \(20, 4, 1, 8\)"),
                          ({"data": nan}, r"target holds NaN or infinite values in 1 item\(s\) \(rows \[3\]\)")):
        kwargs = {**common, **change}
        with pytest.raises(ValueError, match=r"distill.fit_corrector: .*" + words):
            dl.fit_corrector(corrector, kwargs.pop("data", data), **kwargs)
    assert dl.fit_corrector(corrector, data, **common)["epochs"] == 1
    import numpy as np  # numpy numbers, as before the checks

    numpy_args = {**common, "epochs": np.int64(1), "batch_size": np.int32(4), "val_fraction": np.float32(0.2)}
    assert dl.fit_corrector(corrector, data, **numpy_args)["epochs"] == 1


def test_load_dataset_refuses_another_chunk_or_item_count(tmp_path):
    """Shards of 5 items in chunks of 2 read as 4 rows for (5, 4), 4 rows for 3 items; 0 was a bare error."""
    from xlard.train import distill as dl

    for k, n in enumerate([2, 2, 1]):
        part = {key: value[:n] for key, value in _toy_data(n).items()}
        torch.save({**part, "prompts": ["p"] * n, "tags": ["t"] * n, "actions": [[]] * n, "seconds": 1.0},
                   tmp_path / f"data-{k:04d}.pt")
    assert dl.load_dataset(tmp_path, 5, 2)["z0"].shape[0] == 5
    import numpy as np

    assert dl.load_dataset(tmp_path, np.int64(5), np.int64(2))["z0"].shape[0] == 5
    for n_items, chunk, words in ((5, 4, "hold 4 rows"), (3, 2, "hold 4 rows"), (0, 2, "n_items must be an int >= 1"),
                                  (5, 0, "chunk must be an int >= 1")):
        with pytest.raises(ValueError, match=f"distill.load_dataset: .*{words}"):
            dl.load_dataset(tmp_path, n_items, chunk)


def test_a_refused_build_leaves_the_manifest_as_it_was(tmp_path, monkeypatch):
    """A call with other items and move_margin wrote move_margin into the saved manifest before it was refused:
    the folder was then refused for the settings it was built with. Bad items/chunk are refused before any write."""
    import types

    from xlard.train import distill as dl
    from xlard.train.data import Item

    monkeypatch.setattr(dl, "vae_encoder", lambda backbone: (lambda images: images))
    backbone = types.SimpleNamespace(correction_step=1.0)  # no encode(): the builds stop after the manifest
    a = [Item({"prompt": "a red circle", "tag": "single_object"}, dl.DISTILL_SEED_BASE + i, i) for i in range(3)]
    b = [Item({"prompt": "a blue square", "tag": "single_object"}, dl.DISTILL_SEED_BASE + i, i) for i in range(3)]
    folder = tmp_path / "d"
    with pytest.raises(AttributeError):
        dl.build_dataset(backbone, None, a, folder, chunk=2, progress=False)
    before = (folder / "manifest.json").read_text()
    with pytest.raises(ValueError, match="holds edit targets built for other items or edits"):
        dl.build_dataset(backbone, None, b, folder, chunk=2, progress=False, move_margin=8)
    assert (folder / "manifest.json").read_text() == before
    with pytest.raises(AttributeError):  # the first settings are accepted again (it was "other items")
        dl.build_dataset(backbone, None, a, folder, chunk=2, progress=False)
    for items, chunk, words in (([], 2, "no items"), (a, 0, "chunk"), (a, 2.5, "chunk")):
        with pytest.raises(ValueError, match=words):
            dl.build_dataset(backbone, None, items, tmp_path / "e", chunk=chunk, progress=False)
    assert not (tmp_path / "e").exists()
