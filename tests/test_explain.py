"""Tests of xlard.explain: LAM, normalization, overlay alignment, colormap, PNG, faithfulness, HTML report."""
from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from xlard import explain
from xlard.explain import (
    ReportItem,
    apply_colormap,
    colormap_table,
    faithfulness,
    latent_activation_map,
    normalize_lam,
    overlay,
    read_png,
    render_html_report,
    report_items,
    save_png,
    top_lam_mask,
    upsample_lam,
    write_html_report,
)

PIL = pytest.importorskip("PIL")


def _image(h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 0.8 + 0.1


def _hot(h, w, i, j, value=1.0):
    lam = torch.zeros(h, w)
    lam[i, j] = value
    return lam


def _lit(values: torch.Tensor, dim: int) -> list[int]:
    """Image rows (dim=1) or cols (dim=0) whose marginal is above half the marginal's peak."""
    marginal = values.sum(dim)
    return torch.nonzero(marginal > 0.5 * marginal.max()).flatten().tolist()


# ----------------------------------------------------------------------- LAM


def test_lam_is_sum_abs_delta_batched_and_unbatched():
    delta = torch.randn(2, 4, 5, 7)
    lam = latent_activation_map(delta)
    assert lam.shape == (2, 5, 7) and lam.dtype == torch.float32
    torch.testing.assert_close(lam, delta.abs().sum(1))
    torch.testing.assert_close(latent_activation_map(delta[1]), delta[1].abs().sum(0))
    assert latent_activation_map(delta.double()).dtype == torch.float64


def test_lam_matches_the_corrector_and_renders():
    from xlard.models import CorrectorConfig, ResidualCorrector

    torch.manual_seed(0)
    model = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=16, pooled_dim=8))
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)                  # leave the zero init: a non-trivial delta
        z0, text, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.randn(2, 8)
        delta = model(z0, text, pooled)
        _, lam = model.correct(z0, text, pooled)
    assert torch.equal(latent_activation_map(delta), lam)
    out = overlay(torch.stack([_image(), _image(seed=1)]), lam)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_lam_bad_inputs():
    with pytest.raises(TypeError, match="delta must be a torch.Tensor"):
        latent_activation_map([[1.0]])
    with pytest.raises(ValueError, match="3 or 4 dimensions"):
        latent_activation_map(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        latent_activation_map(torch.zeros(1, 2, 3, 3, dtype=torch.int64))


# --------------------------------------------------------------- normalization


def test_normalize_zero_uniform_and_scale():
    assert torch.equal(normalize_lam(torch.zeros(3, 4)), torch.zeros(3, 4))
    assert torch.equal(normalize_lam(torch.full((3, 4), 2.5)), torch.ones(3, 4))
    lam = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    torch.testing.assert_close(normalize_lam(lam), lam / 4)
    # per image: the second image's scale does not leak into the first
    both = normalize_lam(torch.stack([lam, lam * 100, torch.zeros(2, 2)]))
    torch.testing.assert_close(both[0], lam / 4)
    torch.testing.assert_close(both[1], lam / 4)
    assert torch.equal(both[2], torch.zeros(2, 2))


def test_normalize_nonfinite_cells():
    lam = torch.tensor([[float("nan"), 1.0], [float("inf"), 2.0]])
    out = normalize_lam(lam)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5], [0.0, 1.0]]))
    assert torch.equal(normalize_lam(torch.full((2, 3), float("nan"))), torch.zeros(2, 3))
    assert torch.equal(normalize_lam(torch.zeros(1, 0, 3)), torch.zeros(1, 0, 3))


def test_normalize_quantile_clips_outlier():
    lam = torch.ones(10, 10)
    lam[0, 0] = 1000.0
    assert normalize_lam(lam)[5, 5] < 0.01
    out = normalize_lam(lam, quantile=0.9)
    assert out[5, 5] == 1.0 and out[0, 0] == 1.0 and out.max() <= 1.0
    lam[1, 1] = float("nan")
    assert normalize_lam(lam, quantile=0.9)[1, 1] == 0.0


def test_normalize_bad_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        normalize_lam(torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match="quantile"):
        normalize_lam(torch.ones(2, 2), quantile=0.0)
    with pytest.raises(ValueError, match="2 or 3 dimensions"):
        normalize_lam(torch.ones(2))
    with pytest.raises(TypeError, match="floating-point"):
        normalize_lam(torch.ones(2, 2, dtype=torch.int32))


# ----------------------------------------------------------- overlay alignment


def test_single_hot_cell_lights_its_image_block():
    # latent 8x8 -> image 64x64: cell (2, 5) covers rows 16-23, cols 40-47.
    up = upsample_lam(_hot(8, 8, 2, 5), (64, 64))
    assert up.shape == (64, 64)
    assert _lit(up, dim=1) == list(range(16, 24))
    assert _lit(up, dim=0) == list(range(40, 48))
    # the brightest pixels are the block's centre, the mass is centred on it
    peak = torch.nonzero(up == up.max()).tolist()
    assert sorted(map(tuple, peak)) == [(19, 43), (19, 44), (20, 43), (20, 44)]
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    assert math.isclose((up * rows).sum().item() / up.sum().item(), 19.5, abs_tol=1e-4)
    assert math.isclose((up * cols).sum().item() / up.sum().item(), 43.5, abs_tol=1e-4)
    # the check is sharp: corner-aligned resampling lands on the wrong pixels
    shifted = F.interpolate(_hot(8, 8, 2, 5)[None, None], size=(64, 64), mode="bilinear", align_corners=True)[0, 0]
    assert _lit(shifted, dim=1) != list(range(16, 24))


