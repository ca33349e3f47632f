"""xlard.attention: capture of text-to-image attention on tiny random diffusers models.

Every family (UNet + CLIP text model, SD3, FLUX double/single stream, PixArt)
is built from a tiny config. The captured maps are checked against attention
recomputed here by hand from the layer's own q/k projections (a full softmax,
no chunking), for one layer and one step, under each CFG half; the denoiser's
output must be bit-for-bit unchanged by the capture, the original processors
must come back (also after an exception) and the stored bytes must not grow
with the number of steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import assert_close  # noqa: E402

from xlard.attention import AttentionCapture, CaptureConfig, capturable_layers, text_attention_probs  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The tiny models are dominated by per-op overhead; several threads on a
    # shared 2-core machine only add spin-waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------

TEXT_DIM = 16


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm",
    ).eval()


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        caption_channels=TEXT_DIM, cross_attention_dim=16, patch_size=2,
    ).eval()


WORDS = "a an the photo of one two three four red blue green cat dog cube ball left right above below to and".split()


def tiny_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer with CLIP-like specials (offsets work, so xlard.prompts aligns to it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<unk>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_max_length=max_length,
    )


def tiny_sd_pipeline(*, channels: tuple[int, int] = (8, 16), text_length: int = 16):
    """A StableDiffusionPipeline of tiny random parts (UNet, VAE, CLIP text model, word tokenizer, DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(text_length)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=text_length, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------
# Families: inputs with batched CFG, and attention recomputed by hand
# ---------------------------------------------------------------------------


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, inner = x.shape
    return x.view(b, s, heads, inner // heads).transpose(1, 2)


def _softmax(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1)


def _hand_cross(attn, args, kwargs, text_len, key_mask=None):
    """[B, H, N, L] probabilities of a cross-attention layer (UNet, PixArt)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs["encoder_hidden_states"]
    q = _heads_first(attn.to_q(hidden), attn.heads)
    k = _heads_first(attn.to_k(context), attn.heads)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=torch.float64).masked_fill(~key_mask.bool(), -torch.inf)[:, None, None]
    return _softmax(q, k, bias)


def _hand_sd3(attn, args, kwargs, text_len, key_mask=None):
    """[B, H, N, L]: image queries over the text keys of SD3's [image ; text] joint softmax."""
    hidden, context = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    n = hidden.shape[1]
    q = attn.norm_q(_heads_first(attn.to_q(hidden), attn.heads))
    k = torch.cat([attn.norm_k(_heads_first(attn.to_k(hidden), attn.heads)),
                   attn.norm_added_k(_heads_first(attn.add_k_proj(context), attn.heads))], dim=2)
    return _softmax(q, k)[..., n:]


def _hand_flux(attn, args, kwargs, text_len, key_mask=None):
    """[B, H, N, L]: image queries over the text keys of FLUX's [text ; image] joint softmax."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden = kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states")
    split = (-1, attn.head_dim)
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, split))
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, split))
    if context is not None:
        q = torch.cat([attn.norm_added_q(attn.add_q_proj(context).unflatten(-1, split)), q], dim=1)
        k = torch.cat([attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, split)), k], dim=1)
    rope = kwargs["image_rotary_emb"]
    q = apply_rotary_emb(q, rope, sequence_dim=1).transpose(1, 2)
    k = apply_rotary_emb(k, rope, sequence_dim=1).transpose(1, 2)
    return _softmax(q, k)[:, :, text_len:, :text_len]


@dataclasses.dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, float, int], dict]  # (model, timestep, seed) -> forward kwargs
    layer: str
    grid: tuple[int, int]
    text_len: int
    hand: Callable
    tokens: tuple[int, ...]
    key_mask: torch.Tensor | None = None


BATCH = 2  # prompts; the CFG batch is 2 * BATCH, unconditional half first


def _cfg_text(seed: int, text_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(2 * BATCH, text_len, TEXT_DIM, generator=g)


def _unet_inputs(model, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 16, 12, generator=g)
    return dict(sample=torch.cat([x, x]), timestep=torch.tensor(t), encoder_hidden_states=_cfg_text(seed, 7))


def _sd3_inputs(model, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 12, generator=g)
    pooled = torch.randn(2 * BATCH, 8, generator=g)
    return dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_cfg_text(seed, 9), pooled_projections=pooled,
                timestep=torch.full((2 * BATCH,), t))


def _flux_ids(h: int, w: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return img_ids.reshape(h * w, 3), torch.zeros(text_len, 3)


def _flux_inputs(model, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4 * 6, 8, generator=g)
    img_ids, txt_ids = _flux_ids(4, 6, 5)
    pooled = torch.randn(2 * BATCH, 8, generator=g)
    return dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_cfg_text(seed, 5), pooled_projections=pooled,
                timestep=torch.full((2 * BATCH,), t / 1000), img_ids=img_ids, txt_ids=txt_ids)


PIXART_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]] * BATCH + [[1, 1, 1, 1, 0, 0, 0, 0]] * BATCH)


def _pixart_inputs(model, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 12, generator=g)
    return dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_cfg_text(seed, 8),
                timestep=torch.full((2 * BATCH,), t), encoder_attention_mask=PIXART_MASK,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


FAMILIES = {
    "unet": Family("unet", tiny_unet, _unet_inputs, "mid_block.attentions.0.transformer_blocks.0.attn2",
                   (8, 6), 7, _hand_cross, (1, 3, 6)),
    "sd3": Family("sd3", tiny_sd3, _sd3_inputs, "transformer_blocks.1.attn", (4, 6), 9, _hand_sd3, (0, 4, 8)),
    "flux_double": Family("flux_double", tiny_flux, _flux_inputs, "transformer_blocks.0.attn", (4, 6), 5,
                          _hand_flux, (1, 4)),
    "flux_single": Family("flux_single", tiny_flux, _flux_inputs, "single_transformer_blocks.0.attn", (4, 6), 5,
                          _hand_flux, (0, 2, 3)),
    # Token 5 is padding in the conditional half (mask row 4 onwards), kept in the unconditional half.
    "pixart": Family("pixart", tiny_pixart, _pixart_inputs, "transformer_blocks.0.attn2", (4, 6), 8, _hand_cross,
                     (1, 5), key_mask=PIXART_MASK),
}


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(family: Family) -> torch.nn.Module:
        key = family.build.__name__
        if key not in cache:
            cache[key] = family.build()
        return cache[key]

    return get


def _forward(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out


# ---------------------------------------------------------------------------
# Per-family checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("half", ["cond", "uncond", "all"])
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_maps_match_attention_recomputed_by_hand(models, family_name, half):
    family = FAMILIES[family_name]
    model = models(family)
    layer = dict(model.named_modules())[family.layer]
    seen = []

    def remember_inputs(module, args, kwargs):
        if not seen:
            seen.append((args, dict(kwargs)))

    config = CaptureConfig(tokens=family.tokens, layers=(family.layer,), step_indices=(0,), guidance_half=half,
                           per_layer=True, chunk_elements=37)  # a small budget forces several query chunks
    hook = layer.register_forward_pre_hook(remember_inputs, with_kwargs=True)
    try:
        with AttentionCapture(model, config) as capture:
            _forward(model, family.inputs(model, 900.0, 0))
            _forward(model, family.inputs(model, 500.0, 1))  # step 1: outside the window
    finally:
        hook.remove()
    assert capture.layers == (family.layer,)
    assert capture.recorded_steps == (0,)
    assert capture.num_records == 1

    args, kwargs = seen[0]
    with torch.no_grad():
        probs = family.hand(layer, args, kwargs, family.text_len, family.key_mask)  # [2B, H, N, L]
    rows = {"cond": slice(BATCH, 2 * BATCH), "uncond": slice(0, BATCH), "all": slice(None)}[half]
    want = probs[rows][..., list(family.tokens)].mean(1).transpose(1, 2)  # [B, T, N]
    want = want.reshape(*want.shape[:2], *family.grid).float()

    got = capture.layer_maps()[family.layer]
    assert got.shape == want.shape
    assert_close(got, want, atol=1e-5, rtol=1e-4)
    maps = capture.maps()
    assert maps.shape == (want.shape[0], len(family.tokens), *family.grid)
    assert_close(maps, want, atol=1e-5, rtol=1e-4)
    if family.key_mask is not None and half == "cond":
        assert got[:, 1].abs().max() < 1e-6  # a padding token of the conditional prompts gets no attention


@pytest.mark.parametrize("family_name", ["unet", "sd3", "flux_double", "pixart"])
def test_output_unchanged_and_processors_restored(models, family_name):
    family = FAMILIES[family_name]
    model = models(family)
    before = dict(model.attn_processors)
    hooks_before = len(model._forward_pre_hooks)
    inputs = [family.inputs(model, t, seed) for seed, t in enumerate((900.0, 600.0, 300.0))]
    plain = [_forward(model, x) for x in inputs]
    with AttentionCapture(model, CaptureConfig(tokens=family.tokens)) as capture:
        assert all(type(p).__module__ == "xlard.attention"
                   for name, p in model.attn_processors.items() if name.removesuffix(".processor") in capture.layers)
        captured = [_forward(model, x) for x in inputs]
    for a, b in zip(plain, captured, strict=True):
        assert torch.equal(a, b)
    after = dict(model.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(model._forward_pre_hooks) == hooks_before
    assert capture.recorded_steps == (0, 1, 2)
    kinds = {kind for _, kind in capturable_layers(model)}
    assert len(capture.layers) == len(capturable_layers(model)) and kinds
    assert capture.maps().shape[:2] == (BATCH, len(family.tokens))


@pytest.mark.parametrize("family_name", ["sd3", "flux_double"])
def test_low_precision_model(family_name):
    family = FAMILIES[family_name]
    model = family.build().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "img_ids"
              and k != "txt_ids" else v for k, v in family.inputs(model, 900.0, 0).items()}
    plain = _forward(model, inputs)
    config = CaptureConfig(tokens=family.tokens, accumulate_dtype="bfloat16", per_layer=True)
    with AttentionCapture(model, config) as capture:
        captured = _forward(model, inputs)
    assert torch.equal(plain, captured)
    maps = capture.maps()
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert all(m.dtype == torch.float32 for m in capture.layer_maps().values())
    assert capture.nbytes == sum(m.numel() * 2 for m in capture.layer_maps().values()) + maps.numel() * 2


def test_flux_single_and_double_blocks_are_both_captured(models):
    model = models(FAMILIES["flux_double"])
    assert capturable_layers(model) == [("transformer_blocks.0.attn", "flux_double"),
                                        ("single_transformer_blocks.0.attn", "flux_single")]
    with AttentionCapture(model, CaptureConfig(tokens=(0, 1), per_layer=True)) as capture:
        _forward(model, _flux_inputs(model, 900.0, 0))
    assert set(capture.layer_maps()) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert capture.maps().shape == (BATCH, 2, 4, 6)  # the grid comes from img_ids (4 x 6, not square)


def test_restored_after_an_exception(models):
    model = models(FAMILIES["unet"])
    before = dict(model.attn_processors)
    with pytest.raises(KeyError, match="boom"):
        with AttentionCapture(model, CaptureConfig(tokens=(1,))):
            raise KeyError("boom")
    # An error raised inside the capture itself (token out of range) also restores.
    with pytest.raises(ValueError, match="out of range"):
        with AttentionCapture(model, CaptureConfig(tokens=(99,))):
            _forward(model, _unet_inputs(model, 900.0, 0))
    after = dict(model.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert not model._forward_pre_hooks


def test_unsupported_processor_is_refused_by_name():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_unet()
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    dict(model.named_modules())[name].set_processor(AttnProcessor())
    before = dict(model.attn_processors)
    with pytest.raises(ValueError, match=r"uses AttnProcessor;.*AttnProcessor2_0: install it "
                                         r"\(denoiser.set_attn_processor\(AttnProcessor2_0\(\)\), from "
                                         r"diffusers.models.attention_processor"):
        with AttentionCapture(model):
            pass
    assert all(model.attn_processors[k] is before[k] for k in before)  # the layers installed first came back
    # the advice works (set_default_attn_processor(), advised before, installs the refused AttnProcessor again)
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    with AttentionCapture(model, CaptureConfig(tokens=(1,))) as advised:
        _forward(model, _unet_inputs(model, 900.0, 0))
    assert advised.num_records > 0
    with AttentionCapture(model, CaptureConfig(layers=("up_blocks.*",), tokens=(1,))) as capture:
        _forward(model, _unet_inputs(model, 900.0, 0))
    assert capture.layers and all(n.startswith("up_blocks.") for n in capture.layers)


def test_layer_selection(models):
    model = models(FAMILIES["unet"])
    names = [n for n, _ in capturable_layers(model)]
    assert len(names) == 4 and all(n.endswith("attn2") for n in names)
    assert AttentionCapture(model, CaptureConfig(layers=(0, -1))).layers == (names[0], names[-1])
    assert AttentionCapture(model, CaptureConfig(layers=("mid_block.*",))).layers == (names[-1],)
    with pytest.raises(ValueError, match="matches no capturable layer"):
        AttentionCapture(model, CaptureConfig(layers=("down_blocks.7.*",)))
    with pytest.raises(ValueError, match="out of range"):
        AttentionCapture(model, CaptureConfig(layers=(4,)))
    with pytest.raises(ValueError, match="pipeline"):
        AttentionCapture(object())


# ---------------------------------------------------------------------------
# The tiny SD pipeline: end to end
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


def _run(pipe, steps=3, prompt="a photo of two red dogs", **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="latent", **kwargs).images


def test_pipeline_output_unchanged_with_prompt_spec_tokens(sd_pipe):
    from xlard.prompts import parse

    spec = parse("a photo of two red dogs left of a blue cube", sd_pipe.tokenizer)
    tokens = tuple(i for entity in spec.entities for i in entity.token_indices)
    plain = _run(sd_pipe, prompt=spec.prompt)
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=tokens, normalize="sum")) as capture:
        captured = _run(sd_pipe, prompt=spec.prompt)
    assert torch.equal(plain, captured)
    maps = capture.maps()
    assert maps.shape == (1, 2, 32, 32)  # the conditional half only; the largest grid
    assert capture.resolutions == ((16, 16), (32, 32))
    assert_close(maps.sum((-2, -1)), torch.ones(1, 2))
    assert capture.num_records == 3 * 4  # steps x cross-attention layers


def test_pipeline_without_guidance_keeps_the_whole_batch(sd_pipe):
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=(1, 2))) as capture:
        _run(sd_pipe, steps=2, guidance_scale=1.0, num_images_per_prompt=2)
    assert capture.maps().shape == (2, 2, 32, 32)


def test_memory_does_not_grow_with_steps(sd_pipe):
    sizes = {}
    for steps in (2, 6):
        with AttentionCapture(sd_pipe, CaptureConfig(tokens=(4, 5, 6), per_layer=True)) as capture:
            _run(sd_pipe, steps=steps)
        assert capture.recorded_steps == tuple(range(steps))
        sizes[steps] = capture.nbytes
    # one running mean per resolution (32x32, 16x16) and per layer (four), [1, 3, h, w] float32 each
    want = 4 * 3 * (32 * 32 + 16 * 16) + 4 * 3 * (3 * 32 * 32 + 16 * 16)
    assert sizes[2] == sizes[6] == want


def test_running_mean_equals_mean_of_steps(sd_pipe):
    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    per_step = []
    for step in range(3):
        with AttentionCapture(sd_pipe, CaptureConfig(tokens=(5, 6), layers=(layer,), step_indices=(step,))) as c:
            _run(sd_pipe)
        per_step.append(c.maps())
    for dtype, tol in (("float32", {}), ("float16", dict(atol=2e-3, rtol=2e-3))):
        with AttentionCapture(sd_pipe, CaptureConfig(tokens=(5, 6), layers=(layer,), accumulate_dtype=dtype)) as c:
            _run(sd_pipe)
        assert c.nbytes == 2 * 32 * 32 * (4 if dtype == "float32" else 2)
        assert_close(c.maps(), torch.stack(per_step).mean(0), dtype=torch.float32, **tol)


@pytest.mark.parametrize("window, steps_kept", [
    (dict(steps=(0.5, 1.0)), (2, 3)),
    (dict(steps=(0.0, 0.25)), (0,)),
    (dict(step_indices=(-1, 1)), (1, 3)),
    # an index outside the run selects nothing, with or without a negative one beside it (it wrapped modulo n)
    (dict(step_indices=(6, -1)), (3,)),
    (dict(step_indices=(-5,)), ()),
    (dict(step_indices=(6,)), ()),
])
def test_step_window(sd_pipe, window, steps_kept):
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=(1,), **window)) as capture:
        _run(sd_pipe, steps=4)
    assert capture.recorded_steps == steps_kept


def test_fractional_window_needs_the_number_of_steps(models):
    model = models(FAMILIES["unet"])
    with pytest.raises(ValueError, match="number of steps"):
        with AttentionCapture(model, CaptureConfig(steps=(0.5, 1.0))):
            _forward(model, _unet_inputs(model, 900.0, 0))
    with AttentionCapture(model, CaptureConfig(steps=(0.5, 1.0), tokens=(1,)), num_steps=2) as capture:
        for step, t in enumerate((900.0, 400.0)):
            _forward(model, _unet_inputs(model, t, step))
    assert capture.recorded_steps == (1,)


def test_resolution_filter_output_size_and_normalization(sd_pipe):
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=(5, 6), resolutions=(16,), normalize="max")) as capture:
        _run(sd_pipe)
    assert capture.resolutions == ((16, 16),)
    maps = capture.maps()
    assert maps.shape == (1, 2, 16, 16)
    assert_close(maps.amax((-2, -1)), torch.ones(1, 2))
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=(5, 6), output_size=(8, 4), per_layer=True)) as capture:
        _run(sd_pipe)
    assert capture.maps().shape == (1, 2, 8, 4)
    # The combined map is the record-weighted mean of every layer's map, each resized to the output grid.
    layers = capture.layer_maps()
    resized = [torch.nn.functional.interpolate(m, size=(8, 4), mode="bilinear", align_corners=False)
               for m in layers.values()]
    assert_close(capture.maps(), torch.stack(resized).mean(0))


def test_repeated_calls_per_step_record_once(models):
    # FLUX "true CFG": the conditional call first, then the negative prompt, same timestep.
    model = models(FAMILIES["flux_double"])
    one = _flux_inputs(model, 900.0, 0)
    single = {k: (v[:BATCH] if isinstance(v, torch.Tensor) and v.shape[0] == 2 * BATCH else v)
              for k, v in one.items()}
    negative = dict(single, encoder_hidden_states=torch.randn(BATCH, 5, TEXT_DIM))
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=False) as first:
        _forward(model, single)
        _forward(model, negative)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=False) as only_cond:
        _forward(model, single)
    assert first.num_records == only_cond.num_records == 2
    assert torch.equal(first.maps(), only_cond.maps())
    with AttentionCapture(model, CaptureConfig(tokens=(1,), repeat_calls="all"), cfg=False) as both:
        _forward(model, single)
        _forward(model, negative)
    assert both.num_records == 4


def test_per_sample_token_rows(models):
    model = models(FAMILIES["sd3"])
    inputs = _sd3_inputs(model, 900.0, 0)
    rows = ((0, 1), (5, 8))
    with AttentionCapture(model, CaptureConfig(tokens=rows)) as per_sample:
        _forward(model, inputs)
    with AttentionCapture(model, CaptureConfig(tokens=(0, 1, 5, 8))) as shared:
        _forward(model, inputs)
    got, all_tokens = per_sample.maps(), shared.maps()
    assert_close(got[0], all_tokens[0, :2])
    assert_close(got[1], all_tokens[1, 2:])
    with pytest.raises(ValueError, match="per-sample rows"):
        with AttentionCapture(model, CaptureConfig(tokens=((0,), (1,), (2,)))):
            _forward(model, inputs)


def test_results_need_a_recording(models):
    model = models(FAMILIES["unet"])
    capture = AttentionCapture(model, CaptureConfig(tokens=(1,)))
    with pytest.raises(RuntimeError, match="no attention map was recorded"):
        capture.maps()
    with pytest.raises(RuntimeError, match="per_layer=True"):
        capture.layer_maps()
    with capture:
        _forward(model, _unet_inputs(model, 900.0, 0))
    assert capture.maps().shape == (BATCH, 1, 16, 12)
    capture.reset()
    assert capture.nbytes == 0 and capture.num_records == 0


# ---------------------------------------------------------------------------
# The probability kernel and the config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 20])
def test_text_attention_probs_matches_a_full_softmax(chunk_elements):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 11, 8, generator=g), torch.randn(3, 4, 11 + 6, 8, generator=g)
    mask = torch.ones(3, 1, 1, 17, dtype=torch.bool)
    mask[1, ..., 15:] = False
    full = _softmax(q, k, torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -torch.inf))
    heads = torch.tensor([0, 2])
    got = text_attention_probs(q, k, torch.tensor([11, 16, 12]), num_queries=11, mask=mask, rows=slice(1, 3),
                               heads=heads, chunk_elements=chunk_elements)
    want = full[1:3][:, [0, 2]][..., [11, 16, 12]].mean(1).transpose(1, 2).float()
    assert_close(got, want)
    assert got[0, 1].abs().max() == 0  # masked key
    per_sample = text_attention_probs(q, k, torch.tensor([[11, 12], [16, 13]]), num_queries=11,
                                      rows=slice(1, 3), chunk_elements=chunk_elements)
    plain = _softmax(q, k)[1:3].mean(1).transpose(1, 2).float()
    assert_close(per_sample[0], plain[0, [11, 12]])
    assert_close(per_sample[1], plain[1, [16, 13]])


@pytest.mark.parametrize("bad, match", [
    (dict(tokens=()), "tokens"),
    (dict(tokens=(1, -2)), "tokens"),
    (dict(tokens=((1, 2), (3,))), "same length"),
    (dict(layers=()), "layers"),
    (dict(layers=(1.5,)), "layers"),
    (dict(resolutions=(0,)), "resolutions"),
    (dict(steps=(0.5, 0.5)), "steps"),
    (dict(steps=(0.2, 0.8), step_indices=(1,)), "either"),
    (dict(heads=(0, 0)), "heads"),
    (dict(guidance_half="negative"), "guidance_half"),
    (dict(normalize="softmax"), "normalize"),
    (dict(output_size=(4,)), "output_size"),
    (dict(resize_mode="lanczos"), "resize_mode"),
    (dict(accumulate_dtype="int8"), "accumulate_dtype"),
    (dict(chunk_elements=0), "chunk_elements"),
    (dict(repeat_calls="last"), "repeat_calls"),
])
def test_config_is_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        CaptureConfig(**bad)


def test_config_normalizes_its_fields():
    config = CaptureConfig(tokens=[3, 4], layers="up_blocks.*", resolutions=[16, (8, 12)], output_size=32,
                           accumulate_dtype=torch.float16, heads=[1])
    assert config.tokens == (3, 4) and config.num_tokens == 2
    assert config.layers == ("up_blocks.*",)
    assert config.resolutions == (16, (8, 12))
    assert config.output_size == (32, 32)
    assert config.accumulate_dtype == "float16" and config.dtype == torch.float16
    assert CaptureConfig(tokens=[[1, 2], [3, 4]]).tokens == ((1, 2), (3, 4))


def test_one_step_pipeline_calls_in_one_block_both_count(sd_pipe):
    """A one-step run repeats the same timestep: the second pipeline call was taken for a repeat within the first
    call's step and dropped (docs: several pipeline calls in one block add to the same running means)."""
    with AttentionCapture(sd_pipe, CaptureConfig(tokens=(1, 2))) as capture:
        _run(sd_pipe, steps=1)
        first = capture.num_records
        _run(sd_pipe, steps=1, prompt="a photo of a cat")
    assert first > 0 and capture.num_records == 2 * first


def test_a_cfg_guess_is_made_once_per_run_and_checked(models):
    """Without cfg= or a pipeline flag, identical latent halves were taken for batched guidance call by call: two
    prompts from the same noise kept one prompt at step 0, then the batch grew and the run crashed with an error
    pointing at reset(). The guess is now made at the run's first call, and a later call that contradicts it is
    named with the fix."""
    model = models(FAMILIES["unet"])
    same = _unet_inputs(model, 900.0, 0)
    later = dict(same, sample=torch.randn(same["sample"].shape, generator=torch.Generator().manual_seed(5)),
                 timestep=torch.tensor(800.0))
    with pytest.raises(ValueError, match=r"two prompts began from the same noise; pass cfg=False"):
        with AttentionCapture(model, CaptureConfig(tokens=(1,))):
            _forward(model, same)
            _forward(model, later)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=False) as capture:
        _forward(model, same)
        _forward(model, later)
    assert capture.maps().shape[0] == 2 * BATCH


def test_a_call_of_another_batch_in_a_guided_run_keeps_its_rows(models):
    """SD3 skip-layer guidance: a second call of the step with the conditional latents alone (B rows, not 2B) was
    split in half like the guided batch, and the maps' shape changed mid-run (a crash with two prompts)."""
    model = models(FAMILIES["unet"])
    guided = _unet_inputs(model, 900.0, 0)
    cond_only = {k: (v[BATCH:] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 * BATCH else v)
                 for k, v in guided.items()}
    with AttentionCapture(model, CaptureConfig(tokens=(1,), repeat_calls="all"), cfg=True) as both:
        _forward(model, guided)
        _forward(model, cond_only)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True) as guided_only:
        _forward(model, guided)
    assert both.maps().shape == guided_only.maps().shape and both.maps().shape[0] == BATCH
    assert both.num_records == 2 * guided_only.num_records
    # under "uncond" and "all" such a call holds none of the rows kept: left out (it raised, then crashed)
    for half, rows in (("uncond", BATCH), ("all", 2 * BATCH)):
        with AttentionCapture(model, CaptureConfig(tokens=(1,), repeat_calls="all", guidance_half=half),
                              cfg=True) as skipped:
            _forward(model, guided)
            _forward(model, cond_only)
        assert skipped.maps().shape[0] == rows and skipped.num_records == guided_only.num_records


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' KDPM2 and NumPy 2: 4000 lines of them
def test_a_scheduler_whose_steps_cannot_be_counted_is_named_for_a_window(sd_pipe):
    """KDPM2 evaluates between its timesteps: every evaluation looked like a new step, and a window or an index
    silently selected other evaluations."""
    from diffusers import KDPM2DiscreteScheduler

    original = sd_pipe.scheduler
    sd_pipe.scheduler = KDPM2DiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match=r"counted step 4 in a run of 4 steps \(KDPM2DiscreteScheduler"):
            with AttentionCapture(sd_pipe, CaptureConfig(tokens=(1,), steps=(0.5, 1.0))):
                _run(sd_pipe, steps=4)
        with AttentionCapture(sd_pipe, CaptureConfig(tokens=(1,))) as every:  # every step: nothing to count
            _run(sd_pipe, steps=4)
        assert every.num_records > 0
    finally:
        sd_pipe.scheduler = original


