"""Tests for the exact shapes evaluator: 100% on ground truth, planted errors caught every time,
input forms and bad inputs, reports."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from xlard.shapes import evaluator as E
from xlard.shapes import prompts as P
from xlard.shapes import rules as R
from xlard.shapes import world as W

SPLITS = P.make_splits(seed=0)
CONFIG = E.EvaluatorConfig()


def _records(tags, n, seed=0, split="heldout"):
    return P.sample_records(SPLITS[split], n, seed=seed, tags=tags)


def _group_slice(record, item):
    """Object indices of include item ``item`` in a scene from :func:`render_record` (group by group)."""
    start = sum(it["count"] for it in record["include"][:item])
    return range(start, start + record["include"][item]["count"])


def _judge(scene, record):
    return E.evaluate_record(scene.render(), record, CONFIG)


# ---------------------------------------------------------------------------------------------
# Ground truth scores 100%


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_perfect_score_on_ground_truth_renders(split):
    records = _records(None, 360, seed=11, split=split)
    images = [P.render_record(r, seed=i, distractors=i % 3).render() for i, r in enumerate(records)]
    results = E.evaluate(images, records, CONFIG)
    wrong = [(r.prompt, r.reason, r.found) for r in results if not r.correct]
    assert not wrong
    summary = E.summarize(results)
    assert summary["overall"] == 1.0 and summary["total"] == 360 and not summary["missing_tags"]
    assert all(v["total"] == 60 for v in summary["tasks"].values())


def test_detections_recover_the_ground_truth_exactly():
    for seed in range(60):
        scene = W.random_scene(seed)
        found = E.detect_objects(scene.render(), CONFIG)
        want = sorted((o.shape, o.color, o.bbox, o.area) for o in scene.objects)
        assert sorted((d.shape, d.color, d.bbox, d.area) for d in found) == want
        assert all(d.shape_iou == 1.0 for d in found)


def test_perfect_score_at_another_resolution():
    world = W.WorldConfig(image_size=96)
    config = E.EvaluatorConfig(world=world)
    splits = P.make_splits(P.PromptConfig(world=world), seed=1)
    records = P.sample_records(splits["heldout"], 60, seed=0)
    results = E.evaluate([P.render_record(r, i, world).render() for i, r in enumerate(records)], records, config)
    assert all(r.correct for r in results)


def test_robust_to_mild_noise_and_specks():
    rng = np.random.default_rng(0)
    records = _records(None, 60, seed=3)
    for i, rec in enumerate(records):
        scene = P.render_record(rec, seed=i)
        img = scene.render().astype(np.int16)
        img += rng.integers(-12, 13, size=img.shape, dtype=np.int16)  # stays nearest its prototype
        near_object = ndimage.binary_dilation(scene.label_map() > 0, iterations=2)
        for _ in range(8):  # 2x2 specks of random colors, away from objects, below min_area
            y, x = rng.integers(0, 62, size=2)
            if not near_object[y:y + 2, x:x + 2].any():
                img[y:y + 2, x:x + 2] = W.PALETTE[R.GENEVAL_COLORS[int(rng.integers(10))]]
        res = E.evaluate_record(np.clip(img, 0, 255).astype(np.uint8), rec, CONFIG)
        assert res.correct, (rec["prompt"], res.reason)


def test_unclassifiable_blobs_are_not_counted():
    img = np.full((64, 64, 3), W.BACKGROUND, dtype=np.uint8)
    img[10:12, 5:40] = W.PALETTE["red"]  # a thin bar: no shape fits
    img[30:50, 30:50] = W.PALETTE["blue"]
    found = E.detect_objects(img, CONFIG)
    assert [(d.shape, d.color) for d in found] == [(None, "red"), ("square", "blue")]
    rec = P.make_record("single_object", [{"class": "square", "count": 1}])
    res = E.evaluate_record(img, rec, CONFIG)
    assert res.correct and "1 red blob" in res.found


def test_label_colors_is_eight_connected_per_color():
    color_index = np.full((4, 4), -1, dtype=np.int8)
    color_index[0, 0] = color_index[1, 1] = color_index[3, 3] = 0  # diagonal touch joins; (3, 3) apart
    color_index[0, 3] = 2
    labels, counts = E._label_colors(color_index, 3)
    assert counts.tolist() == [2, 0, 1] and labels.dtype == np.int32
    assert labels[0, 0, 0] == labels[0, 1, 1] == 1 and labels[0, 3, 3] == 2 and labels[2, 0, 3] == 1


# ---------------------------------------------------------------------------------------------
# Planted errors are caught, every time, with the right reason


def test_one_object_too_many_fails_counting():
    for i, rec in enumerate(_records(["counting"], 40, seed=5, split="train")):
        item = rec["include"][0]
        scene = P.render_record(rec, seed=i)
        color = scene.objects[0].color
        res = _judge(W.add_object(scene, item["class"], color, seed=i), rec)
        n = item["count"]
        assert not res.correct and f"expected {item['class']}<{n + 1}, found {n + 1}" in res.reason, res.reason


@pytest.mark.parametrize("tag", R.TAGS)
def test_one_object_too_few_fails(tag):
    for i, rec in enumerate(_records([tag], 25, seed=6, split="train")):
        item_index = i % len(rec["include"])
        item = rec["include"][item_index]
        scene = P.render_record(rec, seed=i)
        res = _judge(W.remove_object(scene, _group_slice(rec, item_index)[0]), rec)
        n = item["count"]
        assert not res.correct and f"expected {item['class']}>={n}, found {n - 1}" in res.reason, res.reason


@pytest.mark.parametrize("tag", R.TAGS)
def test_a_wrong_shape_fails(tag):
    for i, rec in enumerate(_records([tag], 25, seed=7, split="train")):
        item_index = i % len(rec["include"])
        item = rec["include"][item_index]
        used = {it["class"] for it in rec["include"]}
        other = [s for s in W.SHAPES if s not in used][i % (len(W.SHAPES) - len(used))]
        scene = P.render_record(rec, seed=i)
        res = _judge(W.replace_object(scene, _group_slice(rec, item_index)[-1], shape=other), rec)
        n = item["count"]
        assert not res.correct and f"expected {item['class']}>={n}, found {n - 1}" in res.reason, res.reason
        assert f"1 {scene.objects[_group_slice(rec, item_index)[-1]].color} {other}" in res.found


def test_swapped_colors_fail_color_attr():
    for i, rec in enumerate(_records(["color_attr"], 60, seed=8, split="train")):
        scene = P.render_record(rec, seed=i)
        a, b = scene.objects
        swapped = W.replace_object(W.replace_object(scene, 0, color=b.color), 1, color=a.color)
        res = _judge(swapped, rec)
        first = rec["include"][0]
        assert not res.correct
        assert f"expected {first['color']} {first['class']}>=1, found 0 {first['color']}; and 1 {b.color}" \
            in res.reason, res.reason


def test_a_wrong_color_fails_colors():
    for i, rec in enumerate(_records(["colors"], 40, seed=9, split="train")):
        item = rec["include"][0]
        wrong = [c for c in R.GENEVAL_COLORS if c != item["color"]][i % 9]
        res = _judge(W.replace_object(P.render_record(rec, seed=i), 0, color=wrong), rec)
        assert not res.correct
        assert f"expected {item['color']} {item['class']}>=1, found 0 {item['color']}; and 1 {wrong}" in res.reason


def test_mirrored_positions_fail():
    for i, rec in enumerate(_records(["position"], 60, seed=10, split="train")):
        subject, target = rec["include"][1], rec["include"][0]
        rel = subject["position"][0]
        axis = "x" if rel in ("left of", "right of") else "y"
        scene = P.render_record(rec, seed=i, distractors=i % 2)
        res = _judge(W.mirror_scene(scene, axis), rec)
        assert not res.correct
        # Rendered relations are clean (no perpendicular relation), so the mirror is exactly the opposite.
        want = (f"expected {subject['class']} {rel} {target['class']}, "
                f"found {subject['class']} {R.OPPOSITE_RELATION[rel]} {target['class']} (at ")
        assert want in res.reason, res.reason
        assert _judge(scene, rec).correct


def test_position_without_a_matched_target_says_so():
    rec = P.make_record("position", [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["left of", 0]}])
    scene = W.compose_scene([W.ObjectGroup("square", 1, "red")], seed=0)
    res = _judge(scene, rec)
    assert not res.correct
    assert "expected circle>=1, found 0" in res.reason and "no target for square to be left of" in res.reason


def test_extra_objects_of_other_classes_are_fine_and_color_is_charitable():
    # GenEval only excludes what the record excludes; with a color asked, an object of that color counts.
    rec = P.make_record("colors", [{"class": "circle", "count": 1, "color": "red"}])
    scene = W.compose_scene([W.ObjectGroup("circle", 1, "blue"), W.ObjectGroup("circle", 1, "red"),
                             W.ObjectGroup("square", 2)], seed=1)
    assert _judge(scene, rec).correct


def _scene(*objects):
    """A scene from explicit (shape, color, box) triples; boxes are (x0, y0, x1, y1) in a 64 px image."""
    return W.Scene(64, tuple(W.SceneObject(shape, color, box) for shape, color, box in objects))


BIG_LEFT, BIG_RIGHT = (2, 20, 24, 42), (40, 20, 62, 42)
SMALL_LEFT, SMALL_RIGHT = (4, 50, 14, 60), (50, 2, 60, 12)


def test_color_attribution_picks_the_asked_color_not_the_largest_object():
    # The red circle is the smallest object of its class in every scene here: a "largest first"
    # choice would pick the big blue circle and fail the records that ask for red.
    rec = P.make_record("colors", [{"class": "circle", "count": 1, "color": "red"}])
    scene = _scene(("circle", "blue", BIG_LEFT), ("circle", "red", SMALL_RIGHT))
    assert scene.objects[0].area > 3 * scene.objects[1].area
    assert _judge(scene, rec).correct
    # two red circles asked, both smaller than two other-colored circles
    rec2 = P.make_record("counting", [{"class": "circle", "count": 2, "color": "red"}])
    scene2 = _scene(("circle", "blue", BIG_LEFT), ("circle", "green", BIG_RIGHT),
                    ("circle", "red", SMALL_LEFT), ("circle", "red", SMALL_RIGHT))
    assert _judge(scene2, rec2).correct
    res = _judge(W.replace_object(scene2, 3, color="yellow"), rec2)  # only one red left
    assert not res.correct and "expected red circle>=2, found 1 red; and 1 red, 1 blue" in res.reason, res.reason


def test_color_attribution_decides_which_object_a_position_is_judged_on():
    # "a red circle left of a square": the red circle is small and left of the square, a larger
    # blue circle stands right of it. Judging the largest circle would say "right of".
    rec = P.make_record("position", [{"class": "square", "count": 1},
                                     {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}])
    square = ("square", "green", (26, 26, 38, 38))
    good = _scene(square, ("circle", "red", (2, 27, 12, 37)), ("circle", "blue", (42, 20, 62, 40)))
    assert _judge(good, rec).correct
    # Mirrored: the small red circle is now right of the square, the big blue one left of it.
    bad = W.mirror_scene(good, "x")
    res = _judge(bad, rec)
    assert not res.correct and "expected circle left of square, found circle right of square" in res.reason, \
        res.reason
    # color_attr with two colored items, each the smaller of its class
    rec2 = P.make_record("color_attr", [{"class": "circle", "count": 1, "color": "red"},
                                        {"class": "square", "count": 1, "color": "blue"}])
    scene = _scene(("circle", "green", BIG_LEFT), ("circle", "red", SMALL_LEFT),
                   ("square", "yellow", BIG_RIGHT), ("square", "blue", SMALL_RIGHT))
    assert _judge(scene, rec2).correct
    res = _judge(W.replace_object(scene, 3, color="yellow"), rec2)
    assert not res.correct and "expected blue square>=1, found 0 blue; and 1 yellow" in res.reason, res.reason


def test_excludes_with_a_color_count_only_that_color():
    # "a circle, but no red circle": other colors do not trip the exclude, one red circle does.
    rec = {"tag": "colors", "include": [{"class": "circle", "count": 1}],
           "exclude": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a circle, not red"}
    assert _judge(_scene(("circle", "blue", BIG_LEFT)), rec).correct
    assert _judge(_scene(("circle", "blue", BIG_LEFT), ("square", "red", BIG_RIGHT)), rec).correct  # other class
    res = _judge(_scene(("circle", "blue", BIG_LEFT), ("circle", "red", SMALL_RIGHT)), rec)
    assert not res.correct and res.reason == "expected red circle<1, found 1", res.reason
    # "fewer than two red circles": three blue circles and one red pass (a color-blind count says 4)
    rec2 = {"tag": "counting", "include": [{"class": "circle", "count": 1}],
            "exclude": [{"class": "circle", "count": 2, "color": "red"}], "prompt": "at most one red circle"}
    four = _scene(("circle", "blue", BIG_LEFT), ("circle", "blue", BIG_RIGHT), ("circle", "blue", SMALL_LEFT),
                  ("circle", "red", SMALL_RIGHT))
    assert _judge(four, rec2).correct
    res = _judge(W.replace_object(four, 2, color="red"), rec2)
    assert not res.correct and res.reason == "expected red circle<2, found 2", res.reason
    # an uncolored exclude still counts every color
    rec3 = {**rec2, "exclude": [{"class": "circle", "count": 2}]}
    assert not _judge(four, rec3).correct


def test_ground_truth_renders_respect_colored_excludes():
    # render_record used to draw an excluded color for an uncolored item of the same class.
    rec = {"tag": "position", "include": [{"class": "circle", "count": 3},
                                          {"class": "square", "count": 1, "position": ["left of", 0]}],
           "exclude": [{"class": "circle", "count": 1, "color": "red"},
                       {"class": "circle", "count": 1, "color": "blue"}], "prompt": "three circles, none red or blue"}
    for seed in range(30):
        scene = P.render_record(rec, seed=seed)
        assert scene.count("circle", "red") == scene.count("circle", "blue") == 0
        assert scene.count("circle") == 3
        assert _judge(scene, rec).correct, seed
    every = {**rec, "exclude": [{"class": "circle", "count": 1, "color": c} for c in W.WorldConfig().colors]}
    with pytest.raises(ValueError, match="every color of circle is excluded"):
        P.render_record(every)


# ---------------------------------------------------------------------------------------------
# Image inputs


def test_all_input_forms_agree(tmp_path):
    records = _records(None, 6, seed=12)
    images = [P.render_record(r, seed=i).render() for i, r in enumerate(records)]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i:04d}.png"))
        assert cv2.imwrite(paths[-1], img[:, :, ::-1])
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    by_array = E.evaluate(images, records)
    by_path = E.evaluate(paths, records)
    by_batch = E.evaluate(batch, records)
    by_single = [E.evaluate_record(batch[i], r) for i, r in enumerate(records)]
    mixed = E.evaluate([paths[0], images[1], batch[2], batch[3:]], records)
    # a numpy batch [B, H, W, 3], as xlard.shapes.backbone.generate returns (refused as "expected HxWx3" before)
    by_numpy_batch = E.evaluate(np.stack(images), records)
    mixed_numpy = E.evaluate([images[0], np.stack(images[1:])], records)
    for group in (by_path, by_batch, by_single, mixed, by_numpy_batch, mixed_numpy):
        assert [(r.correct, r.found) for r in group] == [(r.correct, r.found) for r in by_array]
    assert all(r.correct for r in by_array)
    assert by_path[0].filename == paths[0] and by_array[0].filename is None
    rgba = np.concatenate([images[0], np.full((64, 64, 1), 255, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba[:, :, [2, 1, 0, 3]])
    assert E.evaluate_record(str(tmp_path / "rgba.png"), records[0]).found == by_array[0].found


def test_summaries_name_inputs_of_the_wrong_kind(tmp_path):
    """summarize(records), format_table(results): AttributeError "'dict' object has no attribute 'tag'" and
    "list indices must be integers" before."""
    records = _records(["single_object"], 2)
    results = E.evaluate([P.render_record(r, seed=0).render() for r in records], records)
    with pytest.raises(TypeError, match=r"summarize: results\[0\] must be a RecordResult .*a GenEval record\? "
                                        r"score images first: evaluate\(images, records\)"):
        E.summarize(records)
    with pytest.raises(TypeError, match="summarize: results must be a list of RecordResult .*got NoneType"):
        E.summarize(None)
    with pytest.raises(TypeError, match=r"format_table: summary must be what summarize\(\) returns .*got list; "
                                        r"per-image results\? pass summarize\(results\)"):
        E.format_table(results)
    with pytest.raises(TypeError, match=r"write_results_jsonl: results\[1\] must be a RecordResult"):
        E.write_results_jsonl(tmp_path / "r.jsonl", [results[0], "x"])
    assert not (tmp_path / "r.jsonl").exists()
    assert "overall" in E.format_table(E.summarize(results))


def test_one_record_for_many_images():
    rec = _records(["counting"], 1)[0]
    imgs = [P.render_record(rec, seed=s).render() for s in range(3)]
    assert [r.correct for r in E.evaluate(imgs, rec)] == [True] * 3


@pytest.mark.parametrize("image,error,message", [
    (np.zeros((64, 64), np.uint8), ValueError, r"expected an HxWx3 RGB array, got shape \(64, 64\)"),
    (np.zeros((3, 64, 64), np.uint8), ValueError, "channels-first"),
    (np.zeros((64, 64, 4), np.uint8), ValueError, "expected an HxWx3 RGB array"),
    (np.zeros((64, 64, 3), np.float32), ValueError, "expected dtype uint8 for numpy images, got float32"),
    (torch.zeros(4, 64, 64), ValueError, r"expected a tensor \[3, H, W\] or \[B, 3, H, W\]"),
    (torch.zeros(2, 64, 64, 3), ValueError, r"expected a tensor \[3, H, W\] or \[B, 3, H, W\]"),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), ValueError, "expected a floating tensor"),
    (torch.full((3, 8, 8), 2.0), ValueError, r"values must lie in \[0, 1\]"),
    (torch.full((3, 8, 8), -1.0), ValueError, r"\(x \+ 1\) / 2"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
    ("/nonexistent/image.png", FileNotFoundError, "image file not found"),
    (3.5, TypeError, r"expected a path, a uint8 \[B,\]HxWx3 numpy array"),
    (np.zeros((2, 3, 64, 64), np.uint8), ValueError, r"image 0\[0\]: .*channels-first"),
])
def test_bad_images_give_clear_errors(image, error, message):
    rec = _records(["single_object"], 1)[0]
    with pytest.raises(error, match=message):
        E.evaluate_record(image, rec)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height (Pillow reads the size from IHDR without decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(5000, 4000), (12000, 12000), (20000, 20000)])
def test_an_image_too_large_is_refused_before_it_is_decoded(tmp_path, width, height):
    """A 12000 x 12000 PNG of 0.4 MB took 24 GB of memory and a minute in segment_colors (a 20000 x 20000 one
    raised Pillow's DecompressionBombError, uncaught); now any image above 4096 x 4096 pixels is refused from
    its header, naming the file and the bound."""
    path = tmp_path / "big.png"
    _png_header_only(path, width, height)
    with pytest.raises(ValueError, match=r"big.png: .*the evaluator reads images of at most 16,777,216 pixels"):
        E.load_images(str(path))
    with pytest.raises(ValueError, match=r"image 0: 4097x4097 pixels; the evaluator reads images of at most"):
        E.load_images(np.zeros((4097, 4097, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image 0: 4097x4096 pixels"):
        E.load_images(torch.zeros(1, 3, 4096, 4097))
    assert E.load_images(np.zeros((4096, 4096, 3), np.uint8))[0][0].shape == (4096, 4096, 3)  # the bound itself


def test_segment_colors_matches_the_all_prototypes_at_once_reference():
    """segment_colors runs one prototype at a time (memory H x W); the same labels as comparing every pixel with
    every prototype at once, ties to the first prototype included."""
    cfg = E.EvaluatorConfig()
    _, rgb = E._prototypes()
    rng = np.random.default_rng(0)
    near = rgb[rng.integers(0, len(rgb), (48, 48))] + rng.integers(-40, 41, (48, 48, 3))
    images = [rng.integers(0, 256, (32, 40, 3)).astype(np.uint8), np.clip(near, 0, 255).astype(np.uint8),
              np.full((4, 4, 3), 128, np.uint8)]
    for image in images:
        diff = image.astype(np.int32)[:, :, None, :] - rgb[None, None, :, :]
        dist2 = np.einsum("hwkc,hwkc->hwk", diff, diff)
        nearest = dist2.argmin(axis=2)
        best = np.take_along_axis(dist2, nearest[:, :, None], axis=2)[:, :, 0]
        want = (nearest - 1).astype(np.int8)
        want[(nearest == 0) | (best > cfg.color_cutoff ** 2)] = -1
        np.testing.assert_array_equal(E.segment_colors(image, cfg), want)


def test_unreadable_file_gives_clear_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image file"):
        E.load_images(str(path))
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="3- or 4-channel color image"):
        E.load_images(str(gray))


def test_malformed_records_and_mismatches_give_clear_errors():
    img = W.random_scene(0).render()
    with pytest.raises(ValueError, match="'dog' is not a class of this world"):
        E.evaluate_record(img, {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "x"})
    with pytest.raises(ValueError, match="missing the key 'include'"):
        E.evaluate_record(img, {"tag": "single_object", "prompt": "x"})
    with pytest.raises(ValueError, match=r"record 1: include\[0\]\['count'\] must be an integer >= 1, got -1"):
        E.evaluate([img, img], [_records(["colors"], 1)[0],
                                {"tag": "counting", "include": [{"class": "circle", "count": -1}], "prompt": "x"}])
    with pytest.raises(ValueError, match="got 2 images but 3 records"):
        E.evaluate([img, img], _records(None, 3))
    with pytest.raises(ValueError, match="exactly one image"):
        E.evaluate_record(torch.zeros(2, 3, 8, 8), _records(["colors"], 1)[0])
    with pytest.raises(ValueError, match="color_cutoff"):
        E.EvaluatorConfig(color_cutoff=0)


# ---------------------------------------------------------------------------------------------
# Reports


def _fake(tag, correct):
    return E.RecordResult(correct, "ok" if correct else "no", tag, "p", "nothing", (), {})


def test_overall_is_the_mean_of_task_means(capsys):
    results = [_fake("counting", True)] * 9 + [_fake("counting", False)] + [_fake("position", False)] * 2 \
        + [_fake("position", True)] * 2
    summary = E.summarize(results, print_table=True)
    assert summary["tasks"]["counting"] == {"correct": 9, "total": 10, "score": 0.9}
    assert summary["overall"] == pytest.approx((0.9 + 0.5) / 2)  # not 11 / 14
    assert summary["missing_tags"] == ["single_object", "two_object", "colors", "color_attr"]
    out = capsys.readouterr().out
    assert "counting" in out and "0.7000" in out and "missing tags" in out
    assert list(E.summarize([_fake(t, True) for t in reversed(R.TAGS)])["tasks"]) == list(R.TAGS)


def test_results_jsonl_and_geneval_folder(tmp_path):
    records = _records(None, 6, seed=13)
    for i, rec in enumerate(records):
        sub = tmp_path / "run" / f"{i:05d}"
        (sub / "samples").mkdir(parents=True)
        P.write_jsonl(sub / "metadata.jsonl", [rec])
        for k in range(2):
            scene = P.render_record(rec, seed=10 * i + k)
            if k == 1:
                scene = W.remove_object(scene, 0)
            cv2.imwrite(str(sub / "samples" / f"{k:04d}.png"), scene.render()[:, :, ::-1])
    results = E.evaluate_folder(tmp_path / "run")
    assert [r.correct for r in results] == [True, False] * 6
    out = E.write_results_jsonl(tmp_path / "results.jsonl", results)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and rows[1]["correct"] is False and "expected" in rows[1]["reason"]
    assert rows[0]["metadata"] == records[0] and rows[0]["filename"].endswith("00000/samples/0000.png")
    assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "found", "metadata", "details"}
    assert rows[0]["details"][0].keys() == {"shape", "color", "bbox", "area", "centre", "shape_iou"}
    with pytest.raises(FileNotFoundError, match="GenEval layout"):
        E.evaluate_folder(tmp_path)
    # A bad record is named with its metadata file (was only "record 0").
    (tmp_path / "run" / "00003" / "metadata.jsonl").write_text(json.dumps({"tag": "counting"}) + "\n")
    with pytest.raises(ValueError, match=r"run/00003/metadata.jsonl: GenEval record is missing the key 'include'"):
        E.evaluate_folder(tmp_path / "run")


@pytest.mark.parametrize("seed", range(6))
def test_component_boxes_match_scipy_find_objects(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < 0.3
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    labels = labels.astype(np.int32)
    want = ndimage.find_objects(labels)
    got = E._component_slices(labels, count)
    assert got == list(want) + [None] * (count - len(want))


def test_component_boxes_skip_labels_without_pixels():
    labels = np.zeros((5, 6), np.int32)
    labels[1:3, 2:5] = 2
    assert E._component_slices(labels, 3) == [None, (slice(1, 3), slice(2, 5)), None]


def test_png_files_in_rgba_and_palette_modes_read_as_rgb(tmp_path):
    from PIL import Image

    img = W.random_scene(3).render()
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(img, mode="RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    arrays, names = E.load_images([str(tmp_path / "rgba.png"), str(tmp_path / "p.png")])
    assert np.array_equal(arrays[0], img)
    assert arrays[1].shape == img.shape and arrays[1].dtype == np.uint8
    assert names == [str(tmp_path / "rgba.png"), str(tmp_path / "p.png")]
    Image.fromarray(np.zeros((8, 8), np.uint16) + 300).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="8-bit image"):
        E.load_images(str(tmp_path / "deep.png"))


@pytest.mark.parametrize("value", [float("nan"), -1.0, 5.0, "0.1"])
def test_position_threshold_is_checked(value):
    with pytest.raises(ValueError, match="position_threshold must be a number in"):
        E.EvaluatorConfig(position_threshold=value)


def test_world_must_be_a_world_config():
    with pytest.raises(ValueError, match="world must be a WorldConfig"):
        E.EvaluatorConfig(world="x")


def test_transparent_png_is_refused_not_judged_as_black(tmp_path):
    from PIL import Image

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[20:40, 20:40] = (215, 35, 35, 255)  # a red square, a transparent (black) background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    record = {"tag": "single_object", "prompt": "a photo of a square", "include": [{"class": "square", "count": 1}]}
    with pytest.raises(ValueError, match="transparent pixels"):
        E.evaluate([str(tmp_path / "x.png")], [record])
    rgba[..., 3] = 255  # opaque RGBA is read as its RGB
    Image.fromarray(rgba, "RGBA").save(tmp_path / "y.png")
    E.evaluate([str(tmp_path / "y.png")], [record])


def test_exif_orientation_is_honoured_and_animated_files_refused(tmp_path):
    """A picture saved rotated with an EXIF Orientation tag was judged as stored ("left of" became "below"), and
    an animated PNG was judged by its first frame without a word."""
    from PIL import Image

    img = W.random_scene(5).render()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored turned 90 degrees counter-clockwise
    Image.fromarray(img).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(img).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned_no_tag.png")
    arrays, _ = E.load_images([str(tmp_path / "turned.png"), str(tmp_path / "turned_no_tag.png")])
    assert np.array_equal(arrays[0], img)            # as a viewer shows it
    assert not np.array_equal(arrays[1], img)        # without the tag the stored pixels are the picture
    keyed = img.copy()
    keyed[0, 0] = (1, 2, 3)
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=(1, 2, 3))  # a tRNS color key
    with pytest.raises(ValueError, match=r"keyed.png: has transparent pixels"):
        E.load_images(str(tmp_path / "keyed.png"))
    frames = [Image.fromarray(np.full((16, 16, 3), 200, np.uint8)), Image.fromarray(img[:16, :16])]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ValueError, match=r"anim.png: an animated image \(2 frames\)"):
        E.load_images(str(tmp_path / "anim.png"))


def test_a_folder_named_like_an_image_is_not_reported_missing(tmp_path):
    (tmp_path / "0000.png").mkdir()
    with pytest.raises(ValueError, match=r"0000.png: a folder named like an image, not an image file"):
        E.load_images(str(tmp_path / "0000.png"))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        E.load_images(str(tmp_path / "0001.png"))
    os.mkfifo(tmp_path / "0002.png")
    with pytest.raises(ValueError, match=r"0002.png: a special file \(FIFO, socket or device\) named like an image"):
        E.load_images(str(tmp_path / "0002.png"))


def test_png_files_match_the_suffix_in_any_case(tmp_path):
    for name in ("0000.PNG", "0001.png", "0002.Png", ".tmp-0003.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in E.png_files(tmp_path)] == ["0000.PNG", "0001.png", "0002.Png"]


def test_understanding_predict_refuses_nan_and_0_255_images():
    from xlard.shapes.understanding import ShapesUnderstanding, UnderstandingConfig

    model = ShapesUnderstanding(UnderstandingConfig())
    with pytest.raises(ValueError, match=r"images must be finite values in \[0, 1\]"):
        model.predict(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="0..255"):
        model.predict(torch.full((1, 3, 64, 64), 200.0))


def test_understanding_predict_runs_every_submodule_in_eval_mode_and_restores_each_ones_mode():
    """predict() runs every submodule in eval mode: a model in eval mode with one BatchNorm switched back to
    training still predicts with running statistics and leaves them alone; afterwards every submodule has its
    own mode back (that BatchNorm training again: model.train(was_training) had put it in eval), also when the
    pass raises (an interrupt left a training model in eval mode)."""
    from xlard.shapes.understanding import ShapesUnderstanding, UnderstandingConfig

    torch.manual_seed(0)
    model = ShapesUnderstanding(UnderstandingConfig())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:  # running statistics unlike a batch's, so that a pass in training mode would show
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = model.eval().predict(images)
    norms[0].train()
    before = norms[0].running_mean.clone()
    got = model.predict(images)
    assert torch.equal(got.shape_probs, want.shape_probs) and torch.equal(got.color_probs, want.color_probs)
    assert torch.equal(norms[0].running_mean, before)
    assert [m for m in model.modules() if m.training] == [norms[0]]
    got = model.train().predict(images)
    assert torch.equal(got.shape_probs, want.shape_probs) and all(m.training for m in model.modules())

    def interrupted(module, args):
        raise KeyboardInterrupt

    handle = norms[-1].register_forward_pre_hook(interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.predict(images)
    finally:
        handle.remove()
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Bad arguments: named, never a bare AttributeError/KeyError/IndexError, never read as the default


@pytest.mark.parametrize("config, words", [
    ({"color_cutoff": 60}, r"got dict; build it first: EvaluatorConfig\(\*\*mapping\)"),
    ({}, "got dict"),  # falsy: it was silently read as the default config
    (0, "got int"),
    ("x", "got str"),
    (W.WorldConfig(), r"got WorldConfig; a world\? pass EvaluatorConfig\(world=...\)"),
    (E.EvaluatorConfig, r"got the class itself; call it: EvaluatorConfig\(\)"),  # was read as the defaults
])
def test_evaluator_functions_refuse_a_config_that_is_not_an_evaluator_config(config, words, tmp_path):
    record = _records(["position"], 1)[0]
    img = P.render_record(record, seed=0).render()
    words = ": config must be an EvaluatorConfig or None, " + words
    for fn, call in (("detect_objects", lambda: E.detect_objects(img, config)),
                     ("segment_colors", lambda: E.segment_colors(img, config)),
                     ("evaluate_record", lambda: E.evaluate_record(img, record, config)),
                     ("evaluate", lambda: E.evaluate(img, record, config)),
                     ("evaluate_folder", lambda: E.evaluate_folder(tmp_path, config))):
        with pytest.raises(TypeError, match=fn + words):
            call()


def test_score_record_names_malformed_records_detections_and_thresholds():
    record = _records(["position"], 1)[0]
    dets = E.detect_objects(P.render_record(record, seed=0).render(), CONFIG)
    assert E.score_record(dets, record) == (True, []) and E.score_record(iter(dets), record) == (True, [])
    item = {"class": "circle", "count": 1}
    cases = [
        ({}, "record is missing the key 'include'"),                                 # KeyError
        (None, r"record must be a GenEval record \(a mapping\), got NoneType"),        # not subscriptable
        ({**record, "include": None}, r"record\['include'\] must be a non-empty list"),
        ({**record, "include": []}, r"record\['include'\] must be a non-empty list"),  # judged correct
        ({**record, "include": [{}]}, r"record\['include'\]\[0\]\['class'\] must be a string"),
        ({**record, "include": [{**item, "count": "1"}]}, r"\['count'\] must be an integer >= 1, got '1'"),
        ({**record, "include": [{**item, "count": 1.5}]}, r"\['count'\] must be an integer >= 1"),
        ({**record, "include": [{**item, "color": ["red"]}]}, r"\['color'\] must be a string or absent"),
        ({**record, "include": [item, {**item, "position": ["left of", 5]}]},   # IndexError
         r"record\['include'\]\[1\]\['position'\] must be \[relation, index of an earlier include item\]"),
        ({**record, "include": [{**item, "position": ["left of", 0]}]}, r"\['position'\] must be"),
        ({**record, "include": [item, {**item, "position": ["left of", -1]}]}, r"\['position'\] must be"),
        ({**record, "exclude": None}, r"record\['exclude'\] must be a list"),
        ({**record, "exclude": [{}]}, r"record\['exclude'\]\[0\]\['class'\] must be a string"),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError, match="score_record: .*" + words):
            E.score_record(dets, bad)
    for bad, words in ((None, "got NoneType"), (dets[0], "got Detection"), ([{"shape": "circle"}], "got dict")):
        with pytest.raises(TypeError, match=r"score_record: detections(\[0\])? must be a.*" + words):
            E.score_record(bad, record)
    for bad in (None, float("nan"), 5, "0.1"):  # None raised a TypeError; NaN and 5 failed every relation
        with pytest.raises(ValueError, match=r"score_record: position_threshold must be a number in \[0, 1\)"):
            E.score_record(dets, record, bad)
    with pytest.raises(ValueError, match=r"an EvaluatorConfig\? pass config.position_threshold"):
        E.score_record(dets, record, CONFIG)


def test_evaluator_inputs_of_the_wrong_kind_are_named():
    img = W.random_scene(0).render()
    record = _records(["colors"], 1)[0]
    for bad in (None, [img], "x.png"):  # "'NoneType' object has no attribute 'ndim'"
        with pytest.raises(TypeError, match=r"image: expected a uint8 HxWx3 numpy array, got"):
            E.detect_objects(bad)
    for bad in (None, 5, "a photo of a circle"):  # "not iterable"; a string was one record per letter
        with pytest.raises(TypeError, match=r"evaluate: records must be a GenEval record \(a mapping\) or a list"):
            E.evaluate(img, bad)
    with pytest.raises(TypeError, match="evaluate_record: filename must be a str, a path or None, got int"):
        E.evaluate_record(img, record, None, 5)
    from pathlib import Path  # a path is kept as its string, as before the check

    assert E.evaluate_record(img, record, None, Path("a.png")).filename == "a.png"
    for name in ("color_cutoff", "min_area", "min_shape_iou", "max_aspect"):  # None raised a bare TypeError
        for bad in (None, "1", True):
            with pytest.raises(ValueError, match=f"{name} must be a number, got"):
                E.EvaluatorConfig(**{name: bad})


def test_a_frame_filled_with_a_palette_color_is_background_not_a_square():
    """A blank white (or black, or red) image was 'found 1 white square' (box = the whole frame, IoU 1.0) and passed
    'a photo of a square'; on a white background the background itself was a square beside the objects."""
    from xlard.shapes.world import PALETTE, Scene, SceneObject

    square = {"tag": "single_object", "include": [{"class": "square", "count": 1}], "exclude": [],
              "prompt": "a photo of a square"}
    for rgb in (PALETTE["white"], PALETTE["black"], PALETTE["red"], (255, 255, 255)):
        blank = np.full((64, 64, 3), rgb, np.uint8)
        verdict = E.evaluate(blank, square)[0]
        assert not verdict.correct and "found 0" in verdict.reason, (rgb, verdict.reason)
    img = Scene(64, (SceneObject("circle", "red", (20, 20, 32, 32)),), background=PALETTE["white"]).render()
    both = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
            "exclude": [], "prompt": "a photo of a circle and a square"}
    assert not E.evaluate(img, both)[0].correct
    assert [(d.shape, d.color) for d in E.detect_objects(img) if d.shape] == [("circle", "red")]
    # objects far larger than the world draws them (16 px at most) are still objects, a circle spanning the frame too
    big = Scene(64, (SceneObject("square", "blue", (1, 1, 63, 63)),)).render()
    assert [(d.shape, d.color) for d in E.detect_objects(big)] == [("square", "blue")]
    whole = Scene(64, (SceneObject("circle", "red", (0, 0, 64, 64)),)).render()
    assert [(d.shape, d.color, d.bbox) for d in E.detect_objects(whole)] == [("circle", "red", (0, 0, 64, 64))]
