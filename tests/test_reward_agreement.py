"""scripts/reward_agreement.py: AUROC values (pooled, within prompt), bootstrap intervals, the
record plan, the sample cache, and runs on a tiny random pipeline."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import reward_agreement as RA  # noqa: E402


def test_auroc_rank_formula():
    assert RA.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert RA.auroc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    assert RA.auroc([0.5, 0.5], [True, False]) == 0.5
    assert RA.auroc([0.9, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.75  # 3 of 4 pairs ordered
    assert math.isnan(RA.auroc([0.3], [True]))


def test_auroc_equals_the_pair_loop_exactly():
    """The pair count is by bisection now (the pair loop took hours in the bootstrap of a few thousand samples):
    equal to the brute-force loop exactly, ties included; a NaN score leaves its sample out of the pairs."""
    import random

    def loop(scores, labels):
        pos = [s for s, y in zip(scores, labels) if y and not math.isnan(s)]
        neg = [s for s, y in zip(scores, labels) if not y and not math.isnan(s)]
        pairs = len(pos) * len(neg)
        return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / pairs if pairs else "none"

    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.0, 0.25, 0.5, 1.0, float("nan"), rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        expected = loop(scores, labels)
        if expected != "none":
            assert RA.auroc(scores, labels) == expected, (scores, labels)
        else:
            assert math.isnan(RA.auroc(scores, labels))


def test_auroc_leaves_nan_scores_out_and_refuses_unequal_lengths():
    """A NaN-scored sample stayed in the pair count and lost every pair: a NaN wrong sample beat every correct one;
    zip() cut unequal inputs without a word."""
    nan = float("nan")
    assert math.isnan(RA.auroc([0.5, 0.9, nan], [True, True, False]))  # no valid pair (it was 0.0)
    assert RA.auroc([nan, 0.2, 0.9, 0.1], [True, True, False, False]) == 0.5  # as without the NaN sample (0.25)
    assert math.isnan(RA.within_group_auroc([0.9, nan], [True, False], ["a", "a"]))
    with pytest.raises(ValueError, match=r"auroc: scores, labels must have one entry per sample, got lengths 4, 2"):
        RA.auroc([0.9, 0.1, 0.8, 0.7], [True, False])
    with pytest.raises(ValueError, match=r"within_group_auroc: scores, labels, groups must have one entry per "
                                         r"sample, got lengths 2, 2, 1"):
        RA.within_group_auroc([0.9, 0.1], [True, False], ["a"])


def test_within_prompt_auroc_compares_only_pairs_of_one_prompt():
    # Prompt a: correct samples score 0.2, wrong 0.1 (perfect within a); prompt b: 0.9 vs 0.8 (perfect).
    # Pooled, b's wrong samples (0.8) beat a's correct ones (0.2): pooled AUROC < 1, within = 1.
    scores = [0.2, 0.1, 0.9, 0.8]
    labels = [True, False, True, False]
    groups = ["a", "a", "b", "b"]
    assert RA.within_group_auroc(scores, labels, groups) == 1.0
    assert RA.auroc(scores, labels) == 0.75
    # Inverted within each prompt: 0; a constant scorer: 0.5; a prompt without both classes adds no pair.
    assert RA.within_group_auroc([0.1, 0.2, 0.8, 0.9], labels, groups) == 0.0
    assert RA.within_group_auroc([0.5] * 4, labels, groups) == 0.5
    assert RA.within_group_auroc([0.2, 0.1, 0.7], [True, False, True], ["a", "a", "c"]) == 1.0
    assert math.isnan(RA.within_group_auroc([0.2, 0.1], [True, True], ["a", "b"]))


def test_bootstrap_interval_brackets_the_estimate():
    import random

    rng = random.Random(1)
    scores, labels, groups = [], [], []
    for g in range(12):
        for _ in range(6):
            y = rng.random() < 0.5
            scores.append((0.6 if y else 0.4) + rng.gauss(0, 0.2))
            labels.append(y)
            groups.append(f"p{g}")
    point = RA.within_group_auroc(scores, labels, groups)
    lo, hi = RA.bootstrap_ci(scores, labels, groups, RA.within_group_auroc, resamples=300, seed=0)
    assert lo <= point <= hi and 0.0 <= lo < hi <= 1.0
    assert (lo, hi) == RA.bootstrap_ci(scores, labels, groups, RA.within_group_auroc, resamples=300, seed=0)
    # A perfect scorer has a degenerate interval at 1; an inverted one at 0.
    perfect = [1.0 if y else 0.0 for y in labels]
    assert RA.bootstrap_ci(perfect, labels, groups, RA._pooled, resamples=50) == (1.0, 1.0)
    assert RA.bootstrap_ci([1 - s for s in perfect], labels, groups, RA.within_group_auroc, resamples=50) == (0.0, 0.0)
    assert all(math.isnan(v) for v in RA.bootstrap_ci([0.1], [True], ["a"], RA._pooled, resamples=5))
    # one mixed prompt among twenty: the resamples kept were those that drew it, and the interval read [1.0, 1.0]
    scores, labels, groups = [], [], []
    for g in range(20):
        for k in range(4):
            y = k % 2 == 0 if g == 0 else g % 2 == 0
            scores.append(float(y) if g == 0 else 0.5)
            labels.append(y)
            groups.append(f"p{g}")
    assert RA.within_group_auroc(scores, labels, groups) == 1.0
    assert all(math.isnan(v) for v in RA.bootstrap_ci(scores, labels, groups, RA.within_group_auroc, resamples=200))
    # one prompt, resampled: always itself, so no interval
    assert all(math.isnan(v) for v in RA.bootstrap_ci(scores[:4], labels[:4], groups[:4], RA.within_group_auroc,
                                                      resamples=50))


def test_summarize_values():
    rows = [{"tag": "counting", "prompt": p, "correct": y, "scores": [s, None, None]}
            for p, y, s in [("a", True, 1.0), ("a", False, 0.5), ("b", True, 0.4), ("b", False, 0.2)]]
    rows.append({"tag": "position", "prompt": "c", "correct": True, "scores": [None, None, 0.9]})
    s = RA.summarize(rows, resamples=50)
    assert s["count"]["records"] == 4 and s["count"]["within_auroc"] == 1.0 and s["count"]["auroc"] == 0.75
    assert s["count"]["mixed_prompts"] == 2 and s["count"]["within_pairs"] == 2
    assert s["count"]["mean_reward_correct"] == pytest.approx(0.7)
    assert math.isnan(s["position"]["auroc"]) and s["color"]["records"] == 0


def test_plan_records_gives_several_seeds_per_prompt():
    records = RA.plan_records("heldout", 12, 4, seed=5)
    assert len(records) == 48 and [r["image_seed"] for r in records] == list(range(5, 53))
    for tag in RA.AGREEMENT_TAGS:
        prompts = [r["prompt"] for r in records if r["tag"] == tag]
        assert len(prompts) == 12 and len(set(prompts)) == 3  # ceil(12 / 4) prompts, 4 seeds each
    from xlard.shapes.prompts import PromptConfig, make_splits

    train = {r["prompt"] for r in make_splits(PromptConfig(), seed=0)["train"]}
    assert not {r["prompt"] for r in records} & train
    with pytest.raises(ValueError, match="split"):
        RA.plan_records("test", 4, 2)
    with pytest.raises(ValueError, match="per-tag"):
        RA.plan_records("heldout", 0, 2)


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        RA.main(["--source", "vision"])
    with pytest.raises(SystemExit):
        RA.main(["--source", "clip"])  # needs --clip-model
    with pytest.raises(SystemExit):
        RA.main(["--per-tag", "0", "--cache", "x"])


def test_cli_refuses_options_of_the_other_form(tmp_path, capsys, monkeypatch):
    """Without --cache, --split train scored held-out records and --per-tag / --seeds-per-prompt / --render-checks
    were ignored without a word; -n means nothing with --cache."""
    def sampled(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(RA, "run", sampled)
    monkeypatch.setattr(RA, "generate_cache", sampled)
    for argv, words in ((["--split", "train"], "--split goes with --cache DIR"),
                        (["--per-tag", "3"], "--per-tag goes with --cache DIR"),
                        (["--seeds-per-prompt", "2"], "--seeds-per-prompt goes with --cache DIR"),
                        (["--render-checks", "0"], "--render-checks goes with --cache DIR"),
                        (["--evaluator-stability"], "--evaluator-stability goes with --cache DIR"),
                        (["-n", "6", "--cache", str(tmp_path / "c")], "-n goes without --cache")):
        with pytest.raises(SystemExit) as e:
            RA.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    assert not (tmp_path / "c").exists()


def test_cli_checks_its_numbers_before_making_the_cache(tmp_path, capsys):
    """--steps -3 was recorded in the cache's meta.json before failing, and the corrected command was then
    refused ("holds other samples"); --seed -5 and --render-checks -2 were tracebacks."""
    for bad, words in ((["--steps", "-3"], "--steps must be in [0, 10000]"), (["--seed", "-5"], "--seed must be in"),
                       (["--render-checks", "-2"], "--render-checks must be >= 0"),
                       (["--per-tag", "25001"], "at most 100000 samples, got 100004")):
        with pytest.raises(SystemExit) as e:
            RA.main(bad + ["--cache", str(tmp_path / "c")])
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_bounds_the_samples_it_makes_not_the_prompts_they_spread_over(tmp_path, monkeypatch):
    """The bound multiplied --per-tag by --seeds-per-prompt: --per-tag 100000 (400000 samples) passed and
    --per-tag 12501 --seeds-per-prompt 8 (50004 samples) was refused."""
    def made(*args, **kwargs):
        raise RuntimeError("checked")

    monkeypatch.setattr(RA, "plan_records", made)
    with pytest.raises(RuntimeError, match="checked"):
        RA.main(["--per-tag", "12501", "--seeds-per-prompt", "8", "--cache", str(tmp_path / "c")])


def test_cli_checks_its_outputs_before_sampling(tmp_path, capsys, monkeypatch):
    """--out and --cache that cannot be written fail at once (the report was lost after minutes of work)."""
    def sampled(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(RA, "run", sampled)
    monkeypatch.setattr(RA, "generate_cache", sampled)
    (tmp_path / "file").write_text("x")
    for argv, words in ((["--out", str(tmp_path)], "--out: .* is a folder"),
                        (["--out", str(tmp_path / "no" / "r.json")], "--out: cannot write .* does not exist"),
                        (["--cache", str(tmp_path / "file" / "c")], "--cache: .*is not a folder"),
                        # the CLIP model too: a traceback after the samples were generated before
                        (["--source", "clip", "--clip-model", str(tmp_path / "no" / "clip"), "--cache",
                          str(tmp_path / "c")], "--clip-model: no folder at"),
                        (["--source", "clip", "--clip-model", str(tmp_path), "--cache", str(tmp_path / "c")],
                         "--clip-model: .* has no config.json")):
        with pytest.raises(SystemExit):
            RA.main(argv)
        assert re.search(words, capsys.readouterr().err), argv


def test_run_on_a_tiny_pipeline(tmp_path):
    from tiny_pipelines import tiny_sd_pipeline

    report = RA.run(str(tiny_sd_pipeline(tmp_path / "pipe")), 12, 0, 6, 2, True, resamples=20)
    assert report["n"] == 12 and len(report["rows"]) == 12 and report["source"] == "attention"
    assert {"count", "color", "position", "joint"} <= set(report["summary"])
    for aspect in ("count", "color", "position"):
        s = report["summary"][aspect]
        assert s["records"] == sum(r["tag"] in RA.ASPECT_TAGS[aspect] for r in report["rows"])
    table = RA.to_markdown(report)
    assert "| count | counting |" in table and "within-prompt AUROC" in table


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    from tiny_pipelines import tiny_sd_pipeline

    pipe = str(tiny_sd_pipeline(tmp_path / "pipe"))
    records = RA.plan_records("heldout", 2, 2, seed=0)
    folder = RA.generate_cache(tmp_path / "cache", pipe, records, batch=3, steps=2, quiet=True)
    got, images, maps, meta = RA.load_cache(folder)
    assert got == records and images.shape[:2] == (8, 3) and maps.shape[0] == 8
    assert sorted(p.name for p in folder.glob("chunk_*.pt")) == ["chunk_00000.pt", "chunk_00003.pt",
                                                                 "chunk_00006.pt"]
    # A finished cache is not regenerated; another record list is refused.
    monkeypatch.setattr(RA, "load_backbone", lambda *a, **k: pytest.fail("regenerated a finished cache"))
    RA.generate_cache(folder, pipe, records, batch=3, steps=2, quiet=True)
    with pytest.raises(ValueError, match="other samples"):
        RA.generate_cache(folder, pipe, records[:4], batch=3, steps=2, quiet=True)
    # A missing chunk is reported (and a rerun would redo just that one).
    (folder / "chunk_00003.pt").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        RA.load_cache(folder)
    monkeypatch.undo()
    RA.generate_cache(folder, pipe, records, batch=3, steps=2, quiet=True)
    report = RA.run_cached(folder, "attention", resamples=10)
    assert report["n"] == 8 and report["source"] == "attention"
    assert json.loads((folder / "labels.json").read_text()) == [r["correct"] for r in report["rows"]]
    # Damaged files are named with the fix, which works (a chunk was a traceback: EOFError, PytorchStreamReader,
    # UnpicklingError; meta.json, labels.json, records.jsonl "Expecting value" naming no file).
    remake = r"is damaged \(\w+: .*\); delete it and rerun with the same options \(it is made again\)"
    restart = r"is damaged \(\w+: .*\); delete the folder \(its samples are generated again\) or use another --cache"
    chunk = (folder / "chunk_00003.pt").read_bytes()
    for damage in (b"", chunk[:3000], bytes(range(256)) * 8):
        (folder / "chunk_00003.pt").write_bytes(damage)
        with pytest.raises(ValueError, match=r"--cache: .*chunk_00003\.pt " + remake):
            RA.load_cache(folder)
    (folder / "chunk_00003.pt").unlink()
    (folder / "labels.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"--cache: .*labels\.json " + remake):
        RA.evaluator_labels(folder, records, images)
    (folder / "labels.json").unlink()
    RA.generate_cache(folder, pipe, records, batch=3, steps=2, quiet=True)  # the chunk is made again
    again = RA.load_cache(folder)
    assert again[0] == records and again[1].equal(images)
    for name, damage in (("meta.json", '{"a":'), ("records.jsonl", '{"tag": '), ("meta.json", None)):
        good = (folder / name).read_text()
        (folder / name).write_text(damage) if damage is not None else (folder / name).unlink()
        with pytest.raises(ValueError, match=rf"--cache: .*{re.escape(name)} " + restart):
            RA.generate_cache(folder, pipe, records, batch=3, steps=2, quiet=True)
        (folder / name).write_text(good)


def test_a_cache_of_other_samples_says_what_differs(tmp_path):
    """--seed 7 or --split train gave "holds other samples ({its meta})": a meta equal to the user's own."""
    folder = tmp_path / "c"
    folder.mkdir()
    records = [{"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}]
    (folder / "records.jsonl").write_text(json.dumps(records[0]) + "\n")
    (folder / "meta.json").write_text(json.dumps({"backbone": "shapes", "steps": 0, "batch": 16, "n": 1}))
    other = [dict(records[0], prompt="a photo of a square", include=[{"class": "square", "count": 1}])]
    with pytest.raises(ValueError, match=r"holds other samples: other records \(--split, --per-tag, "
                                         r"--seeds-per-prompt or --seed\); use another folder"):
        RA.generate_cache(folder, "shapes", other)
    with pytest.raises(ValueError, match=r"holds other samples: other settings \(.*'steps': 0.* here, .*'steps': 3.* "
                                         r"asked\); use"):
        RA.generate_cache(folder, "shapes", records, steps=3)


def test_perturb_changes_images_a_little_and_refuses_bad_kinds():
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    assert float((RA.perturb(x, "gain", 1.03) - x).abs().max()) <= 0.03 + 1e-6
    assert torch.equal(RA.perturb(x, "gain", 0.5), x * 0.5)
    a = RA.perturb(x, "noise", 2 / 255, torch.Generator().manual_seed(3))
    b = RA.perturb(x, "noise", 2 / 255, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 0.0 < float((a - x).abs().mean()) < 4 / 255  # seeded, small
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(RA.perturb(flat, "blur", 0.5), flat)  # a flat image stays flat (edges replicated)
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    blurred = RA.perturb(step, "blur", 0.5)
    assert blurred.shape == step.shape and 0.0 < float(blurred[0, 0, 0, 3]) < 0.5 < float(blurred[0, 0, 0, 4]) < 1.0
    assert float(RA.perturb(torch.ones(1, 3, 4, 4), "gain", 1.03).max()) == 1.0  # clamped to [0, 1]
    with pytest.raises(ValueError, match="kind must be one of 'gain', 'noise', 'blur', got 'warp'"):
        RA.perturb(x, "warp", 1.0)
    for bad in (0, -1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="value must be a finite number > 0"):
            RA.perturb(x, "blur", bad)


def _renders(records):
    import numpy as np
    import torch

    from xlard.shapes import prompts as P

    scenes = [P.render_record(r, seed=k) for k, r in enumerate(records)]
    return torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2).float() / 255


def test_evaluator_stability_on_clean_renders_is_perfect():
    """Ground-truth renders are far from every cut of the evaluator: no change flips a verdict, so the
    evaluator agrees with itself exactly, per aspect, and the table says so."""
    records = RA.plan_records("heldout", 4, 2, seed=0)
    images = _renders(records)
    # half the records asked for one object more than drawn: the evaluator judges those wrong
    asked = []
    for k, r in enumerate(records):
        r = json.loads(json.dumps(r))
        if k % 4 >= 2 and r["tag"] == "counting":  # one right and one wrong sample of each prompt
            r["include"][0]["count"] += 1
            r["exclude"][0]["count"] += 1
        asked.append(r)
    from xlard.shapes import evaluator as E

    labels = [bool(v.correct) for v in E.evaluate(images, asked)]
    assert not all(labels) and any(labels)
    out = RA.evaluator_stability(asked, images, labels, resamples=20)
    assert [label for label, _ in RA.PERTURBATIONS] == list(out)
    for entry in out.values():
        assert entry["verdicts_changed_per_draw"] == 0
        count = entry["summary"]["count"]
        assert count["records"] == 4 and count["auroc"] == 1.0 and count["within_auroc"] == 1.0
        assert count["verdicts_changed_per_draw"] == 0
    report = {"source": "shapes", "n": len(asked), "backbone": "shapes", "evaluator_stability": out,
              "summary": RA.summarize([{"tag": r["tag"], "prompt": r["prompt"], "correct": y, "scores": [1, 1, 1]}
                                       for r, y in zip(asked, labels)], resamples=5)}
    table = RA.to_markdown(report)
    assert "The evaluator against itself" in table and "| brightness x0.97 / x1.03 | count | 0 of 4 | 1.000" in table


def test_evaluator_stability_counts_the_verdicts_a_change_flips(monkeypatch):
    """A change that erases every object turns every verdict to wrong: the changed verdicts are the correct
    samples, and the score no longer tells correct from wrong (AUROC 0.5)."""
    import torch

    records = [r for r in RA.plan_records("heldout", 4, 2, seed=0) if r["tag"] == "counting"]
    images = _renders(records)
    labels = [True, True, False, True]
    monkeypatch.setattr(RA, "perturb", lambda x, kind, value, generator=None: torch.full_like(x, 0.5))
    out = RA.evaluator_stability(records, images, labels, resamples=20)
    for entry in out.values():
        assert entry["verdicts_changed_per_draw"] == 3
        assert entry["summary"]["count"]["verdicts_changed_per_draw"] == 3
        assert entry["summary"]["count"]["auroc"] == 0.5


def test_summarize_leaves_a_nan_score_out_of_every_statistic():
    """A NaN score was out of the AUROCs but in the mean rewards (NaN) and the mixed-prompt count."""
    rows = [{"tag": "counting", "prompt": p, "correct": y, "scores": [s, None, None]}
            for p, y, s in [("a", True, 0.9), ("a", False, 0.2), ("b", True, 0.8), ("b", False, float("nan")),
                            ("c", True, 0.7), ("c", False, 0.1)]]
    s = RA.summarize(rows, resamples=50)["count"]
    assert (s["records"], s["mixed_prompts"], s["within_pairs"]) == (5, 2, 2)
    assert s["mean_reward_wrong"] == pytest.approx(0.15) and s["mean_reward_correct"] == pytest.approx(0.8)