@pytest.mark.parametrize("dtype, records", [(torch.bfloat16, 1600), (torch.float16, 1600)])
def test_a_low_precision_running_mean_keeps_moving(dtype, records):
    """A float16/bfloat16 mean stopped moving once (value - mean) / count fell below half its last place: values
    rising from 0.02 to 0.2 gave a bfloat16 mean of 0.031 over 1600 records, the truth 0.110."""
    from xlard.attention import _RunningMean

    values = torch.linspace(0.02, 0.2, records)
    slot = _RunningMean(torch.zeros(2, 3, dtype=dtype))
    for v in values:
        slot.add(torch.full((2, 3), float(v)))
    assert slot.count == records
    assert_close(slot.mean.float(), torch.full((2, 3), float(values.mean())), rtol=0.02, atol=0.0)


def test_calls_under_inference_mode_and_outside_it_share_one_capture(models):
    """The running means created under torch.inference_mode() were inference tensors, and the next call made
    outside it crashed mid-pipeline ("Inplace update to inference tensor outside InferenceMode")."""
    model = models(FAMILIES["unet"])
    first, second = _unet_inputs(model, 900.0, 0), _unet_inputs(model, 800.0, 1)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True) as mixed:
        with torch.inference_mode():
            _forward(model, first)
        _forward(model, second)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True) as plain:
        _forward(model, first)
        _forward(model, second)
    assert torch.equal(mixed.maps(), plain.maps())


