"""xlard.train end to end: shapes backbone, ablations, tiny diffusers families, SIGKILL + resume, torchrun.

Every run here is tiny (2 denoising steps, 4-8 rollouts per step, 1-4 steps) so
the file stays CI-sized; what is checked is behaviour, not learning.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from xlard.shapes import backbone as shapes_backbone  # noqa: E402
from xlard.train import config_from_dict  # noqa: E402
from xlard.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint  # noqa: E402
from xlard.train.metrics import TIMING_PREFIX, MetricsLog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_shapes = pytest.mark.skipif(not shapes_backbone.is_available(), reason="shapes backbone weights not installed")

TINY = {
    "steps": 2, "seed": 3,
    "backbone": {"name": "shapes", "correction_step": 0.5, "num_inference_steps": 2, "device": "cpu"},
    "data": {"prompts": "shapes:train", "seeds_per_prompt": 2, "monitor_size": 4, "max_prompts": 60},
    "model": {"corrector_overrides": {"patch": 2, "width": 16, "depth": 1}, "projector_overrides": {"patch": 2,
                                                                                                     "width": 16,
                                                                                                     "depth": 1}},
    "ppo": {"prompts_per_step": 2, "group_size": 2, "epochs": 2, "minibatches": 2},
    "optim": {"lr": 1e-3},
    "projector": {"warmup_batches": 1, "warmup_epochs": 2, "refresh_epochs": 1, "minibatches": 2},
    "log": {"monitor_every": 1, "evaluate_every": 2, "checkpoint_every": 1, "progress": False, "tensorboard": "off"},
}


def _merge(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def tiny_config(out: Path, **changes):
    return config_from_dict(_merge(TINY, changes), overrides={"out": str(out)})


@pytest.fixture(scope="module")
def shapes(request):
    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone weights not installed")
    from xlard.train.trainer import load_backbone

    return load_backbone(tiny_config(Path("unused")).backbone, torch.device("cpu"))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _corrector_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "corrector" / "model.safetensors"))


def _metrics(folder: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIX)}
            for row in MetricsLog.read(folder / "metrics.jsonl")]


@needs_shapes
def test_shapes_run_writes_everything(tmp_path, shapes, capsys):
    from xlard.models import ResidualCorrector
    from xlard.train import train

    out = tmp_path / "run"
    # --resume into a folder with no checkpoint (a new run, or a typo in --out) starts a new run and says so
    summary = train(tiny_config(out), resume=True, backbone=shapes)
    assert "--resume: no checkpoint there yet, so a new run starts" in capsys.readouterr().err
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    for key in ("reward/joint_policy", "reward/joint_image", "ppo/approx_kl", "ppo/clip_fraction",
                "ppo/log_ratio_abs_max", "projector/loss", "monitor/corr_joint", "lam/mean", "time/encode",
                "time/sample", "time/decode", "time/reward", "time/update", "time/overhead_fraction"):
        assert key in first, key
    assert rows[1]["monitor/evaluator"] is not None and 0.0 <= rows[1]["monitor/evaluator"] <= 1.0
    assert first["decodes"] == 4
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "config.json").read_text())
    assert saved["ppo"]["group_size"] == 2
    corrector = ResidualCorrector.from_pretrained(summary["corrector"])
    assert corrector.config.patch == 2
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == 2
    for key in ("corrector", "projector", "policy_opt", "projector_opt", "scheduler", "reward_stats",
                "data_position", "rank_state"):
        assert key in state, key
    assert {"buffer", "refs", "rng"} <= set(state["rank_state"][0])
    assert len(state["rank_state"][0]["buffer"]["slots"]) == 3  # warm start + 2 refreshes
    # A second run into the same folder must not clobber it.
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(out), backbone=shapes)
    # Resuming a finished run is a no-op that keeps the metrics, and its exports (it exported again: the step-size
    # calibration decodes for minutes); an export cut short (no summary.json) is made again.
    capsys.readouterr()
    exported = {p: p.stat().st_mtime_ns for p in (out / "corrector").iterdir()}
    assert train(tiny_config(out), resume=True, backbone=shapes) == summary
    assert len(MetricsLog.read(out / "metrics.jsonl")) == 2
    err = capsys.readouterr().err
    assert "(resuming from " in err and "the run finished at step 2 of 2; its exports are in place" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "corrector").iterdir()} == exported
    (out / "summary.json").unlink()
    assert train(tiny_config(out), resume=True, backbone=shapes)["steps"] == 2
    assert (out / "summary.json").is_file() and "nothing to do" not in capsys.readouterr().err
    # Resuming with a different config is refused.
    with pytest.raises(ValueError, match="differs"):
        train(tiny_config(out, ppo={"clip": 0.3}), resume=True, backbone=shapes)
    # A config saved before a field existed resumes: the missing field reads as its default.
    saved.get("export", {}).pop("min_gain_se", None)
    (out / "config.json").write_text(json.dumps(saved))
    train(tiny_config(out), resume=True, backbone=shapes)
    with pytest.raises(ValueError, match=r"differs from the one the run was trained with \(saved in "
                                         r".*ckpt-00000002.pt\): export.min_gain_se: 2.0 -> 3.0; resume with"):
        train(tiny_config(out, export={"min_gain_se": 3.0}), resume=True, backbone=shapes)
    # An edited config.json is no way around the check: the checkpoint's own config is the reference (an edited
    # optim.lr resumed, and the restored schedule then kept the old rate without a word).
    edited = json.loads((out / "config.json").read_text())
    edited["optim"]["lr"] = 0.005
    (out / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"trained with \(saved in .*ckpt-00000002.pt\): optim.lr: 0.001 -> "
                                         r"0.005; resume with that config"):
        train(config_from_dict(edited), resume=True, backbone=shapes)
    (out / "config.json").write_text(json.dumps(saved))
    # The progress bar is no part of the run: `xlard train --quiet` (log.progress false) resumes a run started with it.
    train(tiny_config(out, log={"progress": True}), resume=True, backbone=shapes)
    # Without config.json the newest checkpoint's config is compared (a changed config resumed silently).
    kept = (out / "config.json").read_text()
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match=r"differs from the one the run was trained with \(saved in "
                                         r".*ckpt-00000002.pt\): ppo.clip: [0-9.]+ -> 0.3; resume"):
        train(tiny_config(out, ppo={"clip": 0.3}), resume=True, backbone=shapes)
    train(tiny_config(out), resume=True, backbone=shapes)
    (out / "config.json").write_text(kept)
    # A damaged latest checkpoint (a cut copy of the run folder) is named, with the one to resume from.
    steps = [p.name for _, p in list_checkpoints(out)]
    assert steps == ["ckpt-00000001.pt", "ckpt-00000002.pt"]  # checkpoint_every 1, keep_checkpoints 2
    data = (out / steps[1]).read_bytes()
    (out / steps[1]).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="ckpt-00000002.pt: a damaged checkpoint, it cannot be read .*; delete it "
                                         "to resume from the one before, .*ckpt-00000001.pt"):
        train(tiny_config(out), resume=True, backbone=shapes)
    (out / steps[1]).unlink()
    train(tiny_config(out), resume=True, backbone=shapes)  # from step 1: step 2 runs again
    assert load_checkpoint(latest_checkpoint(out))["step"] == 2
    # A killed checkpoint write's leftover goes on resume (it grew by a checkpoint's size per kill).
    (out / ".tmp-0badf00d-ckpt-00000003.pt").write_bytes(b"partial")
    train(tiny_config(out), resume=True, backbone=shapes)
    assert not list(out.glob(".tmp-*"))
    # A damaged config.json is named, not a JSON parser's message or a TypeError.
    good = (out / "config.json").read_text()
    # (With checkpoints, the newest one's config is the reference: a damaged config.json is written anew.)
    (out / "config.json").write_text(good[:40])
    train(tiny_config(out), resume=True, backbone=shapes)
    assert json.loads((out / "config.json").read_text()) == json.loads(good)
    early = tmp_path / "early"  # a run stopped before its first checkpoint: its config.json is the reference
    early.mkdir()
    for bad, words in (("[1]", "must hold the run's config"), (good[:40], "config.json is not valid JSON")):
        (early / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=words):
            train(tiny_config(early), resume=True, backbone=shapes)
    # A checkpoint whose models have another shape (another run's) is named, not a 68-line state_dict error.
    path = latest_checkpoint(out)
    state = load_checkpoint(path)
    key = next(k for k, v in state["corrector"].items() if v.dim() == 2)
    state["corrector"][key] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"--resume: .*ckpt-00000002.pt holds models of another shape"):
        train(tiny_config(out), resume=True, backbone=shapes)


@needs_shapes
def test_resume_with_another_process_count_is_refused_before_the_backbone_loads(tmp_path, shapes, monkeypatch):
    """The process-count check ran after the backbone had loaded (6.5 s for the shapes backbone, minutes for a real
    one); it now reads the newest checkpoint's world size (memory-mapped) first."""
    from xlard.train import train, trainer

    out = tmp_path / "run"
    train(tiny_config(out, steps=1), backbone=shapes)
    monkeypatch.setattr(trainer, "_dist_info", lambda: (0, 2, 0))
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda *a, **k: None)  # no peer here: the check is first
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"--resume: .*ckpt-00000001.pt was written by 1 process\(es\); resume with "
                                         r"the same number \(got 2\)"):
        train(tiny_config(out, steps=1), resume=True)