def test_hot_cell_non_square_and_at_the_border():
    up = upsample_lam(_hot(4, 6, 3, 0), (32, 48))           # 8x8 pixel cells
    assert _lit(up, dim=1) == list(range(24, 32))
    assert _lit(up, dim=0) == list(range(0, 8))


def test_overlay_changes_only_the_hot_region():
    image = _image()
    out = overlay(image, _hot(8, 8, 2, 5, value=3.0), alpha=0.8)
    assert out.shape == image.shape and out.dtype == torch.float32
    changed = (out - image).abs().amax(0) > 0
    rows = torch.nonzero(changed.any(1)).flatten()
    cols = torch.nonzero(changed.any(0)).flatten()
    # bilinear support of one cell: its block plus half a cell each side
    assert rows.min() >= 12 and rows.max() <= 27 and cols.min() >= 36 and cols.max() <= 51
    assert changed[16:24, 40:48].all()
    torch.testing.assert_close(out[:, :12], image[:, :12], rtol=0, atol=0)
    # at the block's centre pixel: bilinear weight 0.9375^2, its color, blended at opacity alpha * weight
    weight = 0.9375**2
    color = apply_colormap(torch.tensor([[weight]]))[:, 0, 0]
    expected = image[:, 19, 43] * (1 - 0.8 * weight) + color * 0.8 * weight
    torch.testing.assert_close(out[:, 19, 43], expected, atol=1e-5, rtol=0)


def test_overlay_identity_cases_and_batch():
    image = _image()
    torch.testing.assert_close(overlay(image, torch.rand(8, 8), alpha=0.0), image)
    torch.testing.assert_close(overlay(image, torch.zeros(8, 8)), image)
    batch = torch.stack([image, _image(seed=1)])
    lams = torch.stack([_hot(8, 8, 0, 0), _hot(8, 8, 7, 7)])
    out = overlay(batch, lams)
    torch.testing.assert_close(out[1], overlay(batch[1], lams[1]))
    u8 = (image * 255).round().to(torch.uint8)
    torch.testing.assert_close(overlay(u8, lams[0]), overlay(u8.float() / 255, lams[0]))