def test_a_one_step_readout_in_a_second_block_is_recorded(models):
    """A capture entered again: the new block's call at the timestep the last block ended on was taken for a
    repeat within that step and dropped, and maps() returned the first block's maps."""
    model = models(FAMILIES["unet"])
    first, second = _unet_inputs(model, 900.0, 0), _unet_inputs(model, 900.0, 1)
    capture = AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True, num_steps=1)
    with capture:
        _forward(model, first)
    once = capture.num_records
    with capture:
        _forward(model, second)
    assert once > 0 and capture.num_records == 2 * once
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True, num_steps=1) as alone:
        _forward(model, second)
    with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True, num_steps=1) as alone_first:
        _forward(model, first)
    assert_close(capture.maps(), (alone.maps() + alone_first.maps()) / 2)
    # one block per step (lower timesteps) still continues the run: a step window sees steps 0 and 1
    stepwise = AttentionCapture(model, CaptureConfig(tokens=(1,), step_indices=(1,)), cfg=True, num_steps=2)
    with stepwise:
        _forward(model, first)
    with stepwise:
        _forward(model, _unet_inputs(model, 400.0, 1))
    assert stepwise.recorded_steps == (1,)


def test_one_block_per_denoiser_call_counts_steps_as_one_block_does(models):
    """A loop with one block per call and repeated timesteps (Heun's second evaluation, true CFG's second call):
    the first version of the one-step rule above started a new run at every repeat (28 records for 8, steps
    numbered 0, 1, 0, 1, ...)."""
    model = models(FAMILIES["unet"])
    calls = [_unet_inputs(model, t, seed) for seed, t in enumerate((900.0, 900.0, 600.0, 600.0, 300.0))]
    config = CaptureConfig(tokens=(1,), steps=(0.0, 0.5))
    per_call = AttentionCapture(model, config, cfg=True, num_steps=3)
    for inputs in calls:
        with per_call:
            _forward(model, inputs)
    with AttentionCapture(model, config, cfg=True, num_steps=3) as whole:
        for inputs in calls:
            _forward(model, inputs)
    assert per_call.num_records == whole.num_records > 0 and per_call.recorded_steps == whole.recorded_steps == (0, 1)
    assert torch.equal(per_call.maps(), whole.maps())