@needs_shapes
def test_resume_refuses_runs_whose_reward_this_version_cannot_rebuild(tmp_path, shapes, monkeypatch):
    """A clip run from before the clip source's absolute reading (2026-12-07) resumed under the new reading without
    a word (both recorded just {model}); a reward_model image + confidence head run (random aspect weights from an
    unfitted head) was told to set confidence uniform, then refused for the changed config."""
    pytest.importorskip("transformers")
    from helpers import tiny_clip_model, word_level_tokenizer

    from xlard.train import checkpoint as ckpt
    from xlard.train import train, trainer

    tokenizer = word_level_tokenizer("a photo of the background object circle square triangle diamond red blue "
                                     "green two three left right".split())
    folder = tmp_path / "clip"
    tiny_clip_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    clip = {"reward": {"source": "CLIP", "options": {"model": str(folder)}}}  # spelled as a user may: read as clip
    train(tiny_config(out, steps=1, **clip), backbone=shapes)
    path = ckpt.list_checkpoints(out)[-1][1]
    state = ckpt.load_checkpoint(path)
    assert state["reward_options"]["threshold"] == 0.5  # recorded since
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(AssertionError, match="loaded"):  # the checks pass: the run would go on
        train(tiny_config(out, steps=1, **clip), resume=True)
    state["reward_options"].pop("threshold")  # as a run of before recorded it
    ckpt.save_atomic(state, path)
    with pytest.raises(ValueError, match=r"--resume: the run was trained with the clip source's reading of before "
                                         r"2026-12-07 .*no option gives the old reading back: start a new run"):
        train(tiny_config(out, steps=1, **clip), resume=True)
    monkeypatch.undo()
    # a run of another source resumed with a clip config: the difference is the source, not the clip reading
    plain = tmp_path / "plain"
    train(tiny_config(plain, steps=1), backbone=shapes)
    with pytest.raises(ValueError, match=r"--resume: the config differs .*reward.source: \"auto\" -> \"CLIP\""):
        train(tiny_config(plain, steps=1, **clip), resume=True)

    out = tmp_path / "image"
    image = {"reward_model": "image", "confidence": "uniform", "projector": {"warmup_batches": 0}}
    train(tiny_config(out, steps=1, **image), backbone=shapes)
    path = ckpt.list_checkpoints(out)[-1][1]
    state = ckpt.load_checkpoint(path)
    state["config"]["confidence"] = "head"  # as an earlier version let it be
    ckpt.save_atomic(state, path)
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"--resume: the run was trained with reward_model 'image' and confidence "
                                         r"'head' .*cannot be resumed: start a new run with confidence: uniform"):
        train(tiny_config(out, steps=1, **image), resume=True)


def test_resume_keeps_the_reward_a_run_was_trained_with_when_a_default_changes(tmp_path, shapes, monkeypatch):
    """A run started before the shapes source's count default changed (its checkpoint records the options it was
    trained with) resumed with the same config silently switched reward; now that is refused with the options to
    pin, and pinning them resumes."""
    from xlard.train import checkpoint as ckpt
    from xlard.train import train, trainer

    out = tmp_path / "run"
    train(tiny_config(out, steps=1), backbone=shapes)
    path = ckpt.list_checkpoints(out)[-1][1]
    state = ckpt.load_checkpoint(path)
    assert state["reward_options"] == {"soft_count": True, "count_confidence": False}
    state["reward_options"] = {"soft_count": False, "count_confidence": True}  # as trained before the default moved
    ckpt.save_atomic(state, path)
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"--resume: the run was trained with reward.options \{'soft_count': False, "
                                         r"'count_confidence': True\}; .*a default changed.* write reward.options: "
                                         r"\{\"soft_count\": false, \"count_confidence\": true\} into the config"):
        train(tiny_config(out, steps=1), resume=True)
    pinned = {"reward": {"options": {"soft_count": False, "count_confidence": True}}}
    with pytest.raises(AssertionError, match="loaded"):  # the checks passed: the run would go on
        train(tiny_config(out, steps=1, **pinned), resume=True)
    with pytest.raises(ValueError, match=r"config differs .*reward.options"):  # another reward is still refused
        train(tiny_config(out, steps=1, reward={"options": {"soft_count": True, "count_confidence": True}}),
              resume=True)


@needs_shapes
def test_first_minibatch_ratio_check_catches_a_changed_policy(tmp_path, shapes, monkeypatch):
    from xlard.train import trainer as T

    real = T.sample_rollouts

    def stale(*args, **kwargs):
        r = real(*args, **kwargs)
        return r._replace(log_prob=r.log_prob + 1e-4)

    monkeypatch.setattr(T, "sample_rollouts", stale)
    with pytest.raises(RuntimeError, match="not exactly 1"):
        T.train(tiny_config(tmp_path / "run", steps=1), backbone=shapes)


@needs_shapes
@pytest.mark.parametrize("changes", [
    {"rl": "pathwise"},
    {"reward_model": "image", "confidence": "uniform", "projector": {"warmup_batches": 0}},
    {"confidence": "uniform", "anchor": "ref", "anchor_ref_min_reward": 0.0, "optim": {"ema": 0.9},
     "ppo": {"advantage": "value", "logprob_reduction": "sum", "reward_norm": True, "epochs": 1}},
    {"anchor": "none", "projector": {"refresh_every": 2}},
    {"reward_model": "image", "confidence": "uniform", "projector": {"warmup_batches": 0},
     "model": {"corrector_overrides": {"action_block": 4}}},
], ids=["pathwise", "image-reward", "uniform-ref-value-ema", "no-anchor-sparse-refresh", "action-block"])
def test_ablations_run(tmp_path, shapes, changes):
    from xlard.train import train

    out = tmp_path / "run"
    train(tiny_config(out, **changes), backbone=shapes)
    rows = MetricsLog.read(out / "metrics.jsonl")
    assert len(rows) == 2
    if changes.get("rl") == "pathwise":
        assert "pathwise/objective" in rows[0] and "ppo/approx_kl" not in rows[0]
    if changes.get("reward_model") == "image":
        assert "projector/loss" not in rows[0] and rows[0]["decodes"] == 4
        assert "monitor/corr_joint" not in rows[0] and "monitor/reward_joint" in rows[0]
    if changes.get("anchor") == "ref":
        state = load_checkpoint(latest_checkpoint(out))
        assert state["rank_state"][0]["refs"], "a reference latent was recorded"
        assert state["ema"] is not None
    if changes.get("projector", {}).get("refresh_every") == 2:
        assert [r["decodes"] for r in rows] == [4, 0]
    if "model" in changes:
        from xlard.evaluation import load_corrector_dir

        corrector, _ = load_corrector_dir(out / "corrector")
        assert corrector.config.action_block == 4
        with torch.no_grad():  # two tiny steps rarely move the policy: give the loaded head weights
            corrector.head.weight.normal_(0, 0.1)
        cfg = corrector.config
        mean = corrector(torch.randn(1, cfg.latent_channels, 16, 16), torch.randn(1, 8, cfg.text_dim),
                         torch.randn(1, cfg.pooled_dim))
        assert float(mean.abs().max()) > 0
        assert torch.equal(mean, mean[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "pixart"])