def test_overlay_bad_inputs():
    image = _image()
    with pytest.raises(ValueError, match="both be batched"):
        overlay(image, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="batch 2 != lam batch 3"):
        overlay(torch.stack([image, image]), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        overlay(image * 2 - 1, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, torch.zeros(8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="channels"):
        overlay(torch.zeros(2, 8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        overlay(torch.full((3, 8, 8), float("nan")), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="normalize=False"):
        overlay(image, torch.full((8, 8), 2.0), normalize=False)
    with pytest.raises(ValueError, match="unknown colormap"):
        overlay(image, torch.zeros(8, 8), colormap="jet")


# ------------------------------------------------------------------- colormap


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return linear @ torch.tensor([0.2126, 0.7152, 0.0722])


@pytest.mark.parametrize("name", sorted(explain.COLORMAPS))
def test_colormap_luminance_is_monotonic(name):
    table = colormap_table(name)
    assert table.shape == (256, 3) and table.min() >= 0 and table.max() <= 1
    lum = _luminance(table)
    assert (lum[1:] > lum[:-1]).all()
    # and apply_colormap follows the table
    values = torch.linspace(0, 1, 256).reshape(16, 16)
    colored = apply_colormap(values, name)
    assert colored.shape == (3, 16, 16)
    torch.testing.assert_close(colored.reshape(3, -1).T, table, atol=1e-5, rtol=0)


def test_colormap_custom_and_bad():
    gray = apply_colormap(torch.tensor([[0.0, 0.25, 1.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(gray[:, 0], torch.tensor([[0.0, 0.25, 1.0]] * 3), atol=1e-6, rtol=0)
    assert apply_colormap(torch.tensor([[float("nan"), 5.0]]))[:, 0, 1].tolist() == colormap_table()[-1].tolist()
    with pytest.raises(ValueError, match=r"\[N >= 2, 3\]"):
        colormap_table(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="sRGB"):
        colormap_table(torch.full((2, 3), 2.0))
    with pytest.raises(TypeError, match="name or a Tensor"):
        colormap_table(3)


# ------------------------------------------------------------------------ PNG


def test_read_png_names_what_it_cannot_read(tmp_path):
    """Pillow's UnidentifiedImageError, a bare errno message and its DecompressionBombError came through as they
    were; each is one error naming read_png and the file now."""
    text = tmp_path / "text.png"
    text.write_text("not a png")
    with pytest.raises(ValueError, match=r"read_png: .*text.png is not a readable image file"):
        read_png(text)
    cut = tmp_path / "cut.png"
    save_png(cut, _image(17, 23))
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"read_png: .*cut.png is not a readable image file"):
        read_png(cut)
    with pytest.raises(FileNotFoundError, match=r"read_png: no image file at .*missing.png"):
        read_png(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match=r"\(a folder\)"):
        read_png(tmp_path)


def test_read_png_reads_as_a_viewer_shows_and_refuses_what_it_would_garble(tmp_path):
    """EXIF orientation was ignored, 16-bit gray came out pure white and a transparent background black."""
    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    want = torch.from_numpy(rgb).permute(2, 0, 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    assert torch.equal(read_png(tmp_path / "turned.png"), want)
    rgba = np.concatenate([rgb, np.full((12, 20, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(read_png(tmp_path / "opaque.png"), want)  # a fully opaque alpha is dropped
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "gray.png")
    assert torch.equal(read_png(tmp_path / "gray.png"), torch.from_numpy(rgb[..., 0]).expand(3, -1, -1))
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hole.png")
    with pytest.raises(ValueError, match=r"read_png: .*hole.png: has transparent pixels"):
        read_png(tmp_path / "hole.png")
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"read_png: .*deep.png: expected an 8-bit image, got mode I;16"):
        read_png(tmp_path / "deep.png")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ValueError, match=r"read_png: .*anim.png: an animated image \(2 frames\)"):
        read_png(tmp_path / "anim.png")
    # a camera JPEG with a second picture (MPO) is one photo, not an animation: its first picture is read
    flat = np.full((12, 20, 3), 90, np.uint8)
    Image.fromarray(flat).save(tmp_path / "photo.jpg", format="MPO", save_all=True,
                               append_images=[Image.fromarray(255 - flat)])
    assert Image.open(tmp_path / "photo.jpg").n_frames == 2
    assert (read_png(tmp_path / "photo.jpg").int() - 90).abs().max() <= 2
    # a color key (tRNS on an RGB PNG) makes its pixels transparent: refused as an alpha channel is
    keyed = rgb.copy()
    keyed[0, 0] = 0
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=(0, 0, 0))
    with pytest.raises(ValueError, match=r"read_png: .*keyed.png: has transparent pixels"):
        read_png(tmp_path / "keyed.png")


def test_png_round_trip_float_and_uint8(tmp_path):
    image = _image(17, 23)
    path = tmp_path / "sub" / "x.png"
    save_png(path, image)
    back = read_png(path)
    assert back.shape == (3, 17, 23) and back.dtype == torch.uint8
    assert torch.equal(back, (image * 255).round().to(torch.uint8))
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (23, 17) and im.mode == "RGB"
    save_png(path, back)                                   # overwrite, uint8 exact
    assert torch.equal(read_png(path), back)
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.png"]   # no temporary left behind


def test_png_gray_and_bad(tmp_path):
    save_png(tmp_path / "g.png", torch.full((1, 4, 5), 0.5))
    assert torch.equal(read_png(tmp_path / "g.png"), torch.full((3, 4, 5), 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_png(tmp_path / "b.png", torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        save_png(tmp_path / "e.png", torch.zeros(3, 0, 4))
    assert not (tmp_path / "b.png").exists()
    # the fix named for the range the values are in (0..255 got the [-1, 1] decoder hint)
    with pytest.raises(ValueError, match=r"got values in \[0, 255\]; 0..255 values\? divide by 255"):
        save_png(tmp_path / "c.png", torch.linspace(0, 255, 48).view(3, 4, 4))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        save_png(tmp_path / "c.png", torch.linspace(-1, 1, 48).view(3, 4, 4))


# ---------------------------------------------------------------- faithfulness


def _toy(b=3, c=4, h=10, w=10):
    """A linear toy reward that counts delta only inside a 10-cell region R."""
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(h, w, dtype=torch.bool)
    region[2, 1:6] = True
    region[7, 4:9] = True
    z0 = torch.randn(b, c, h, w, generator=g)
    delta = 0.01 * torch.randn(b, c, h, w, generator=g)
    delta[:, 0][:, region] += 1.0
    weight = region.float()

    def reward(z):
        return (z[:, 0] * weight).sum((1, 2))

    return reward, z0, delta, region


def test_faithfulness_default_fraction_is_the_published_one():
    """The function defaulted to 10% of the cells while the docs, `xlard eval --mask-fraction` and the demo use
    20%: a Python user got another check than the published one."""
    import inspect

    assert inspect.signature(faithfulness).parameters["fraction"].default == 0.2


def test_faithfulness_toy_loses_the_gain_where_lam_is_high():
    reward, z0, delta, region = _toy()
    res = faithfulness(reward, z0, delta, fraction=0.1, generator=torch.Generator().manual_seed(1))
    assert res.mask.shape == (3, 10, 10) and (res.mask == region).all()
    torch.testing.assert_close(res.gain, reward(z0 + delta) - reward(z0))
    torch.testing.assert_close(res.gain_lost, torch.ones(3))          # all of the gain lived in R
    torch.testing.assert_close(res.reward_masked, res.reward_before)
    assert (res.gain_lost_random < 0.6).all()                         # random cells: about 10%
    expected_drop = (res.reward_after - res.reward_masked) / res.reward_after.abs()
    torch.testing.assert_close(res.relative_drop, expected_drop)
    assert "of it lost" in res.summary() and "random cells" in res.summary()


def test_faithfulness_edges_and_alpha():
    reward, z0, delta, _ = _toy(b=2)
    none = faithfulness(reward, z0, delta, fraction=0.0, random_control=False)
    assert not none.mask.any() and none.reward_random is None
    torch.testing.assert_close(none.gain_lost, torch.zeros(2))
    half = faithfulness(reward, z0, delta, alpha=0.5, random_control=False)
    torch.testing.assert_close(half.gain, 0.5 * (reward(z0 + delta) - reward(z0)))
    flat = faithfulness(reward, z0, torch.zeros_like(delta), random_control=False)
    assert torch.isnan(flat.gain_lost).all()                          # no gain: ratio undefined


def test_faithfulness_per_item_generators_make_the_control_independent_of_the_batch():
    """xlard eval's random control came from one generator per batch: a pair's random cells changed with
    --batch and with where a resumed run's batches started."""
    reward, z0, delta, _ = _toy(b=3)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    whole = faithfulness(reward, z0, delta, fraction=0.3, generator=gens)
    for k in range(3):
        alone = faithfulness(reward, z0[k:k + 1], delta[k:k + 1], fraction=0.3,
                             generator=[torch.Generator().manual_seed(100 + k)])
        torch.testing.assert_close(alone.reward_random, whole.reward_random[k:k + 1], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"one per item \(3\) or None, got a sequence of 2"):
        faithfulness(reward, z0, delta, generator=gens[:2])
    with pytest.raises(TypeError, match="got a sequence of 3"):
        faithfulness(reward, z0, delta, generator=[gens[0], gens[1], 7])


def test_faithfulness_bad_inputs():
    reward, z0, delta, _ = _toy(b=2)
    with pytest.raises(ValueError, match="Tensor\\[B\\] with B = 2"):
        faithfulness(lambda z: z.sum((1, 2, 3))[:1], z0, delta)
    with pytest.raises(TypeError, match="must return a Tensor"):
        faithfulness(lambda z: 1.0, z0, delta)
    with pytest.raises(TypeError, match="callable"):
        faithfulness(None, z0, delta)
    with pytest.raises(ValueError, match="shape"):
        faithfulness(reward, z0, delta[:, :2])
    with pytest.raises(ValueError, match="fraction"):
        faithfulness(reward, z0, delta, fraction=1.5)
    bad = delta.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        faithfulness(reward, z0, bad)
    # a NaN step of one row ran and its summary left the row out of the means without a word
    with pytest.raises(ValueError, match="alpha holds 1 NaN or infinite value"):
        faithfulness(reward, z0, delta, alpha=torch.tensor([float("nan"), 1.0]))


def test_top_lam_mask_counts_and_ties():
    lam = torch.zeros(2, 3, 3)
    mask = top_lam_mask(lam, 0.3)                         # ceil(2.7) = 3 cells, ties by index
    assert mask.sum((1, 2)).tolist() == [3, 3]
    assert mask[0].flatten().tolist() == [True, True, True] + [False] * 6
    assert top_lam_mask(lam, 1.0).all()


# ---------------------------------------------------------------- HTML report


class _ObjWithText:
    def __init__(self, s):
        self.s = s

    def text(self):
        return self.s


def _items():
    lam = torch.zeros(8, 8)
    lam[2:4, 5:7] = 1.0
    return [
        ReportItem("two <script>alert('x')</script> dogs & a cat", before=_image(), after=_image(seed=2), lam=lam,
                   scores={"count": 0.72, "color": float("nan"), "position": None},
                   scores_before={"count": 0.5},
                   explanations={"count": [_ObjWithText("asked for 2 dogs, found 3 <b>")]},
                   joint=0.72, joint_before=0.5, label="seed 1"),
        {"prompt": "a red ball", "after": _image(seed=3), "scores": {"color": 0.9},
         "explanations": [SimpleNamespace(sentence="red ball: red scores 0.90"), "plain sentence"]},
    ]


def test_html_is_self_contained_and_escaped(tmp_path):
    path = tmp_path / "r" / "report.html"
    write_html_report(path, _items(), title="T <i>&</i>")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; dogs &amp; a cat" in text
    assert "T &lt;i&gt;&amp;&lt;/i&gt;" in text
    assert "found 3 &lt;b&gt;" in text
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 4 + 1 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:|//)", text)
    assert "url(" not in text and "@import" not in text and "<link" not in text
    for sentence in ("red ball: red scores 0.90", "plain sentence", "not scored: the prompt does not ask for it", "seed 1"):
        assert sentence in text
    assert sorted(os.listdir(tmp_path / "r")) == ["report.html"]
    # a NUL went into the page raw; a right-to-left override in a prompt reversed the label after it
    text = render_html_report([ReportItem("a cat\x00 \u202edog", label="seed 1")])
    assert "\x00" not in text and "a cat\ufffd" in text
    assert "<bdi>a cat\ufffd \u202edog</bdi>" in text and "<bdi>seed 1</bdi>" in text


def test_html_from_reward_result_like_object(tmp_path):
    result = SimpleNamespace(
        scores=torch.tensor([[1.0, float("nan"), 0.25]]),
        present=torch.tensor([[True, False, True]]),
        joint=torch.tensor([0.6]),
        weights=torch.tensor([[0.5, 0.0, 0.5]]),
        explanations=[SimpleNamespace(counts=(_ObjWithText("asked for 1 cat, found 1"),), colors=(),
                                      relations=("cat left of dog: score 0.25",))],
    )
    items = report_items(["a cat left of a dog"], result, after=torch.stack([_image()]),
                         lam=torch.rand(1, 8, 8), rewards_before=result)
    assert items[0].scores["count"] == 1.0 and math.isnan(items[0].scores["color"])
    text = render_html_report(items)
    assert "asked for 1 cat, found 1" in text and "cat left of dog: score 0.25" in text
    assert "absent" in text and "0.600" in text
    assert 'class="was"' not in text  # the same sentences before and after: said once
    # What the rewards said before correction is shown under what they say after (it was computed and dropped).
    before = SimpleNamespace(**{**vars(result), "explanations": [SimpleNamespace(
        counts=("asked for 1 cat, found 3",), colors=(), relations=("cat left of dog: score 0.25",))]})
    items = report_items(["a cat left of a dog"], result, after=torch.stack([_image()]), rewards_before=before)
    assert items[0].explanations_before["count"] == ("asked for 1 cat, found 3",)
    text = render_html_report(items)
    assert text.index("asked for 1 cat, found 1") < text.index('<div class="was">before: <ul><li>asked for 1 cat, '
                                                               'found 3</li></ul></div>')
    assert text.count('class="was"') == 1  # only the aspect whose sentences changed
    with pytest.raises(ValueError, match="one per prompt"):
        report_items(["a", "b"], after=torch.stack([_image()]))
    # a single prompt string counted its characters as prompts ("after has 1 items, expected 5"); None gave a
    # TypeError from len()
    with pytest.raises(TypeError, match=r"report_items: prompts must be a sequence of prompt strings .*got str "
                                        r"\(one prompt\? pass \[prompt\]\)"):
        report_items("a cat", after=torch.stack([_image()]))
    with pytest.raises(TypeError, match="got NoneType"):
        report_items(None)
    # rewards of another batch: one row per prompt (it used row 0 of a two-row result, or an IndexError)
    with pytest.raises(ValueError, match=r"rewards.scores has 1 rows, expected 2 \(one per prompt\)"):
        report_items(["a", "b"], result)
    with pytest.raises(ValueError, match=r"rewards_before.scores has 1 rows, expected 3"):
        report_items(["a", "b", "c"], rewards_before=result)
    with pytest.raises(TypeError, match="rewards must be a reward result .*got str"):
        report_items(["a", "b"], rewards="x")  # accepted before: the scores were silently empty


def test_html_bad_items(tmp_path):
    with pytest.raises(TypeError, match="sequence of ReportItem"):
        write_html_report(tmp_path / "x.html", "not items")
    with pytest.raises(TypeError, match="item 0"):
        write_html_report(tmp_path / "x.html", [{"prompt": "p", "bogus": 1}])
    with pytest.raises(TypeError, match="ReportItem"):
        write_html_report(tmp_path / "x.html", [42])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        write_html_report(tmp_path / "x.html", [ReportItem("p", after=_image() * 3)])
    # a score that is not a number failed inside the rendering ("could not convert string to float: 'high'")
    bad_items = [([ReportItem("p"), ReportItem("q", scores={"count": "high"})], r"item 1: scores\['count'\] must be a number"),
                 ([ReportItem("p", weights={"color": [1, 2]})], r"item 0: weights\['color'\]"),
                 ([ReportItem("p", scores=[0.5])], "item 0: scores must map aspect names to numbers, got list"),
                 ([ReportItem("p", joint="0.5")], "item 0: joint must be a number or None")]
    for items, words in bad_items:
        with pytest.raises(TypeError, match=words):
            write_html_report(tmp_path / "x.html", items)
    assert not (tmp_path / "x.html").exists()
    page = render_html_report([ReportItem("p", scores={"count": torch.tensor(0.5), "color": None,
                                                        "position": float("nan")}, joint=torch.tensor(0.25))])
    assert "0.500" in page and "0.250" in page
    write_html_report(tmp_path / "empty.html", [])
    assert "No items." in (tmp_path / "empty.html").read_text()


def test_html_report_sections_appear_above_the_cards_with_escaped_headings():
    items = [ReportItem("a red circle", after=torch.rand(3, 16, 16), scores={"count": 1.0})]
    page = render_html_report(items, sections=[("Gains <&>", "<table><tr><td>+5.0</td></tr></table>"),
                                               ("Training", "<p>curves</p>")])
    assert "<h2>Gains &lt;&amp;&gt;</h2><table><tr><td>+5.0</td></tr></table>" in page
    assert page.index("Gains &lt;") < page.index("Training") < page.index("<article")
    assert render_html_report(items).count('<section class="extra">') == 0
    for bad in ("text", [("only a heading",)], [("h", 3)]):
        with pytest.raises(TypeError, match="sections"):
            render_html_report(items, sections=bad)


# --- review 2026-12-06: bad and edge input of the explanation layer -------------------------------------------

def test_numpy_images_are_always_hwc_even_three_rows_tall():
    import numpy as np

    arr = np.zeros((3, 5, 3), np.uint8)  # 3 rows, 5 columns, RGB
    arr[0, 4] = (255, 0, 0)
    png = read_png_bytes(explain.png_bytes(arr))
    assert tuple(png.shape) == (3, 3, 5)
    assert png[:, 0, 4].tolist() == [255, 0, 0]
    assert tuple(read_png_bytes(explain.png_bytes(np.zeros((1, 5, 3), np.uint8))).shape) == (3, 1, 5)
    with pytest.raises(ValueError, match=r"\[H, W, C\].*got shape \(3, 5, 7\)"):
        explain.png_bytes(np.zeros((3, 5, 7), np.uint8))


def read_png_bytes(data: bytes) -> torch.Tensor:
    import io

    from PIL import Image
    import numpy as np

    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


def test_float64_lams_keep_their_scale():
    big = normalize_lam(torch.tensor([[1e300, 5e299]], dtype=torch.float64))
    assert big.dtype == torch.float32 and big.tolist() == [[1.0, 0.5]]
    tiny = normalize_lam(latent_activation_map(torch.full((1, 4, 2, 2), 1e-160, dtype=torch.float64)))
    assert torch.equal(tiny, torch.ones(1, 2, 2))
    up = upsample_lam(torch.tensor([[1e300, 1e300]], dtype=torch.float64), (2, 4))
    assert up.dtype == torch.float64 and bool(torch.isfinite(up).all())


def test_normalize_lam_quantile_on_a_map_over_torch_quantile_limit():
    torch.manual_seed(0)
    big = torch.rand(4100, 4100)
    out = normalize_lam(big, 0.5)
    ref = torch.median(big.reshape(-1)[:: 1]).item()  # the lower median; the interpolated one is within a cell
    assert out.shape == big.shape and abs((big / out.clamp(min=1e-9))[out < 1].max().item() - ref) < 1e-3
    small = torch.rand(3, 50, 50)  # below the limit the two paths agree
    rows = small.reshape(3, -1)
    from xlard.explain.lam import _nan_quantile_rows
    rows[1, :7] = float("nan")
    with_lib = torch.nanquantile(rows, 0.9, dim=1, keepdim=True)
    ordered = rows.nan_to_num(float("inf")).sort(dim=1).values
    valid = (~rows.isnan()).sum(1, keepdim=True)
    pos = 0.9 * (valid - 1)
    lo = pos.floor().long()
    mine = ordered.gather(1, lo) + (ordered.gather(1, (lo + 1).clamp(max=valid - 1)) - ordered.gather(1, lo)) * (pos - lo)
    torch.testing.assert_close(mine, with_lib)
    torch.testing.assert_close(_nan_quantile_rows(rows, 0.9), with_lib)


@pytest.mark.parametrize("item, pattern", [
    (dict(prompt=None), r"item 0: prompt must be a str"),
    (dict(prompt=3), r"item 0: prompt must be a str"),
    (dict(prompt="a", label=7), r"item 0: label must be a str"),
    (dict(prompt="a", scores={1: 0.5}), r"item 0: scores keys must be aspect names"),
    (dict(prompt="a", explanations=5), r"item 0: explanations must be"),
    (dict(prompt="a", lam=torch.zeros(0, 0)), r"item 0: lam has an empty grid"),
    (dict(prompt="a", lam=torch.zeros(0, 3)), r"item 0: lam has an empty grid"),
    (dict(prompt="a", lam=torch.full((3, 3), float("nan"))), r"item 0: lam has no finite value"),
    (dict(prompt="a", lam=torch.zeros(3, 3, dtype=torch.long)), r"item 0: lam must be a floating-point"),
])
def test_html_report_names_the_malformed_item(item, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        render_html_report([item])


def test_html_report_names_the_item_with_a_bad_image():
    good = ReportItem("a")
    with pytest.raises(ValueError, match=r"render_html_report: item 1: .*must be in \[0, 1\]"):
        render_html_report([good, ReportItem("b", before=torch.rand(3, 4, 4) * 5)])
    with pytest.raises(ValueError, match=r"render_html_report: item 1: .*non-negative"):
        render_html_report([good, ReportItem("b", lam=-torch.rand(2, 2) - 0.1)])
    # explanations None: nothing to show, not a crash
    assert "No items" not in render_html_report([ReportItem("a", explanations=None)])


def test_html_report_replaces_unencodable_characters(tmp_path):
    path = tmp_path / "r.html"
    write_html_report(path, [ReportItem("a\ud800b")])
    assert "a?b" in path.read_text(encoding="utf-8")


def test_report_items_checks_shapes():
    ns = SimpleNamespace
    with pytest.raises(ValueError, match=r"rewards.scores must be a tensor of shape \[2, 3\]"):
        report_items(["a", "b"], ns(scores=torch.rand(2)))
    with pytest.raises(ValueError, match=r"rewards.weights must be a tensor of shape \[2, 3\]"):
        report_items(["a", "b"], ns(weights=torch.rand(2, 2)))
    with pytest.raises(ValueError, match=r"rewards.joint must be a tensor of shape \[2\]"):
        report_items(["a", "b"], ns(joint=torch.rand(2, 2)))
    with pytest.raises(ValueError, match=r"rewards.scores must be a tensor"):
        report_items(["a", "b"], ns(scores=[[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"lam must be a Tensor\[B, h, w\], got a tensor of shape \(2, 2\)"):
        report_items(["a", "b"], lam=torch.rand(2, 2))
    with pytest.raises(TypeError, match=r"before must be"):
        report_items(["a", "b"], before=5)
    with pytest.raises(TypeError, match=r"labels must be"):
        report_items(["a", "b"], labels="xy")
    items = report_items(["a", "b"], ns(scores=torch.rand(2, 3), joint=torch.rand(2)), lam=torch.rand(2, 2, 2),
                         labels=["s0", "s1"])
    assert [it.label for it in items] == ["s0", "s1"] and items[1].lam.shape == (2, 2)


def test_faithfulness_checks_min_gain_and_generator():
    z0, delta = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    reward = lambda z: z.mean(dim=(1, 2, 3))  # noqa: E731
    for bad in ("x", float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="min_gain must be a finite number >= 0"):
            faithfulness(reward, z0, delta, min_gain=bad)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        faithfulness(reward, z0, delta, generator=3)


def test_top_lam_mask_refuses_nan_and_selects_a_cell_for_any_positive_fraction():
    with pytest.raises(ValueError, match="lam must be finite"):
        top_lam_mask(torch.tensor([[[float("nan"), 1.0, 2.0, 3.0, 4.0]]]), 0.2)
    assert int(top_lam_mask(torch.rand(1, 5, 5), 1e-12).sum()) == 1
    assert int(top_lam_mask(torch.rand(1, 5, 5), 0.2).sum()) == 5
    assert int(top_lam_mask(torch.rand(1, 5, 5), 0.0).sum()) == 0


def test_faithfulness_summary_figures_come_from_the_means():
    """The per-item ratios' means contradicted the means on the same line ("-50%" for 0.55 -> 0.50)."""
    calls = iter([torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.1]), torch.tensor([1.0, 0.0]),
                  torch.tensor([1.0, 0.1])])
    res = faithfulness(lambda z: next(calls), torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), fraction=0.25)
    line = res.summary()
    assert "reward 0.5500 -> 0.5000 (-9.1%)" in line and "gain +0.5500, 9% of it lost" in line
    assert "(random cells: 0%)" in line


def test_report_captions_give_sizes_as_width_by_height_and_no_negative_zero():
    """The LAM caption printed h x w beside the images' w x h; an unchanged score read "-0.000"."""
    from xlard.explain import ReportItem, render_html_report

    html = render_html_report([ReportItem("p", after=torch.rand(3, 64, 96), lam=torch.rand(16, 24),
                                          scores={"count": 0.5}, scores_before={"count": 0.5 + 1e-7})])
    assert "24&times;16 latent" in html and "96&times;64" in html
    assert "-0.000" not in html and "&plusmn;0.000" in html


def test_upsample_lam_refuses_non_finite_cells_and_bool_sizes():
    """A NaN cell came out as a NaN patch of image pixels (bilinear weights spread it), without a word;
    (True, 10) gave a one-row image."""
    for bad in (float("nan"), float("inf")):
        lam = torch.rand(2, 4, 4)
        lam[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"upsample_lam: lam has 1 NaN or infinite cell\(s\) of 32"):
            upsample_lam(lam, (16, 16))
        # the documented route for a raw map: normalize_lam turns such cells into 0
        assert bool(torch.isfinite(upsample_lam(normalize_lam(lam), (16, 16))).all())
    with pytest.raises(ValueError, match=r"size must be two positive ints \(H, W\), got \(True, 10\)"):
        upsample_lam(torch.rand(4, 4), (True, 10))


def test_lam_fractions_and_quantiles_refuse_bools():
    with pytest.raises(ValueError, match=r"top_lam_mask: fraction must be a number in \[0, 1\], got True"):
        top_lam_mask(torch.rand(1, 4, 4), True)
    with pytest.raises(ValueError, match=r"normalize_lam: quantile must be a number in \(0, 1\], got True"):
        normalize_lam(torch.rand(4, 4), True)


def test_faithfulness_refuses_nan_latents_and_rewards_and_a_non_bool_control():
    reward, z0, delta, _ = _toy(b=2)
    bad = z0.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"faithfulness: z0 has 1 NaN or infinite value\(s\)"):
        faithfulness(reward, bad, delta)  # the row's rewards and ratios were NaN, without a word
    with pytest.raises(ValueError, match=r"reward_fn returned NaN for every one of the 2 uncorrected latent"):
        faithfulness(lambda z: torch.full((2,), float("nan")), z0, delta)
    with pytest.raises(ValueError, match=r"reward_fn returned 1 infinite reward\(s\) of 2 for the uncorrected"):
        faithfulness(lambda z: torch.tensor([0.5, float("inf")]), z0, delta)
    # a NaN row is a row without a reward (the CMD's joint reward of a prompt with no aspect): kept, and the
    # summary's means skip it, as before the checks
    res = faithfulness(lambda z: torch.stack([reward(z)[0], torch.tensor(float("nan"))]), z0, delta)
    assert math.isnan(float(res.reward_after[1])) and math.isfinite(float(res.reward_after[0]))
    assert "nan" not in res.summary().lower()
    assert faithfulness(reward, z0, delta, random_control=__import__("numpy").True_).reward_random is not None
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\], got True"):
        faithfulness(reward, z0, delta, fraction=True)  # masked every cell
    with pytest.raises(TypeError, match="random_control must be True or False, got 'no'"):
        faithfulness(reward, z0, delta, random_control="no")  # ran the control


def test_faithfulness_of_a_zero_gain_is_nan_even_with_min_gain_0():
    """With min_gain=0 a gain of exactly 0 was divided by: +-inf (or 0/0) in gain_lost, against the docstring."""
    z0 = torch.zeros(1, 1, 2, 2)
    delta = torch.tensor([[[[2.0, -1.0], [-1.0, 0.0]]]])    # sums to 0: no gain; masking the top cell: -2
    res = faithfulness(lambda z: z.sum((1, 2, 3)), z0, delta, fraction=0.25, random_control=False, min_gain=0.0)
    assert res.gain.tolist() == [0.0] and res.reward_masked.tolist() == [-2.0]
    assert torch.isnan(res.gain_lost).all()


def test_faithfulness_at_alpha_0_is_defined_not_an_error():
    """alpha = 0 (a corrector saved with alpha 0 reaches here from xlard.evaluation.evaluate_pairs, which reads
    only reward_masked and reward_random): nothing is corrected, so every reward is the uncorrected one, the gain
    and relative drop are 0 and the share of the gain lost is NaN (documented), not an error."""
    reward, z0, delta, _ = _toy(b=2)
    for alpha in (0.0, torch.zeros(2)):
        res = faithfulness(reward, z0, delta, alpha=alpha, generator=torch.Generator().manual_seed(0))
        for r in (res.reward_after, res.reward_masked, res.reward_random):
            assert torch.equal(r, res.reward_before)
        assert res.gain.tolist() == [0.0, 0.0] and res.relative_drop.tolist() == [0.0, 0.0]
        assert torch.isnan(res.gain_lost).all() and torch.isnan(res.gain_lost_random).all()
        assert "n/a of it lost" in res.summary()


def test_overlay_refuses_a_transposed_or_diverged_lam():
    """A transposed LAM (4x8 given as 8x4 over a 32x64 image) was stretched over the image, its hot cell drawn at
    the bottom left instead of the top right; one infinite cell was drawn as "no change"."""
    from xlard.explain import ReportItem, overlay, render_html_report

    image = torch.full((3, 32, 64), 0.5)
    lam = torch.zeros(4, 8)
    lam[0, 7] = 1.0
    out = overlay(image, lam)
    assert (out[:, :8, 56:] - image[:, :8, 56:]).abs().sum() > (out[:, 24:, :8] - image[:, 24:, :8]).abs().sum()
    with pytest.raises(ValueError, match=r"overlay: lam 8x4 \(rows x columns\) does not have the image's shape "
                                         r"32x64 up to a scale; a transposed LAM"):
        overlay(image, lam.T.contiguous())
    broken = torch.rand(4, 8) * 0.1
    broken[2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"overlay: lam has 1 NaN or infinite cell\(s\) of 32: a diverged"):
        overlay(image, broken)
    with pytest.raises(ValueError, match=r"item 0: lam has 1 NaN or infinite cell\(s\) of 32"):
        render_html_report([ReportItem("p", after=image, lam=broken)])


# --- from a read-only walk of xlard/explain (2026-12-07) -------------------------------------------------------------

def test_a_sparse_lam_normalized_by_a_quantile_keeps_its_active_cells():
    """With fewer active cells than 1 - quantile the quantile is 0, and the map came out all zero: an overlay at
    quantile 0.99 showed nothing of 32 active cells of 4096."""
    lam = torch.zeros(64, 64)
    lam[10:14, 20:28] = torch.linspace(0.5, 2.0, 32).reshape(4, 8)
    shown = normalize_lam(lam, quantile=0.99)
    assert shown.max().item() == pytest.approx(1.0) and int((shown > 0).sum()) == 32
    torch.testing.assert_close(shown, normalize_lam(lam))
    assert normalize_lam(torch.zeros(8, 8), quantile=0.5).eq(0).all()  # nothing active stays nothing


def test_a_lam_shown_on_fewer_pixels_than_cells_keeps_every_active_cell():
    """Bilinear sampling onto a 16 x 16 thumbnail read every third cell of a 48 x 48 map: hot cells between the
    sampled ones vanished (the overlay equalled the image)."""
    for cell in ((0, 0), (30, 30), (1, 1), (47, 47)):
        lam = torch.zeros(48, 48)
        lam[cell] = 1.0
        small = upsample_lam(lam, (16, 16))
        assert small.max().item() == 1.0 and small[cell[0] // 3, cell[1] // 3].item() == 1.0
    big = torch.rand(4, 4)
    torch.testing.assert_close(upsample_lam(big, (4, 4)), big)  # same size: unchanged
    torch.testing.assert_close(upsample_lam(big, (8, 8)),
                               F.interpolate(big[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0])


def test_faithfulness_summary_says_n_a_for_a_gain_of_rounding():
    """Gains of +0.4 and -0.4 have a float32 mean of -3e-8: "-335544300% of it lost" was printed."""
    calls = iter([torch.tensor([0.1, 0.7]), torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.1]),
                  torch.tensor([0.4, 0.1])])  # gains 0.40000001 and -0.39999998: a mean of 1.5e-8
    res = faithfulness(lambda z: next(calls), torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), fraction=0.25)
    assert 0 < abs(res.gain.double().mean().item()) < 1e-6
    line = res.summary()
    assert "n/a of it lost" in line and "%" not in line.split("gain")[1].split("lost")[0], line


def test_report_caption_and_title_are_true_to_float64_maps_and_nul_free():
    """The LAM caption took the maximum in float32 ("all zero" for a float64 cell of 1e-50, "max inf" for 1e300);
    a NUL in the title or a section heading went into the page raw."""
    from xlard.explain import ReportItem, render_html_report

    for value, text in ((1e-50, "max 1e-50"), (1e300, "max 1e+300")):
        lam = torch.zeros(4, 4, dtype=torch.float64)
        lam[1, 2] = value
        page = render_html_report([ReportItem("p", after=torch.rand(3, 16, 16), lam=lam)])
        assert text in page and "all zero" not in page
    page = render_html_report([ReportItem("p", after=torch.rand(3, 16, 16))], title="a\x00b",
                              sections=[("head\x00ing", "<p>x</p>")])
    assert "\x00" not in page and "a\ufffdb" in page and "head\ufffding" in page


def test_report_pages_hold_no_control_characters_and_say_what_their_means_cover():
    """Only NUL was replaced: other control characters (\\x01, vertical tab, DEL, C1) went into the page raw, which
    HTML calls parse errors; a long word in an explanation widened its table past the card; the header's
    "prompts 12, mean joint ..." read as a whole run's numbers beside the demo's 996 images."""
    import re

    from xlard.explain import ReportItem, render_html_report

    odd = "a\x01b\x0bc\x7fd\x85e\tf\x0cg"  # (tab and form feed are whitespace to HTML: kept)
    item = ReportItem("cat" + odd, label="seed" + odd, scores={"count": 0.5},
                      explanations={"count": ["found " + "x" * 300 + odd]}, after=torch.rand(3, 16, 16))
    page = render_html_report([item], title="t" + odd, sections=[("h" + odd, "<p>x</p>")])
    assert not re.search("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", page)
    # prompt, label, explanation, title twice, section heading
    assert page.count("a\ufffdb\ufffdc\ufffdd\ufffde\tf\x0cg") == 6 and "ha\ufffdb" in page
    assert "td.why { overflow-wrap:anywhere; }" in page
    assert ">cards<" in page and ">prompts<" not in page and "Means over the cards below" in page


def test_top_lam_mask_refuses_a_negative_lam_as_normalize_lam_does():
    """A signed map was ranked (its most negative cells last) where normalize_lam refused it as no LAM."""
    signed = torch.tensor([[[0.5, -2.0], [1.0, 3.0]]])
    for call in (lambda: normalize_lam(signed), lambda: top_lam_mask(signed, 0.5)):
        with pytest.raises(ValueError, match=r"lam must be non-negative \(sum_c \|delta\|\), got min -2; pass a "
                                             r"magnitude such as x.abs\(\)"):
            call()
    assert top_lam_mask(signed.abs(), 0.5).tolist() == [[[False, True], [False, True]]]
    assert top_lam_mask(torch.tensor([[[-0.0, 0.0], [1.0, 0.0]]]), 0.25).tolist() == [[[False, False], [True, False]]]
    assert top_lam_mask(torch.zeros(0, 2, 2), 0.5).shape == (0, 2, 2)