def test_guided_capture_of_rows_that_are_not_two_halves_is_refused(models):
    """cfg=True on a 3-row call kept rows 1-2 as the "conditional half", one of them unconditional; rows of another
    layout ([x; y; y], as InstructPix2Pix batches them) were split in two "halves" as well."""
    model = models(FAMILIES["unet"])
    guided = _unet_inputs(model, 900.0, 0)
    odd = {k: (v[:3] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 * BATCH else v)
           for k, v in guided.items()}
    x = guided["sample"]
    other = dict(guided, sample=torch.cat([x[:1], x[1:2], x[1:2], x[1:2]]))
    for inputs, rows in ((odd, 3), (other, 4)):
        with pytest.raises(ValueError, match=rf"cfg=True .* the first denoiser call's {rows} rows are not two equal "
                                             r"halves of latents; pass cfg=False"):
            with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=True):
                _forward(model, inputs)
        with AttentionCapture(model, CaptureConfig(tokens=(1,)), cfg=False) as whole:
            _forward(model, inputs)
        assert whole.maps().shape[0] == rows


def test_a_pipeline_that_batches_other_rows_under_its_guidance_flag_is_refused():
    """InstructPix2Pix batches [cond; uncond; uncond] with do_classifier_free_guidance True: 2 prompts gave 3 maps,
    all of unconditional rows, and 1 prompt was refused as "cfg=True ... pass cfg=False", a flag nobody passed."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    base = tiny_sd_pipeline()
    parts = dict(base.components)
    parts["unet"] = UNet2DConditionModel.from_config(base.unet.config, in_channels=8).eval()
    pipe = StableDiffusionInstructPix2PixPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    call = dict(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    for prompts in (["a red cat"], ["a red cat", "a blue dog"]):
        with pytest.raises(ValueError, match=r"StableDiffusionInstructPix2PixPipeline.do_classifier_free_guidance "
                                             r"says this run batches guidance, but .* not two equal halves"):
            with AttentionCapture(pipe, CaptureConfig(tokens=(1,))):
                pipe(prompts, image=image.expand(len(prompts), -1, -1, -1), **call)
    with AttentionCapture(pipe, CaptureConfig(tokens=(1,))) as plain:  # without guidance, as the message says
        pipe(["a red cat", "a blue dog"], image=image.expand(2, -1, -1, -1), guidance_scale=1.0, **call)
    assert plain.maps().shape[0] == 2


def test_an_integer_keep_mask_is_refused():
    """A 0/1 integer keep-mask was added to the logits as a bias of 0 or 1: masked keys kept their probability."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    keep = torch.tensor([[1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"mask must be bool .* got int64: for a 0/1 keep-mask pass mask.bool\(\)"):
        text_attention_probs(q, k, torch.tensor([3, 4]), mask=keep)
    probs = text_attention_probs(q, k, torch.tensor([3, 4]), mask=keep.bool())
    assert torch.equal(probs, torch.zeros_like(probs))  # both kept tokens are masked keys