def test_tiny_diffusers_families(tmp_path, family):
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_pipelines as TP

    from xlard.train import train

    build, options = TP.FAMILIES[family]
    folder = build(tmp_path / family)
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
         "prompt": "a photo of two cats"},
        {"tag": "position", "include": [{"class": "car", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["left of", 0]}],
         "exclude": [], "prompt": "a photo of a dog left of a car"},
        {"tag": "colors", "include": [{"class": "ball", "count": 1, "color": "red"}], "exclude": [],
         "prompt": "a photo of a red ball"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_config(tmp_path / "run", steps=1,
                      backbone={"name": str(folder), "guidance_scale": 2.0, "options": options},
                      data={"prompts": str(prompts), "max_prompts": None, "monitor_size": 2},
                      log={"evaluate_every": 1})
    summary = train(cfg)
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["ppo/ratio_mean"] is not None
    assert "monitor/evaluator" not in rows[0]  # not the shapes world: no exact evaluator
    assert Path(summary["corrector"], "model.safetensors").is_file()
    # the corrector folder records how the backbone sampled, and loading it for eval / generate samples so again
    # (a FLUX corrector trained at 32 x 32 with 32 text tokens ran at 256 x 256 with 512)
    from xlard import evaluation as ev

    corrector, meta = ev.load_corrector_dir(summary["corrector"])
    loaded = ev.load_backbone_for(meta, corrector=corrector)
    want_size = (options.get("height"), options.get("width"))
    assert meta.sampler["pipeline"] == type(loaded.pipeline).__name__
    if want_size[0]:
        assert (meta.sampler["height"], meta.sampler["width"]) == want_size == (loaded.height, loaded.width)
    assert meta.sampler["max_sequence_length"] == options.get("max_sequence_length", loaded.family.max_sequence_length)
    assert loaded.family.max_sequence_length == meta.sampler["max_sequence_length"]


@needs_shapes
def test_a_resume_reads_the_prompts_and_models_the_run_started_with(tmp_path, shapes, monkeypatch):
    """A resume after the prompt file was rewritten, or with $XLARD_SHAPES_UNDERSTANDING naming another reward
    model, went on without a word: one run mixed two prompt sets or two rewards."""
    import shutil

    from xlard.shapes import prompts as P
    from xlard.shapes.understanding import model_path
    from xlard.train import train

    train_records = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["train"]
    prompts = tmp_path / "p.jsonl"
    P.write_jsonl(prompts, P.sample_records(train_records, 12, seed=0))
    out = tmp_path / "run"
    cfg = tiny_config(out, steps=1, data={"prompts": str(prompts), "max_prompts": None})
    train(cfg, backbone=shapes)
    state = load_checkpoint(latest_checkpoint(out))
    assert set(state["inputs"]["models"]) == {"backbone", "reward"}
    P.write_jsonl(prompts, P.sample_records(train_records, 12, seed=1))  # regenerated with another seed
    from xlard.train import trainer as T

    real_load = T.load_backbone
    monkeypatch.setattr(T, "load_backbone", lambda *a, **k: pytest.fail("the prompts are checked before the load"))
    with pytest.raises(ValueError, match=r"--resume: .*ckpt-00000001.pt was trained on other inputs: the prompt "
                                         r"records of data.prompts \(.*p.jsonl\) changed since the run started"):
        train(cfg, resume=True)
    monkeypatch.setattr(T, "load_backbone", real_load)
    P.write_jsonl(prompts, P.sample_records(train_records, 12, seed=0))
    other = tmp_path / "understanding"
    shutil.copytree(model_path(), other)
    (other / "NOTES.md").write_text("a report beside the weights")  # no model file: no change
    (other / ".cache").mkdir()
    (other / ".cache" / "config.json").write_text("{}")  # a hub cache's metadata: no model file either
    from xlard.train.trainer import _folder_fingerprint

    assert _folder_fingerprint(other) == _folder_fingerprint(model_path())
    monkeypatch.setenv("XLARD_SHAPES_UNDERSTANDING", str(other))
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # another model's config
    with pytest.raises(ValueError, match=r"other inputs: the reward model's files \(.*understanding\) changed "
                                         r"since the run started .*\$XLARD_SHAPES_UNDERSTANDING names another reward "
                                         r"model"):
        train(cfg, resume=True, backbone=shapes)
    monkeypatch.delenv("XLARD_SHAPES_UNDERSTANDING")
    assert train(cfg, resume=True, backbone=shapes)["steps"] == 1  # its own files back: it resumes


def test_float16_on_the_cpu_is_refused_as_generate_refuses_it(tmp_path):
    """A config's dtype float16 with the device set to the CPU trained in float16 on the CPU without a word, while
    `xlard generate` and `xlard eval` refuse --dtype float16 there."""
    from xlard.train.trainer import load_backbone

    for device in ("cpu", "auto"):
        cfg = tiny_config(tmp_path / "run", steps=1, backbone={"dtype": "float16", "device": device})
        with pytest.raises(ValueError, match=r"backbone.dtype: float16 runs on a GPU, and this run's device is the "
                                             r"CPU .*--set backbone.dtype=float32"):
            load_backbone(cfg.backbone, torch.device("cpu"))


def test_a_corrector_records_where_its_relative_backbone_was(tmp_path, monkeypatch):
    """Trained with backbone.name "sd" (a folder in the current folder), the corrector recorded "sd": eval from
    another folder loaded whatever ./sd was there (or failed with the hub's own words, exit 1)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_pipelines as TP

    from xlard import evaluation as ev
    from xlard.train import train

    work = tmp_path / "work"
    folder = TP.tiny_sd_pipeline(work / "sd")
    prompts = work / "prompts.jsonl"
    prompts.write_text(json.dumps({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [],
                                   "prompt": "a photo of two cats"}) + "\n")
    monkeypatch.chdir(work)
    cfg = tiny_config(Path("run"), steps=1, backbone={"name": "sd", "guidance_scale": 2.0},
                      data={"prompts": "prompts.jsonl", "max_prompts": None, "monitor_size": 0})
    summary = train(cfg)
    corrector, meta = ev.load_corrector_dir(work / summary["corrector"])
    assert meta.backbone == str(folder.resolve()) and meta.training["run"] == str((work / "run").resolve())
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sd").mkdir(parents=True)  # another ./sd: not what the corrector was trained on
    monkeypatch.chdir(elsewhere)
    assert ev.load_backbone_for(meta, corrector=corrector).pipeline.name_or_path == str(folder.resolve())
    old = dataclasses.replace(meta, backbone="gone")  # a corrector exported before: the name alone
    with pytest.raises(ValueError, match=r"^the corrector's backbone \(recorded in its xlard_corrector.json\): "
                                         r"'gone' is not a local folder and not a loadable hub model.*"
                                         r"\(if that names a folder relative to where the corrector was trained"):
        ev.load_backbone_for(old, corrector=corrector)
    with pytest.raises(ValueError, match=r"^backbone: 'bad name' is neither a local folder nor a valid hub id"):
        ev.load_backbone_for(meta, backbone="bad name")  # the hub's own HFValidationError text, unnamed, before
    from xlard.train.trainer import _absolute_folder

    (elsewhere / "shapes").mkdir()  # "shapes" is the shapes world's backbone whatever ./shapes holds
    assert _absolute_folder("shapes") == "shapes" and _absolute_folder("sd") == str((elsewhere / "sd").resolve())
    assert _absolute_folder("org/model") == "org/model" and _absolute_folder(3) == 3


@needs_shapes
def test_the_shapes_source_refuses_prompts_it_cannot_see(tmp_path):
    """reward.source: shapes on a real backbone's prompts ("two cats") loaded everything, warmed R_phi up and
    failed at the first reward ("entity 0 ('cat') ... has no map"); now before any step, naming the record."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_pipelines as TP

    from xlard.train import train

    folder = TP.tiny_sd_pipeline(tmp_path / "sd")
    prompts = tmp_path / "prompts.jsonl"
    records = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "exclude": [],
                "prompt": "a photo of a red circle"},
               {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [],
                "prompt": "a photo of two cats"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_config(tmp_path / "run", steps=1, backbone={"name": str(folder), "guidance_scale": 2.0},
                      reward={"source": "shapes"},
                      data={"prompts": str(prompts), "max_prompts": None, "monitor_size": 0})
    with pytest.raises(ValueError, match=r"data.prompts: .*prompts.jsonl record 1 \('a photo of two cats'\) asks "
                                         r"for the noun 'cat', which the 'shapes' reward source cannot see .*"
                                         r"use reward.source: clip"):
        train(cfg)
    assert not list((tmp_path / "run").glob("ckpt-*.pt"))


@needs_shapes
def test_a_diverged_update_stops_the_run_before_its_checkpoints_push_the_good_ones_out(tmp_path, monkeypatch):
    """A NaN in the weights was trained on and checkpointed: two more steps (keep_checkpoints 2) and every good
    checkpoint was gone, the exported corrector NaN. Now the run stops at that step, naming the last good one."""
    from xlard.train import trainer as T
    from xlard.train.checkpoint import load_checkpoint

    real_step = T.Trainer.train_step

    def diverging_step(self):
        row = real_step(self)
        if self.step == 3:
            with torch.no_grad():
                next(self.corrector.parameters()).fill_(float("nan"))
        return row

    monkeypatch.setattr(T.Trainer, "train_step", diverging_step)
    with pytest.raises(ValueError, match=r"step 3: the corrector's weights became NaN or infinite in this step's "
                                         r"update .* its newest checkpoint, ckpt-00000002.pt \(step 2\), is "
                                         r"untouched; train again with a lower optim.lr \(now 0.001\)"):
        T.train(tiny_config(tmp_path / "run", steps=5))
    names = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt"))
    assert names == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    state = load_checkpoint(tmp_path / "run" / "ckpt-00000002.pt")
    assert all(torch.isfinite(v).all() for v in state["corrector"].values() if v.is_floating_point())


@pytest.mark.parametrize("recipe, family", [("sd15_clip", "sd"), ("sdxl_clip", "sdxl")])
def test_the_real_backbone_recipe_trains_on_tiny_stand_ins(tmp_path, recipe, family):
    """configs/sd15_clip.yaml and sdxl_clip.yaml as a user runs them, with tiny random stand-ins for the backbone
    and CLIP (their folders in place of the hub ids), on the CPU in float32: the clip source's run trains, logs
    and exports, with the recipe's corrector."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_pipelines as TP
    from helpers import tiny_clip_model, word_level_tokenizer

    from xlard.evaluation import load_corrector_dir
    from xlard.train import load_config, train

    sd = TP.FAMILIES[family][0](tmp_path / family)
    words = ["a", "photo", "of", "two", "cats", "cat", "dog", "red", "ball", "left", "the", "background", "object",
             "blue", "green", "."]
    tokenizer = word_level_tokenizer(words)
    clip = tmp_path / "clip"
    tiny_clip_model(len(tokenizer)).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    prompts = tmp_path / "prompts.jsonl"
    records = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [],
                "prompt": "a photo of two cats"},
               {"tag": "colors", "include": [{"class": "ball", "count": 1, "color": "red"}], "exclude": [],
                "prompt": "a photo of a red ball"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml", overrides={
        "out": str(tmp_path / "run"), "steps": 1, "backbone.name": str(sd), "backbone.device": "cpu",
        "backbone.dtype": "float32", "backbone.num_inference_steps": 2, "data.prompts": str(prompts),
        "data.seeds_per_prompt": 2, "data.monitor_size": 2, "reward.options": {"model": str(clip)},
        "ppo.prompts_per_step": 2, "ppo.group_size": 2, "projector.warmup_batches": 1, "log.progress": False,
        "log.tensorboard": "off"})
    assert cfg.reward.source == "clip" and cfg.log.evaluate_every == 0
    summary = train(cfg)
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["ppo/ratio_mean"] is not None and "monitor/evaluator" not in rows[0]
    corrector, meta = load_corrector_dir(summary["corrector"])
    assert meta.training["reward_source"] == "clip" and meta.correction_step == 0.6
    assert meta.sampler["pipeline"] == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    assert corrector.config.patch == cfg.model.corrector_overrides.get("patch", 1)


def _config_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_merge(TINY, changes)))
    return path


@needs_shapes
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = _config_file(tmp_path, steps=4)
    cmd = [sys.executable, "-m", "xlard", "train", str(cfg)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(cmd + ["--out", str(full)], env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + ["--out", str(cut)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (cut / "ckpt-00000002.pt").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists(), "killed mid-run"
    subprocess.run(cmd + ["--out", str(cut), "--resume"], env=_env(), check=True, capture_output=True, timeout=600)
    a, b = _corrector_tensors(full), _corrector_tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(full) == _metrics(cut)
    assert [r["step"] for r in _metrics(cut)] == [1, 2, 3, 4]


@needs_shapes
def test_torchrun_two_processes_match_one(tmp_path):
    cfg = _config_file(tmp_path, steps=2, log={"monitor_every": 0, "evaluate_every": 0})
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "xlard", "train", str(cfg), "--out", str(one)], env=_env(), check=True,
                   capture_output=True, timeout=600)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "xlard", "train", str(cfg), "--out", str(two)], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_max_difference"] == 0.0
    a, b = _corrector_tensors(one), _corrector_tensors(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    ma, mb = _metrics(one), _metrics(two)
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        for key in ("reward/joint_policy", "reward/joint_image"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key
        # the update's and the projector's numbers describe the global batch, not process 0's half of it
        # (value_loss, projector/loss and the ratio statistics were process 0's alone)
        for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/ratio_mean", "ppo/ratio_max", "ppo/ratio_min",
                    "ppo/clip_fraction", "ppo/grad_norm", "projector/loss", "projector/mse_count"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("ending", ["returned", "raised"])
def test_the_process_group_is_destroyed_after_the_ddp_wrappers(tmp_path, monkeypatch, ending):
    """A two-process run hung at exit about once in fourteen: the DDP wrappers outlived destroy_process_group,
    so the group's destructor ran inside the reducer's deallocation holding the GIL and joined a gloo worker
    waiting for that GIL. The wrappers must be gone (reducers freed) before the group is destroyed, also when
    the run ends with an exception whose traceback's frames hold them (a peer's failure, a bug)."""
    import gc
    import types
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from xlard.train import trainer as trainer_mod

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        policy, projector = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
        wrappers = [DDP(policy), DDP(projector)]
        for w in wrappers:  # one collective each, as a run ends on one
            w(torch.ones(4, w.module.in_features)).sum().backward()
        dist.barrier()
        fake = types.SimpleNamespace(policy=policy, projector=projector, policy_model=wrappers[0],
                                     projector_model=wrappers[1])
        refs = [weakref.ref(w) for w in wrappers]
        error = None
        if ending == "raised":
            def fit(model):  # a frame of the traceback holds the wrapper, as fit_projector's does
                raise RuntimeError("Connection closed by peer")

            try:
                try:
                    fit(wrappers[1])
                except RuntimeError as exc:
                    raise trainer_mod.PeerFailure("process 0 of 2: another process stopped") from exc
            except trainer_mod.PeerFailure as exc:
                error = exc
        cycle = {"wrapper": wrappers[1]}
        cycle["self"] = cycle  # the collector, not the reference count, frees this one
        del wrappers, cycle, w
        alive_at_destroy = []
        real = dist.destroy_process_group

        def recording_destroy(*args, **kwargs):
            alive_at_destroy.append([r() is not None for r in refs])
            return real(*args, **kwargs)

        monkeypatch.setattr(trainer_mod.dist, "destroy_process_group", recording_destroy)
        gc.disable()  # the collector must not run on its own in between: the function has to run it
        try:
            trainer_mod._destroy_process_group(fake, error)
        finally:
            gc.enable()
        assert alive_at_destroy == [[False, False]]
        assert fake.policy_model is policy and fake.projector_model is projector
        assert not dist.is_initialized()
        if error is not None:  # the traceback's text stays
            assert "fit" in "".join(__import__("traceback").format_exception(error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@needs_shapes
def test_a_peer_killed_mid_run_ends_the_other_process_in_one_line(tmp_path):
    """kill -9 of one process of a two-process run left the other with gloo's 30-line traceback; it now ends in
    one line saying what happened and how to resume (exit 1), and the checkpoints it wrote resume."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config_file(tmp_path, steps=400, log={"monitor_every": 0, "evaluate_every": 0, "checkpoint_every": 1})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xlard", "train", str(cfg), "--out", str(out)]
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        deadline = time.time() + 600
        while not (out / "ckpt-00000002.pt").exists():
            assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        err = procs[0].communicate(timeout=120)[1]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "process 0 of 2: another process of the run stopped or its connection broke" in err
    assert "start all 2 processes again with --resume" in err
    assert not (out / "summary.json").exists()