def test_perturbed_attention_guidance_is_refused():
    """A PAG pipeline batches [uncond; cond; perturbed]: the "conditional half" of 6 rows held 3 maps for 2 prompts,
    one prompt's conditional row and the perturbed copies."""
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(**tiny_sd_pipeline().components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    with pytest.raises(ValueError, match=r"StableDiffusionPAGPipeline runs perturbed-attention guidance .*pag_scale=0"):
        with AttentionCapture(pipe, CaptureConfig(tokens=(1,))):
            _run(pipe, steps=1, prompt=["a red cat", "a blue dog"], pag_scale=3.0)
    # diffusers leaves its PAG processors in after an error: they were, and the advised pag_scale=0 call then
    # failed inside diffusers ("not enough values to unpack")
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    with AttentionCapture(pipe, CaptureConfig(tokens=(1,))) as capture:
        _run(pipe, steps=1, prompt=["a red cat", "a blue dog"], pag_scale=0.0)
    assert capture.maps().shape[0] == 2
    # a capture of the denoiser alone sees the PAG processors the pipeline installs (it gave 6 maps for 2 prompts)
    with pytest.raises(ValueError, match=r"the denoiser \(PAG.*\) runs perturbed-attention guidance"):
        with AttentionCapture(pipe.unet, CaptureConfig(tokens=(1,))):
            _run(pipe, steps=1, prompt=["a red cat", "a blue dog"], pag_scale=3.0)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