def _record_encoded_items(monkeypatch) -> list:
    """Every item the trainer encodes from now on (training, monitor, calibration), in order."""
    from xlard.train import trainer as T

    seen: list = []
    real_encode = T.encode_items

    def spy(backbone, items):
        seen.extend(items)
        return real_encode(backbone, items)

    monkeypatch.setattr(T, "encode_items", spy)
    return seen


@needs_shapes
def test_balanced_run_and_step_size_calibration(tmp_path, shapes, monkeypatch):
    """``data.balance: tag`` feeds every tag; ``export.alpha_grid`` picks the multiplier the training reward prefers."""
    from xlard.evaluation import load_corrector_dir
    from xlard.train import trainer as T

    seen = _record_encoded_items(monkeypatch)
    cfg = tiny_config(tmp_path / "run", reward_model="image", confidence="uniform",
                      data={"balance": "tag", "items_per_tag": 2, "max_prompts": None, "monitor_size": 6},
                      ppo={"prompts_per_step": 6}, projector={"warmup_batches": 0},
                      export={"alpha_grid": [1, 3], "calibration_size": 6}, steps=2,
                      reward={"options": {"count_confidence": False}})
    summary = T.train(cfg, backbone=shapes)
    from collections import Counter

    train_items = [it for it in seen if it.seed < T.MONITOR_SEED_BASE]
    monitor = [it for it in seen if T.MONITOR_SEED_BASE <= it.seed < T.CALIBRATION_SEED_BASE]
    calibration = [it for it in seen if it.seed >= T.CALIBRATION_SEED_BASE]
    assert len(train_items) == 12 and len(monitor) == 6
    tags = Counter(it.record["tag"] for it in train_items)
    assert len(tags) == 6 and set(tags.values()) == {2}
    assert len({it.record["tag"] for it in monitor}) == 6
    assert len(calibration) == 6 and all(it.seed >= T.CALIBRATION_SEED_BASE for it in calibration)
    assert len({it.record["tag"] for it in calibration}) == 6
    _, meta = load_corrector_dir(summary["corrector"])
    scores = meta.training["alpha_calibration"]
    assert set(scores) == {"0", "1", "3"}  # 0: the uncorrected images, for reference, never chosen
    se = meta.training["alpha_calibration_se"]
    assert set(se) == {"3"} and meta.training["alpha_calibration_min_gain_se"] == 2.0
    best = "3" if scores["3"] - scores["1"] > 2.0 * se["3"] else "1"
    assert meta.alpha == pytest.approx(float(best) * meta.training["training_alpha"])
    # the reward the run optimised, for scripts/validate_corrector.py
    # (with the count settings the shapes source used written out: validating after a default changes still scores
    # with the reward the run optimised)
    assert meta.training["reward_options"] == {"count_confidence": False, "soft_count": True}
    assert meta.training["reward_bind_color"] is None


def test_choose_multiplier_keeps_the_reference_unless_the_gain_is_clear():
    from xlard.train.trainer import choose_multiplier

    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, generator=g)
    noisy = base + 0.01 + 0.5 * torch.randn(400, generator=g)    # +0.01 mean gain, s.e. about 0.025
    clear = base + 0.05 + 0.01 * torch.randn(400, generator=g)   # +0.05, s.e. about 0.0005
    per_item = {0.0: base - 0.2, 1.0: base, 2.0: noisy, 4.0: clear}
    best, scores, ses = choose_multiplier(per_item, (1.0, 2.0, 4.0), 2.0)
    assert best == 4.0 and set(ses) == {"2", "4"} and scores["0"] == pytest.approx(float(base.mean()) - 0.2)
    assert ses["4"] == pytest.approx(float((clear - base).std() / 20.0))
    # without the clear winner, the noisy better mean does not displace x1
    best, _, _ = choose_multiplier({1.0: base, 2.0: noisy}, (1.0, 2.0), 2.0)
    assert float(noisy.mean()) > float(base.mean()) and best == 1.0
    # min_gain_se 0: the best mean, as before; no 1 in the grid: the smallest is the reference
    assert choose_multiplier({1.0: base, 2.0: noisy}, (1.0, 2.0), 0.0)[0] == 2.0
    assert choose_multiplier({2.0: base, 3.0: noisy}, (2.0, 3.0), 2.0)[0] == 2.0
    # a worse mean is never chosen, even with s.e. 0
    assert choose_multiplier({1.0: base, 2.0: base - 0.1}, (1.0, 2.0), 2.0)[0] == 1.0


@needs_shapes
def test_left_out_prompts_never_reach_the_run_and_are_recorded(tmp_path, shapes, monkeypatch):
    """``data.leave_out``: no training, monitor or calibration item uses a left-out prompt; the corrector
    folder lists them, and scripts/validate_corrector.py validates on exactly them (a fields corrector)."""
    from xlard.evaluation import load_corrector_dir
    from xlard.train import trainer as T
    from xlard.train.data import leave_out_prompts, load_records

    seen = _record_encoded_items(monkeypatch)
    cfg = tiny_config(tmp_path / "run", reward_model="image", confidence="uniform",
                      data={"balance": "tag", "items_per_tag": 2, "max_prompts": None, "monitor_size": 6,
                            "leave_out": 0.25},
                      model={"corrector_overrides": {"conditioning": "fields"}},
                      ppo={"prompts_per_step": 6}, projector={"warmup_batches": 0},
                      export={"alpha_grid": [1], "calibration_size": 6}, steps=1)
    T.train(cfg, backbone=shapes)
    records, _ = load_records("shapes:train")
    kept, left = leave_out_prompts(records, 0.25, cfg.seed)
    assert left and len(kept) + len(left) == len(records)
    left_prompts = {r["prompt"] for r in left}
    assert seen and not any(it.record["prompt"] in left_prompts for it in seen)
    corrector, meta = load_corrector_dir(tmp_path / "run" / "corrector")
    assert meta.training["left_out_fraction"] == 0.25
    assert [r["prompt"] for r in meta.training["left_out_records"]] == [r["prompt"] for r in left]
    assert corrector.config.conditioning == "fields"

    sys.path.insert(0, str(REPO / "scripts"))
    import validate_corrector as V

    chosen = V.select_records(records, meta, "left-out")
    assert {r["prompt"] for r in chosen} == left_prompts
    fitted = V.select_records(records, meta, "fitted")
    assert len(fitted) == len(kept) and not {r["prompt"] for r in fitted} & left_prompts
    assert len(V.select_records(records, meta, "all")) == len(records)
    # a short validation on the left-out prompts runs the fields corrector on its own inputs
    report = V.validate(corrector, meta, 1, [0.0, 1.0], batch=6, progress=False, prompts="left-out")
    assert report["prompts"] == "left-out" and report["prompt_count"] == len(left) and report["items"] == 6
    assert report["delta_rms"] > 0


@needs_shapes
def test_monitor_prompts_of_another_world_fail_before_training(tmp_path, shapes):
    """The exact evaluator judges a shapes run's monitor: a monitor record it cannot judge (a class or color
    outside the world) is named when the run starts, not at the first evaluation, after training steps."""
    from xlard.train import train

    monitor = tmp_path / "monitor.jsonl"
    monitor.write_text(json.dumps({"tag": "counting", "prompt": "two dragons",
                                   "include": [{"class": "dragon", "count": 2}]}) + "\n")
    with pytest.raises(ValueError, match=r"data.monitor_prompts: .*monitor.jsonl: record 0: include\[0\]\['class'\] "
                                         r"'dragon' is not a class of this world.*judges its monitor"):
        train(tiny_config(tmp_path / "run", data={"monitor_prompts": str(monitor)}), backbone=shapes)
    assert not list_checkpoints(tmp_path / "run")


@needs_shapes
def test_a_record_the_backbone_cannot_use_fails_before_training(tmp_path, shapes):
    """A training or monitor record whose object words fall beyond the tokenizer's length limit failed at the
    step that drew it (after checkpoints); now the run names it, with its file and index, before training."""
    from xlard.train import train

    long = {"tag": "counting", "prompt": "a photo of a square" + " and a red circle" * 12 + " and two diamonds",
            "include": [{"class": "diamond", "count": 2}]}
    prompts = tmp_path / "prompts.jsonl"
    short = {"tag": "counting", "prompt": "a photo of two diamonds", "include": [{"class": "diamond", "count": 2}]}
    prompts.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(ValueError, match=r"data.prompts: .*prompts.jsonl record 1: object noun 'diamonds' falls "
                                         r"beyond the 16-token length limit"):
        train(tiny_config(tmp_path / "run", data={"prompts": str(prompts)}), backbone=shapes)
    assert not list_checkpoints(tmp_path / "run")
    monitor = tmp_path / "monitor.jsonl"
    monitor.write_text(json.dumps(long) + "\n")
    with pytest.raises(ValueError, match=r"data.monitor_prompts: .*monitor.jsonl record 0: .*falls beyond"):
        train(tiny_config(tmp_path / "run2", data={"monitor_prompts": str(monitor)}), backbone=shapes)
    assert not list_checkpoints(tmp_path / "run2")


@needs_shapes
def test_held_out_records_are_refused_as_training_or_monitor_prompts(tmp_path, shapes):
    """A JSONL of held-out shapes records trained on them as `data.prompts` (only 'shapes:heldout' was refused) and
    was watched, with the exact evaluator, as `data.monitor_prompts`; both are refused when the run starts now."""
    from xlard.shapes import prompts as P
    from xlard.train import train
    from xlard.train.data import load_records

    splits = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)
    held = P.sample_records(splits["heldout"], 6, seed=0)
    mixed = tmp_path / "mixed.jsonl"
    P.write_jsonl(mixed, P.sample_records(splits["train"], 6, seed=0) + held[:1])
    with pytest.raises(ValueError, match=r"data.prompts: .*mixed.jsonl: 1 of 7 records ask what held-out records "
                                         r"of the shapes world ask \(line 7: .*xlard prompts --split train"):
        load_records(str(mixed))
    # named by its line in the file (1-based, blank lines counted), as the file's other errors are; it read
    # "record 6" (0-based), and a user opened line 6
    mixed.write_text("\n" + mixed.read_text())
    with pytest.raises(ValueError, match=r"held-out records of the shapes world ask \(line 8: "):
        load_records(str(mixed))
    # one record of another world beside held-out ones turned the check off for the whole file
    cat = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "exclude": [],
           "prompt": "a photo of a cat"}
    P.write_jsonl(mixed, held[:2] + [cat])
    with pytest.raises(ValueError, match=r"data.prompts: .*mixed.jsonl: 2 of 3 records ask what held-out records"):
        load_records(str(mixed))
    # reworded or relabelled, a held-out record passed (the split's key is its exact text and tag for most tags)
    counting = next(r for r in splits["heldout"] if r["tag"] == "counting")
    position = next(r for r in splits["heldout"] if r["tag"] == "position")
    colors = next(r for r in splits["heldout"] if r["tag"] == "colors")
    flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    mirror = dict(position, prompt="a different wording", include=[
        dict(position["include"][1], position=None), dict(position["include"][0],
                                                          position=[flipped[position["include"][1]["position"][0]],
                                                                    0])])
    del mirror["include"][0]["position"]
    for variant in (dict(counting, prompt=counting["prompt"].capitalize() + " "),
                    dict(counting, prompt=counting["prompt"].removeprefix("a photo of ") + "."),
                    dict(counting, tag="single_object"),
                    dict(counting, prompt="a picture of the same thing", tag="colors"),
                    dict(counting, prompt="reworded, without the exclude", exclude=[]),
                    # a class or color capitalised in the include clause (the guard compared them as written)
                    dict(counting, prompt="reworded, capitalised", exclude=[],
                         include=[dict(counting["include"][0], **{"class": counting["include"][0]["class"].title()})]),
                    dict(colors, prompt="reworded, capitalised color",
                         include=[dict(colors["include"][0], color=colors["include"][0]["color"].upper())]),
                    mirror):
        P.write_jsonl(mixed, P.sample_records(splits["train"], 2, seed=0) + [variant])
        with pytest.raises(ValueError, match=r"1 of 3 records ask what held-out records of the shapes world ask"):
            load_records(str(mixed))
    P.write_jsonl(mixed, P.sample_records(splits["train"], 2, seed=0) + [cat])
    assert load_records(str(mixed))[1] is False  # a file of two worlds without held-out records loads
    P.write_jsonl(mixed, splits["train"])  # no training record asks what a held-out one asks
    assert len(load_records(str(mixed))[0]) == len(splits["train"])
    clean = tmp_path / "train.jsonl"
    P.write_jsonl(clean, P.sample_records(splits["train"], 6, seed=0))
    assert load_records(str(clean)) == (P.sample_records(splits["train"], 6, seed=0), True)  # training records load
    monitor = tmp_path / "monitor.jsonl"
    P.write_jsonl(monitor, held)
    with pytest.raises(ValueError, match=r"data.monitor_prompts: .*monitor.jsonl: 6 of 6 records ask what held-out"):
        train(tiny_config(tmp_path / "run", data={"monitor_prompts": str(monitor)}), backbone=shapes)
    assert not list_checkpoints(tmp_path / "run")


@needs_shapes
def test_bad_model_overrides_name_the_config_key(tmp_path, shapes):
    from xlard.train import train

    with pytest.raises(ValueError, match=r"train config: model.corrector_overrides: unknown field\(s\) \['widht'\]"):
        train(tiny_config(tmp_path / "a", model={"corrector_overrides": {"widht": 8}}), backbone=shapes)
    with pytest.raises(ValueError, match=r"train config: model.corrector_overrides reader must be true or false"):
        train(tiny_config(tmp_path / "a2", model={"corrector_overrides": {"reader": 1}}), backbone=shapes)
    with pytest.raises(ValueError, match=r"train config: model.projector_overrides: ProjectorConfig: depth"):
        train(tiny_config(tmp_path / "b", model={"projector_overrides": {"depth": 0}}), backbone=shapes)
    # a patch that does not divide the latent failed inside the first step, after R_phi's warm start
    with pytest.raises(ValueError, match=r"train config: model.corrector_overrides: patch=3 must divide the "
                                         r"backbone's latent size 16 x 16"):
        train(tiny_config(tmp_path / "c", model={"corrector_overrides": {"patch": 3}}), backbone=shapes)
    # the projector's too (it failed after the warm start, unnamed, and left a folder neither a rerun nor
    # --resume accepted)
    with pytest.raises(ValueError, match=r"train config: model.projector_overrides: patch=3 must divide the "
                                         r"backbone's latent size 16 x 16"):
        train(tiny_config(tmp_path / "d", model={"projector_overrides": {"patch": 3}}), backbone=shapes)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    train(tiny_config(tmp_path / "d", steps=1), backbone=shapes)  # the fixed config runs in the same folder


def test_a_new_run_never_empties_files_it_did_not_checkpoint(tmp_path, monkeypatch):
    """A run into a folder holding another tool's metrics.jsonl (the backbone script's work dir) emptied it."""
    from xlard.train import train, trainer

    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "other"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n' * 30)
    with pytest.raises(ValueError, match=r"already holds metrics.jsonl, which a new run would replace; pass "
                                         r"--resume"):
        train(tiny_config(out))
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' * 30


def test_train_names_missing_prompt_files_and_backbone_folders_before_loading(tmp_path, monkeypatch):
    """Through the Python API (xlard train checks these itself): a bare FileNotFoundError for data.prompts,
    and a backbone path that does not exist was named a hub model to download."""
    from xlard.train import train, trainer

    def no_loading(*a, **k):
        raise AssertionError("the backbone loaded before the check")

    monkeypatch.setattr(trainer, "load_backbone", no_loading)
    for key in ("prompts", "monitor_prompts"):
        with pytest.raises(FileNotFoundError, match=rf"train config data.{key}: no file at {tmp_path}/nope.jsonl"):
            train(tiny_config(tmp_path / key, data={key: str(tmp_path / "nope.jsonl")}))
    monkeypatch.undo()
    cfg = config_from_dict(_merge(TINY, {"backbone": {"name": str(tmp_path / "no_model")}}),
                           overrides={"out": str(tmp_path / "bb")})
    with pytest.raises(FileNotFoundError, match=rf"train config backbone.name: no folder at {tmp_path}/no_model"):
        train(cfg)


def test_a_damaged_only_checkpoint_says_how_to_start_again(tmp_path):
    from xlard.train.checkpoint import checkpoint_path, save_atomic

    path = save_atomic({"format": "xlard.train/1", "step": 3, "w": torch.rand(256)}, checkpoint_path(tmp_path, 3))
    data = path.read_bytes()
    for damaged in (data[:len(data) // 2], b"not a checkpoint"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"ckpt-00000003.pt: a damaged checkpoint, it cannot be read .*; no "
                                             r"earlier checkpoint is left: delete it to start the run again"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # a missing file stays a missing file
        load_checkpoint(tmp_path / "ckpt-00000009.pt")
    # same-length edits of the pickle fail as TypeError or ModuleNotFoundError, as an intact checkpoint of
    # another version would: named, with the deletion advice only for a file that is damaged
    for old, new in ((b"_rebuild_tensor_v2", b"_rebuild_tensor_v3"), (b"torch._utils", b"torch._u4ils")):
        if old in data:
            path.write_bytes(data.replace(old, new))
            with pytest.raises(ValueError, match=r"this process cannot read the checkpoint \((TypeError|AttributeError|"
                                                 r"ModuleNotFoundError): .*only if the file itself is damaged"):
                load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"a damaged checkpoint, it cannot be read \(the file is empty\)"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"a damaged checkpoint, it cannot be read \(not an archive written by "
                                         r"torch.save"):
        load_checkpoint(path, mmap=True)  # torch's own text spoke of torch.save's zipfile setting


def test_checkpoint_arguments_and_entries_are_named_and_good_files_are_never_called_damaged(tmp_path):
    """map_location='gpu' failed inside the unpickling and was reported as a damaged checkpoint to delete (the file
    was fine); a hand-edited step, a missing entry or a folder named like a checkpoint failed deep in the resume."""
    from xlard.train.checkpoint import checkpoint_path, list_checkpoints, save_atomic

    good = {"format": "xlard.train/1", "step": 3, "warm": False, "world_size": 1, "config": {}, "corrector": {},
            "projector": {}, "policy_opt": {}, "projector_opt": {}, "scheduler": {}, "reward_stats": {},
            "rank_state": [{}], "w": torch.rand(8)}
    path = save_atomic(good, checkpoint_path(tmp_path, 3))
    assert load_checkpoint(path)["step"] == 3
    with pytest.raises(ValueError, match=r"load_checkpoint: map_location must name a device torch knows .*'gpu'"):
        load_checkpoint(path, map_location="gpu")
    with pytest.raises(TypeError, match=r"load_checkpoint: map_location must be a device .*got int"):
        load_checkpoint(path, map_location=3)
    with pytest.raises(TypeError, match=r"load_checkpoint: path must be a checkpoint file .*got NoneType"):
        load_checkpoint(None)
    with pytest.raises(TypeError, match=r"load_checkpoint: mmap must be a bool"):
        load_checkpoint(path, mmap="yes")
    assert path.read_bytes()  # nothing was touched
    for edit, words in (({"step": "two"}, r"entry 'step' must be int, got str 'two'"),
                        ({"step": True}, r"entry 'step' must be int, got bool"),
                        ({"step": -5}, r"out of range \(step -5, must be >= 0"),
                        ({"world_size": 2}, r"world_size 2, must be >= 1 and the number of rank_state entries, 1"),
                        ({"rank_state": None}, r"entry 'rank_state' must be list, got NoneType")):
        save_atomic({**good, **edit}, path)
        with pytest.raises(ValueError, match=words):
            load_checkpoint(path)
    save_atomic({k: v for k, v in good.items() if k not in ("corrector", "scheduler")}, path)
    with pytest.raises(ValueError, match=r"not a complete xlard trainer checkpoint: it has no corrector, scheduler"):
        load_checkpoint(path)
    (tmp_path / "ckpt-00000009.pt").mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]


@needs_shapes
def test_the_same_config_and_seed_start_from_the_same_weights_in_one_process(tmp_path, shapes, monkeypatch):
    """The reward source draws from the global generator on its first load only (cached after): a second
    train() in one process (a sweep, an API user) started from other initial weights than the first."""
    from xlard.train import train, trainer

    real = trainer.build_reward_fn
    draws = iter([1, 7])

    def drawing(*args, **kwargs):  # a loader that draws a different amount each time, as a first load does
        torch.rand(next(draws))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_reward_fn", drawing)
    weights = []
    for name in ("a", "b"):
        train(tiny_config(tmp_path / name, steps=1), backbone=shapes)
        weights.append(_corrector_tensors(tmp_path / name))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@needs_shapes
def test_the_value_loss_never_moves_the_policy(tmp_path, shapes):
    """docs/training.md: the value head reads the trunk through a stop-gradient, so it never moves the policy.
    One gradient-norm clip over the policy and the value head let the value loss rescale every policy step."""
    from xlard.train import train

    def policy_after(name, value_coef):
        cfg = tiny_config(tmp_path / name, steps=3, ppo={"value_coef": value_coef, "advantage": "group"},
                          optim={"lr": 1e-3, "max_grad_norm": 1.0}, log={"monitor_every": 0, "evaluate_every": 0})
        train(cfg, backbone=shapes)
        tensors = _corrector_tensors(tmp_path / name)
        return {k: v for k, v in tensors.items() if not k.startswith("value_head")}, tensors

    (a, all_a), (b, all_b) = policy_after("a", 0.0), policy_after("b", 0.5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(all_a[k], all_b[k]) for k in all_a if k.startswith("value_head"))  # it did learn


@needs_shapes
def test_a_misspelt_backbone_option_is_named(tmp_path):
    """backbone.options go to the pipeline's loader, which ignored unknown keys: `heigth` trained at the default
    height, exit 0."""
    from xlard.train import train

    with pytest.raises(ValueError, match=r"train config backbone.options: .*keyword arguments \{'heigth': 32\} are "
                                         r"not expected"):
        train(tiny_config(tmp_path / "a", backbone={"options": {"heigth": 32}}))
    assert not list_checkpoints(tmp_path / "a")


@needs_shapes
def test_the_logged_learning_rate_is_the_one_the_step_used(tmp_path, shapes):
    """metrics.jsonl's lr was read after the scheduler stepped: the next step's rate (warm-up 2: 1e-3 logged for a
    step taken at 5e-4)."""
    from xlard.train import train

    train(tiny_config(tmp_path / "r", steps=3, optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "constant"},
                      log={"monitor_every": 0, "evaluate_every": 0}), backbone=shapes)
    rows = [r for r in MetricsLog.read(tmp_path / "r" / "metrics.jsonl") if "lr" in r]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_config_only_problems_are_named_before_the_backbone_loads(tmp_path, monkeypatch):
    """Each of these failed only after the backbone had loaded (minutes for a real model)."""
    from xlard.train import train, trainer

    def no_loading(*a, **k):
        raise AssertionError("the backbone loaded before the check")

    monkeypatch.setattr(trainer, "load_backbone", no_loading)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ({"data": {"monitor_prompts": str(empty)}}, r"data.monitor_prompts: .*empty.jsonl holds no records"),
        ({"data": {"monitor_prompts": "shapes:heldout"}}, r"data.monitor_prompts: shapes:heldout: the monitor reads"),
        ({"model": {"corrector_overrides": {"widht": 3}}}, r"unknown field\(s\) \['widht'\]"),
        ({"model": {"corrector_overrides": {"reader": 1}}}, r"reader must be true or false"),
        ({"model": {"corrector_overrides": {"count_eyes": "pixels"}}},
         r"count_eyes must be one of 'decoded', 'latent', got 'pixels'"),
        ({"data": {"max_prompts": 1, "seeds_per_prompt": 1}}, r"1 items, fewer than ppo.prompts_per_step=2"),
        ({"backbone": {"correction_step": 0.5}, "distill": {"items_per_tag": 2, "replace": True}},
         r"distill.replace: needs backbone.correction_step 1.0"),
        # the residual was fitted to the whole edit, then applied alpha times: 4x the edits at alpha 4
        ({"model": {"corrector_overrides": {"alpha": 4.0}}, "distill": {"items_per_tag": 2}},
         r"distill: .*model.corrector_overrides.alpha must be 1 with it, got 4.0"),
    ]
    for k, (changes, words) in enumerate(cases):
        with pytest.raises(ValueError, match=words):
            train(tiny_config(tmp_path / f"r{k}", **changes))


def test_trainer_names_a_config_or_backbone_of_the_wrong_kind(tmp_path):
    from xlard.train.trainer import Trainer

    with pytest.raises(TypeError, match="Trainer: cfg must be an xlard.train.TrainConfig, got dict"):
        Trainer({"steps": 1})
    with pytest.raises(TypeError, match="backbone must be a built backbone .* got str 'shapes'.*backbone.name"):
        Trainer(tiny_config(tmp_path / "t"), backbone="shapes")
    assert not (tmp_path / "t").exists()  # refused before the run folder was made


def test_a_non_finite_score_of_a_present_aspect_is_named_with_its_source():
    """NaN means "absent" in the rewards' contract; a NaN where the aspect is present spread to every advantage
    (reported as a learning-rate divergence) or trained R_phi towards 0 without a word."""
    from types import SimpleNamespace as NS

    from xlard.train.rollout import decode_groups

    backbone = NS(decode=lambda state, z: z)
    state = NS(z0=torch.zeros(2, 1, 2, 2))

    def reward_fn(decoded):
        scores = torch.tensor([[1.0, float("nan"), float("nan")], [float("nan"), 0.5, float("nan")]])
        present = torch.tensor([[True, False, False], [True, True, False]])
        return NS(scores=scores, present=present, joint=torch.zeros(2))

    reward_fn.source_name = "broken"
    with pytest.raises(ValueError, match=r"reward source 'broken' gave a non-finite count score \(nan\) for row 1"):
        decode_groups(backbone, reward_fn, state, torch.zeros(2, 1, 2, 2), 1)

    def fine(decoded):  # NaN where absent stays allowed
        return NS(scores=torch.tensor([[1.0, float("nan"), 0.2]] * 2), present=torch.tensor([[True, False, True]] * 2),
                  joint=torch.zeros(2))

    _, result = decode_groups(backbone, fine, state, torch.zeros(2, 1, 2, 2), 1)
    assert result.present.sum() == 4


def test_fit_projector_logs_each_aspects_mse_over_its_present_entries():
    """The per-aspect MSE was a plain mean of minibatch MSEs (0 where a minibatch lacked the aspect): it changed with
    projector.minibatches and logged 0.0 for an aspect never present."""
    from xlard.models import LatentRewardProjector, ProjectorConfig
    from xlard.train.projector import ProjectorBuffer, Slot, fit_projector

    torch.manual_seed(0)
    p = LatentRewardProjector(ProjectorConfig.preset("tiny", latent_channels=4, text_dim=8, pooled_dim=8, patch=2,
                                                     width=16, depth=1))
    present = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    slot = Slot(torch.randn(4, 4, 8, 8), torch.randn(4, 5, 8), torch.randn(4, 8), torch.ones(4, 5, dtype=torch.bool),
                target, present, torch.arange(4), 4)
    buffer = ProjectorBuffer(4)
    buffer.add(slot)
    with torch.no_grad():
        pred = p(slot.z, slot.text_tokens, slot.pooled, slot.text_mask, present).scores.double()
    sq = (pred - target.double()).square()
    want = [float(sq[present[:, k], k].mean()) for k in (0, 2)]
    for minibatches in (1, 2, 4):
        fit = fit_projector(p, p, torch.optim.SGD(p.parameters(), lr=0.0), buffer, 1, None, minibatches,
                            torch.Generator().manual_seed(0), "cpu", 0.0)
        assert math.isnan(fit["mse_color"])  # never present
        assert [fit["mse_count"], fit["mse_position"]] == pytest.approx(want, rel=1e-5)


def test_metrics_log_checks_tensorboard_and_purges_resumed_steps(tmp_path, monkeypatch):
    import types

    with pytest.raises(ValueError, match="tensorboard must be 'auto', 'on' or 'off', got 'bogus'"):
        MetricsLog(tmp_path / "a", tensorboard="bogus")
    made = []

    class FakeWriter:
        def __init__(self, folder, **kwargs):
            made.append(kwargs)

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    MetricsLog(tmp_path / "b", tensorboard="on").close()
    MetricsLog(tmp_path / "b", tensorboard="on", resume_step=3).close()
    assert made == [{}, {"purge_step": 4}]  # a resumed run drops the event points past its checkpoint


@needs_shapes
def test_progress_bars_are_closed_when_a_run_is_interrupted(tmp_path, shapes, monkeypatch):
    """Ctrl-C left the bar open: the interrupt line was glued to it and a stale bar was drawn after it."""
    from helpers import raise_keyboard_interrupt, record_progress_bars

    from xlard.train import train
    from xlard.train.trainer import Trainer

    opened = record_progress_bars(monkeypatch)
    monkeypatch.setattr(Trainer, "train_step", raise_keyboard_interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(tiny_config(tmp_path / "run", log={"progress": True}), backbone=shapes)
    assert opened and all(bar.disable for bar in opened)  # tqdm marks a closed bar disabled
    del caught


def test_tensorboard_on_without_it_is_refused_before_the_run_folder_is_written(tmp_path, shapes):
    """log.tensorboard: on without TensorBoard failed after setup had written config.json and metrics.jsonl, which
    then refused the corrected command (with and without --resume)."""
    import importlib.util

    from xlard.train import train

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("TensorBoard is installed here")
    out = tmp_path / "tb"
    with pytest.raises(ValueError, match="log.tensorboard='on' but TensorBoard is not installed"):
        train(tiny_config(out, log={"tensorboard": "on"}), backbone=shapes)
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    train(tiny_config(out, steps=1), backbone=shapes)  # the corrected command runs


def test_the_progress_bar_is_not_redrawn_at_every_step(tmp_path, shapes, monkeypatch):
    """The reward/kl postfix forced a redraw at every step, past tqdm's interval: a log file of stderr grew by a
    redraw per step. The postfix now waits for the bar's own redraw."""
    import tqdm

    from xlard.train import train

    refresh = []
    original = tqdm.tqdm.set_postfix

    def spy(self, *args, **kwargs):
        refresh.append(kwargs.get("refresh", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.tqdm, "set_postfix", spy)
    train(tiny_config(tmp_path / "r", log={"progress": True}), backbone=shapes)
    assert refresh and not any(refresh)


def test_curves_of_a_long_run_are_drawn_from_one_mean_point_per_pixel_column(tmp_path):
    """Every row was drawn (a solid band after a few thousand steps, and a cost growing with the run at every
    checkpoint); more points than the plot's pixel columns are averaged per column now."""
    from xlard.train.metrics import _per_pixel_means, draw_curves

    pts = [(float(s), float(s % 2)) for s in range(1, 10001)]  # alternating 0/1: a band when drawn raw
    means = _per_pixel_means(pts, 1.0, 10000.0, 100)
    assert len(means) == 100 and all(abs(y - 0.5) < 0.02 for _, y in means)
    assert [x for x, _ in means] == sorted(x for x, _ in means) and means[0][0] < 60 and means[-1][0] > 9940
    assert _per_pixel_means(pts[:50], 1.0, 50.0, 100) == pts[:50]  # fewer points than pixels: as they are
    rows = [{"step": s, "reward/joint_policy": y} for s, y in pts] + [{"step": float("nan"), "reward/joint_policy": 1}]
    path = draw_curves(rows, tmp_path / "c.png", panels=[("reward", ["reward/joint_policy"])])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_log_keeps_only_the_curve_columns_in_memory(tmp_path):
    """Every whole row stayed in memory for the curve (about 5 KB a row: 500 MB over 100,000 steps); only the
    curve's columns stay now, the file keeps the whole rows, and the curve is the same PNG, byte for byte."""
    from xlard.train.metrics import CURVE_KEYS, MetricsLog, draw_curves

    log = MetricsLog(tmp_path / "run", tensorboard="off")
    extra = {f"time/phase_{i}": 0.1 * i for i in range(200)}
    for step in range(1, 6):
        log.write({"step": step, "reward/joint_policy": 0.1 * step, "ppo/approx_kl": 1e-3 * step,
                   "monitor/evaluator": 0.5, "ppo/value_loss": 2.0, **extra})
    log.close()
    whole = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    assert len(whole) == 5 and all("time/phase_199" in r and "ppo/value_loss" in r for r in whole)
    assert all(set(r) <= set(CURVE_KEYS) for r in log.rows)
    assert log.rows[0] == {"step": 1, "reward/joint_policy": 0.1, "ppo/approx_kl": 1e-3, "monitor/evaluator": 0.5}
    a = draw_curves(log.rows, tmp_path / "a.png").read_bytes()
    assert a == draw_curves(whole, tmp_path / "b.png").read_bytes()
    resumed = MetricsLog(tmp_path / "run", tensorboard="off", resume_step=3)  # rows kept on resume: compact too
    resumed.close()
    assert [r["step"] for r in resumed.rows] == [1, 2, 3] and all(set(r) <= set(CURVE_KEYS) for r in resumed.rows)


def test_a_run_never_takes_a_corrector_model_or_script_folder(tmp_path, monkeypatch):
    """--resume into a corrector folder named 18 "differing" config fields; into a training script's work folder it
    replaced the script's metrics.jsonl ("no checkpoint there yet, so a new run starts")."""
    from xlard.train import train, trainer

    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    from helpers import fake_corrector_folder

    corrector = fake_corrector_folder(tmp_path / "corrector")
    understanding_work = tmp_path / "und_work"
    understanding_work.mkdir()
    (understanding_work / "checkpoint.pt").write_bytes(b"x")
    early_work = tmp_path / "early"  # a script's work folder before its first checkpoint: metrics alone
    early_work.mkdir()
    eyes = tmp_path / "eyes"
    eyes.mkdir()
    (eyes / "model.safetensors").write_bytes(b"x")
    (eyes / "config.json").write_text('{"model": {"latent_channels": 8}}')
    for folder in (understanding_work, early_work):
        (folder / "metrics.jsonl").write_text('{"step": 1}\n' * 3)
    for folder, words in ((corrector, r"holds a corrector \(xlard_corrector.json\)"),
                          (understanding_work, r"holds the checkpoint of scripts/train_shapes_understanding.py"),
                          (eyes, r"holds a saved model \(model.safetensors\)"),
                          (early_work, r"holds a metrics.jsonl but no config.json of a training run")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(ValueError, match=rf"^--out: .*{folder.name} {words}"):
            train(tiny_config(folder), resume=True)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_damaged_metrics_rows_are_named_not_dropped(tmp_path):
    """A resume kept the rows up to its step and dropped every line it could not parse, without a word; only a
    torn last line (a crash mid-write) is skipped."""
    from xlard.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"st#p": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics row \('\{\"st#p\": 2'\); repair"):
        MetricsLog.read(path)
    path.write_text('{"step": 1}\n[2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"line 2 is not a metrics row"):
        MetricsLog(tmp_path, tensorboard="off", resume_step=3)
    assert path.read_text() == '{"step": 1}\n[2]\n{"step": 3}\n'  # left as it was


def test_a_torn_row_up_to_the_checkpoint_is_said_on_resume(tmp_path, capsys):
    """Every step's row is fsynced before that step's checkpoint, so a cut last line at or below the checkpoint is
    damage, not a crash: its step was dropped without a word (metrics.jsonl held steps 1-4, 6-8)."""
    from xlard.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    log = MetricsLog(tmp_path, tensorboard="off", resume_step=3)
    log.close()
    assert log.lost_steps == [3] and [r["step"] for r in MetricsLog.read(path)] == [1, 2]
    assert re.search(r"note: .*metrics\.jsonl lacks the rows of step 3, up to the checkpoint resumed from \(a "
                     r"damaged line\); the run goes on", capsys.readouterr().err)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a crash after step 2's checkpoint: silent
    log = MetricsLog(tmp_path, tensorboard="off", resume_step=2)
    log.close()
    assert log.lost_steps == [] and capsys.readouterr().err == ""


def test_the_model_fingerprint_follows_linked_component_folders(tmp_path):
    """A pipeline folder whose unet/ is a link to another folder (a shared component) was read without the link's
    files: swapping the linked weights went unnoticed by --resume. A link back up the tree is walked once."""
    from xlard.train.trainer import _folder_fingerprint

    pipe, shared_a, shared_b = tmp_path / "pipe", tmp_path / "unet_a", tmp_path / "unet_b"
    for folder, weights in ((shared_a, b"weights A"), (shared_b, b"weights B")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet").symlink_to(shared_a, target_is_directory=True)
    (pipe / "loop").symlink_to(pipe, target_is_directory=True)
    first = _folder_fingerprint(pipe)
    (pipe / "unet").unlink()
    (pipe / "unet").symlink_to(shared_b, target_is_directory=True)
    assert _folder_fingerprint(pipe) != first
    (pipe / "unet").unlink()
    (pipe / "unet").symlink_to(shared_a, target_is_directory=True)
    assert _folder_fingerprint(pipe) == first
    # a checkpoint from before links were followed stored the digest without the linked files: still resumes
    import types

    from xlard.train.trainer import Trainer, _legacy_folder_fingerprint

    legacy = _legacy_folder_fingerprint(pipe)
    assert legacy != first
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(prompts="p", monitor_prompts="m")),
                                 inputs={"records_sha256": "r", "monitor_records_sha256": "m", "models": {"backbone": first}},
                                 _model_dirs={"backbone": pipe})
    stored = {"inputs": {"records_sha256": "r", "monitor_records_sha256": "m", "models": {"backbone": legacy}}}
    Trainer._check_inputs(fake, tmp_path / "ckpt.pt", stored)  # accepted
    stored["inputs"]["models"]["backbone"] = "another"
    with pytest.raises(ValueError, match=r"the backbone model's files .* changed since the run started"):
        Trainer._check_inputs(fake, tmp_path / "ckpt.pt", stored)


@needs_shapes
def test_an_action_block_that_does_not_divide_the_latent_is_refused_before_anything_is_written(tmp_path, shapes):
    """It failed at the first PPO step, after a step-0 checkpoint: the fixed config was then refused in that folder
    ("already holds checkpoints") and --resume too ("config differs")."""
    from xlard.train import train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train config: model.corrector_overrides.action_block: 3 must divide the "
                                         r"backbone's latent size 16 x 16"):
        train(tiny_config(out, model={"corrector_overrides": {"action_block": 3}}), backbone=shapes)
    assert not list_checkpoints(out) and not (out / "config.json").exists()


def test_a_backbone_device_this_machine_lacks_is_named_before_the_backbone_loads(tmp_path, monkeypatch):
    """backbone.device 'meta' (or a cuda:N past the machine's) was reported as "the shapes backbone is not
    installed ... train it with scripts/train_shapes_backbone.py"."""
    from xlard.train import trainer

    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"train config: backbone.device: meta holds shapes only.*; use 'auto', "
                                         r"'cpu' or 'cuda\[:N\]'"):
        trainer.Trainer(tiny_config(tmp_path / "run", backbone={"device": "meta"}))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"train config: backbone.device: cuda:3 asked, but "):
            trainer._resolve_device("cuda:3", 0)
    assert trainer._resolve_device("cpu", 0) == torch.device("cpu")


@needs_shapes
def test_a_backbone_setting_the_backbone_refuses_is_named_not_called_not_installed():
    from xlard.train.trainer import load_backbone

    cfg = tiny_config(Path("unused"), backbone={"options": {"height": 10**9}})
    with pytest.raises(ValueError, match=r"^train config backbone.options.height: height must be an integer >= 1 "
                                         r"and <= 16384, got 1000000000$"):
        load_backbone(cfg.backbone, torch.device("cpu"))


@needs_shapes
def test_a_damaged_shapes_install_keeps_its_reinstall_advice(tmp_path, monkeypatch):
    """Every ValueError of the shapes backbone was named as a backbone.name setting, without the advice to reinstall
    (a cut tokenizer.json, a bad unet/config.json)."""
    import shutil

    from xlard.train.trainer import load_backbone

    damaged = tmp_path / "shapes_backbone"
    shutil.copytree(shapes_backbone.DEFAULT_PATH, damaged)
    tok = damaged / "tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:200])
    monkeypatch.setenv("XLARD_SHAPES_BACKBONE", str(damaged))
    cfg = tiny_config(Path("unused"))
    with pytest.raises(ValueError, match=r"^backbone.name 'shapes': it could not be loaded \(.*JSONDecodeError.*\); "
                                         r"the shapes backbone is not installed at "):
        load_backbone(cfg.backbone, torch.device("cpu"))


@needs_shapes
def test_a_shapes_backbone_option_diffusers_refuses_is_named_not_called_not_installed():
    """backbone.options {'variant': 'fp16'} read 'the shapes backbone is not installed ... reinstall'."""
    from xlard.train.trainer import load_backbone

    cfg = tiny_config(Path("unused"), backbone={"options": {"variant": "fp16"}})
    with pytest.raises(ValueError, match=r"^train config backbone.options.variant: .*variant=fp16"):
        load_backbone(cfg.backbone, torch.device("cpu"))


def test_distill_items_are_bounded_as_tags_times_items_per_tag(tmp_path):
    """distill.items_per_tag was bounded alone: tags x items_per_tag pairs were built after the backbone loaded
    (969 tags x 10**6 exhausted the memory); refused before anything loads, as data.items_per_tag is."""
    from xlard.train import train

    cfg = tiny_config(tmp_path / "run", distill={"items_per_tag": 400_000})
    with pytest.raises(ValueError, match=r"distill: \d+ tags x distill.items_per_tag=400000 = \d+ items, more than "
                                         r"the bound of 1000000 items; lower distill.items_per_tag"):
        train(cfg)
