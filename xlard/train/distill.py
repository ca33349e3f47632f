"""The corrector's warm start on edit targets (``distill`` in a run config).

On the shapes backbone the rewards' verdicts can be drawn: :mod:`xlard.shapes.editor`
reads a decoded sample with the understanding model (the reward source's eyes),
redraws it the way the prompt asks (clean shapes, the asked count, the asked
colors, relations that hold) and turns the edit into a latent correction
``M * (E(edited) - E(decoded))``. This module builds a dataset of such targets
on *training-split* items (seeds the training, the monitor and the calibration
never draw) and regresses the corrector's mean ``Delta(z0, e_p)`` onto them.
PPO can then continue from the distilled corrector; at inference the corrector
is one forward pass, as before.

With ``distill.move`` the relation fixes are *moves* instead of drawings: the
editor's relation rule is carried out on z0 by copying the objects' own latent
cells (:func:`xlard.shapes.editor.move_plan`); each shard then records the
relation's two objects' cells (``move_labels``), their shifts (``move_shifts``)
and the cell each cell copies (``source``), and a corrector with a move head
(``CorrectorConfig.move``) fits its labels and shifts to them (cross-entropy)
while its residual fits the rest of the targets.

The dataset is written in shards (``<run>/distill/data-NNNN.pt``, atomically), so
an interrupted build resumes at the first missing shard; the fit is short and
restarts from scratch on resume (its epochs are logged to
``<run>/distill/metrics.jsonl``). The exact evaluator takes no part.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from xlard import _io
from xlard._args import short_reason
from xlard.train import checkpoint as ckpt
from xlard.train.rollout import derived_generator, encode_items, prompt_inputs

__all__ = ["DISTILL_SEED_BASE", "vae_encoder", "signal_scale", "build_dataset", "load_dataset", "fit_corrector"]

#: Image seeds of the distillation items (the training draws 0.., the monitor 1_000_003.., the calibration 2_000_003..).
DISTILL_SEED_BASE = 3_000_003

_FIELDS = ("z0", "target", "tokens", "mask", "pooled")


def _vae(backbone, method: str, why: str):
    """(the backbone's diffusers VAE, its scaling factor, its shift factor); refused without one."""
    pipe = getattr(getattr(backbone, "family", None), "pipe", None)
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, method):
        raise ValueError(f"distill: the backbone has no VAE {method[:-1]}er ({why})")
    return vae, float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_encoder(backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images [B, 3, H, W] in [0, 1] -> latents`` in the backbone's scaled latent space (diffusers VAEs).

    Raises:
        ValueError: the backbone has no diffusers VAE to encode with.
    """
    vae, scale, shift = _vae(backbone, "encode", "distillation needs a diffusers backbone's VAE")

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
            return ((vae.encode(x).latent_dist.mode() - shift) * scale).float()

    return encode


def vae_decoder(backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images [B, 3, H, W] in [0, 1]``, differentiable (the decoder's weights stay frozen).

    The inverse of :func:`vae_encoder`: what ``correction_step`` 1.0 decodes a corrected
    latent with, so a loss on its output sees the image the evaluator will see.

    Raises:
        ValueError: the backbone has no diffusers VAE to decode with.
    """
    vae, scale, shift = _vae(backbone, "decode", "decoder_epochs need a diffusers backbone's VAE")
    vae.requires_grad_(False)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        x = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / scale + shift, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    return decode


def signal_scale(state) -> float:
    """How much of a change of the *final* latent shows in the latent at the state's correction step.

    At ``correction_step`` 1.0 the corrected latent is the final one: 1.0. Earlier,
    the latent is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (variance-preserving
    schedulers, the shapes backbone's DPM-Solver among them), so moving the image's
    latent by ``d`` moves ``x_t`` by ``sqrt(abar_t) d``, and the remaining denoising
    carries it through.

    Raises:
        ValueError: the backbone's scheduler has no ``alphas_cumprod`` (flow-matching
            schedulers); distil at ``correction_step`` 1.0 there.
    """
    if state.remaining_steps <= 0:
        return 1.0
    resume = getattr(state, "resume", None) or {}
    scheduler, timesteps = resume.get("scheduler"), resume.get("timesteps")
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None or timesteps is None:
        raise ValueError(f"distill: at correction_step {state.correction_step} the edit targets are scaled by "
                         f"sqrt(alphas_cumprod[t]), which this backbone's scheduler "
                         f"({type(scheduler).__name__}) does not have; use correction_step 1.0")
    t = int(timesteps[state.step_index])
    return float(abar[t]) ** 0.5


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"data-{k:04d}.pt"


def _load_shard(folder: Path, k: int) -> dict[str, Any]:
    """Shard ``k``; a damaged one (empty, cut short, overwritten) is named with the fix: it was a traceback
    (EOFError, "PytorchStreamReader failed", UnpicklingError) from ``--resume``."""
    path = _shard_path(folder, k)
    try:
        shard = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError):  # not the file's content: a permission, the disk, the machine
        raise
    except Exception as exc:  # empty, cut short, overwritten: EOFError, PytorchStreamReader, UnpicklingError
        raise ValueError(f"distill: {path} cannot be read ({_io.describe_load_error(exc)}); the file is damaged: "
                         "delete it and rerun with --resume (its targets are built again)") from None
    if not isinstance(shard, dict) or not {"z0", "target", "prompts"} <= set(shard):
        raise ValueError(f"distill: {path} holds no edit targets ({type(shard).__name__}); delete it and rerun with "
                         "--resume (its targets are built again)")
    return shard


def build_dataset(backbone, model, items: Sequence, folder: str | Path, *, chunk: int = 32, edit_config=None,
                  progress: bool = True, replace: bool = False, move_margin: int | None = None,
                  cells: bool = False) -> Path:
    """Encode ``items``, decode their z0, edit the images, write the latent targets in shards.

    Args:
        backbone: the shapes backbone. At ``correction_step`` 1.0 z0 is the final latent and the
            target is the edit itself; earlier, it is scaled by :func:`signal_scale`.
        model: the understanding model the editor reads the images with.
        items: :class:`xlard.train.data.Item` s (training split).
        folder: where the shards go (existing complete shards are kept: resume).
        chunk: items per shard (one backbone call each).
        edit_config: :class:`xlard.shapes.editor.EditConfig` (default: all fixes on).
        replace: targets set the touched latent cells to the edited image's encoding,
            ``M * (E(edited) - z0)``, instead of adding the difference of the two encodings
            (``xlard.shapes.editor.edit_targets``); only at ``correction_step`` 1.0, where z0
            is what the VAE decodes.
        move_margin: also write move targets for a corrector with a move head
            (``CorrectorConfig.move``): the editor's relation rule with this margin,
            carried out by moving latent cells (:func:`xlard.shapes.editor.move_plan`);
            each shard gets the relation's two objects' cells and shifts (``move_labels``,
            ``move_shifts``), ``source`` (the cell each cell copies), the noun under
            each cell (``move_nouns``), and a zero residual target on every cell a move
            touched (the copy is the head's part).
            Only at ``correction_step`` 1.0. Shards built without it are given their
            move targets in place (their color/count edits are kept), so a finished
            target set can be reused.
        cells: also write the understanding model's reading of each decoded z0 per latent
            cell, the targets of a corrector's reader (:func:`fit_reader`): ``cell_nouns``
            (mean shape-core probability over the cell's pixels, ``[N, S, h, w]``) and
            ``cell_colors`` (mean color distribution, ``[N, 1 + C, h, w]``), float16. Shards
            built without them get them in place.

    Returns:
        ``folder``.
    """
    from xlard.shapes.editor import edit_images, edit_targets

    folder = Path(folder)
    items = list(items)
    if not items:  # it returned a folder of no shards, which load_dataset then failed on ("max() arg is empty")
        raise ValueError("distill: no items to build edit targets for")
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:  # 0: a ZeroDivisionError
        raise ValueError(f"distill: chunk (items per shard) must be an int >= 1, got {chunk!r}")
    chunk = int(chunk)
    if move_margin is not None and (float(backbone.correction_step) != 1.0 or isinstance(move_margin, bool)
                                    or not isinstance(move_margin, int) or move_margin < 1):
        raise ValueError(f"distill: move targets need correction_step 1.0 and an int move_margin >= 1, got "
                         f"correction_step {backbone.correction_step} and move_margin {move_margin!r}")
    if replace and float(backbone.correction_step) != 1.0:
        raise ValueError(f"distill: replace targets need correction_step 1.0 (z0 must be the latent the VAE decodes), "
                         f"got {backbone.correction_step}")
    encode = vae_encoder(backbone)  # a backbone without a VAE is refused before the folder is touched
    folder.mkdir(parents=True, exist_ok=True)
    # Shards are reused on resume only if they were built for the same items and edits.
    from xlard.shapes.editor import EditConfig

    manifest = {"items": [[it.record.get("prompt"), int(it.seed)] for it in items], "chunk": int(chunk),
                "edits": vars(edit_config or EditConfig()), "correction_step": float(backbone.correction_step)}
    if replace:  # absent means the difference form (manifests written before the option existed)
        manifest["replace"] = True
    manifest_path = folder / "manifest.json"
    if move_margin is not None:
        manifest["move_margin"] = int(move_margin)
    if manifest_path.is_file():
        try:
            saved = json.loads(manifest_path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:  # it was "Expecting value: line 2 column 1", no file named
            raise ValueError(f"distill: {manifest_path} is damaged ({short_reason(exc, 120)}); delete "
                             f"{folder} (its edit targets are built again) or choose another run folder") from None
        saved.setdefault("correction_step", 1.0)  # manifests written before the field existed were all at 1.0
        for key, default in (("relayout", False), ("relayout_color", "found")):  # ... and before relayout existed
            if isinstance(saved.get("edits"), dict):
                saved["edits"].setdefault(key, default)
        upgrade = move_margin is not None and "move_margin" not in saved  # move targets are added to the shards
        if upgrade:
            saved["move_margin"] = int(move_margin)
        if saved != json.loads(_io.dumps(manifest)):
            raise ValueError(f"distill: {folder} holds edit targets built for other items or edits"
                             f"{' or move targets' if 'move_margin' in saved or move_margin is not None else ''}; "
                             "delete it or choose another run folder")
        if upgrade:  # written once the rest matched: a refused call wrote it and the folder was refused for good
            _io.atomic_write_text(manifest_path, _io.dumps(saved) + "\n", owner="xlard train distill")
    else:
        if any(folder.glob("data-*.pt")):
            raise ValueError(f"distill: {folder} holds edit-target shards without a manifest; delete them")
        _io.atomic_write_text(manifest_path, _io.dumps(manifest) + "\n", owner="xlard train distill")
    n_shards = math.ceil(len(items) / chunk)
    if cells and float(backbone.correction_step) != 1.0:
        # Reader (cell) targets are not added to finished shards before the final step: the VAE decoding of an
        # intermediate z0 is not the image the backbone makes of it (shards built here decode the backbone's way).
        # Checked before any shard is built, so no folder is left half upgraded.
        without = [k for k in range(n_shards)
                   if _shard_path(folder, k).is_file() and "cell_nouns" not in _load_shard(folder, k)]
        if without:
            raise ValueError(f"distill: reader (cell) targets can be added to edit-target shards built without them "
                             f"only at correction_step 1.0, got {backbone.correction_step}; {folder} holds "
                             f"{len(without)} such shard(s): delete that folder (its targets are built again, with "
                             f"the reader's) or choose another run folder")
    todo = [k for k in range(n_shards) if not _shard_path(folder, k).is_file()]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(items), initial=(n_shards - len(todo)) * chunk, desc="distill: edit targets",
                   unit="item", file=sys.stderr)
    try:  # the bar is closed on Ctrl-C too: the interrupt line is then the last line
        for k in todo:
            t_shard = time.perf_counter()
            part = list(items[k * chunk:(k + 1) * chunk])
            state = encode_items(backbone, part)
            inputs = prompt_inputs(state, "cpu")
            with torch.no_grad():
                images = backbone.decode(state, state.z0).images.float().cpu()
            size = model.config.image_size
            if tuple(images.shape[-2:]) != (size, size):
                raise ValueError(f"distill: the backbone's images are {tuple(images.shape[-2:])}, the understanding "
                                 f"model reads {size}x{size}")
            edited = edit_images(model, images, state.specs, edit_config)
            scale = signal_scale(state)
            target = scale * edit_targets(encode, images, edited, inputs.z0.shape[1:],
                                          z0=inputs.z0 if replace else None)
            shard = {"z0": inputs.z0.cpu(), "target": target.cpu(), "tokens": inputs.text_tokens.cpu(),
                     "mask": inputs.text_mask.cpu(), "pooled": inputs.pooled.cpu(),
                     "prompts": [it.record.get("prompt") for it in part],
                     "tags": [it.record.get("tag") for it in part],
                     "seeds": [int(it.seed) for it in part], "actions": edited.actions, "signal_scale": scale}
            if move_margin is not None or cells:
                _add_read_targets(shard, model, images, state.specs, move_margin, cells)
            shard["seconds"] = time.perf_counter() - t_shard
            ckpt.save_atomic(shard, _shard_path(folder, k))
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
    if move_margin is not None or cells:
        _upgrade_shards(backbone, model, folder, n_shards, move_margin, progress, cells)
    return folder


def _add_read_targets(shard: dict, model, images: torch.Tensor, specs: Sequence, margin: int | None,
                      cells: bool) -> None:
    """Give one shard, in place, its move targets (``margin`` not None) and its reader's cell targets
    (``cells``), from one reading of its decoded images by the understanding model (see :func:`build_dataset`)."""
    with torch.no_grad():
        maps = model.predict(images.float())
    factor = maps.shape_probs.shape[-1] // shard["z0"].shape[-1]
    cell_nouns = F.avg_pool2d(maps.shape_probs.float().cpu(), factor)  # mean probability over each cell's pixels
    if margin is not None:
        _add_move_targets(shard, maps, cell_nouns, specs, model.config.shapes, margin)
    if cells:
        shard["cell_nouns"] = cell_nouns.half()
        shard["cell_colors"] = F.avg_pool2d(maps.color_probs.float().cpu(), factor).half()


def _add_move_targets(shard: dict, maps, cell_nouns: torch.Tensor, specs: Sequence, shapes: Sequence[str],
                      margin: int) -> None:
    """Give one shard its move targets in place (see ``move_margin`` of :func:`build_dataset`)."""
    from xlard.shapes.editor import move_plan

    z0 = shard["z0"].float()
    plan = move_plan(z0, maps.shape_probs.cpu(), maps.color_probs.cpu(), specs, shapes, margin)
    # Every cell a move touched is a copy (plan.latents == copy_cells(z0, sources)): the residual's part there is 0.
    moved = plan.sources != torch.arange(z0.shape[-2] * z0.shape[-1])
    shard["target"] = shard["target"].masked_fill(moved.view(z0.shape[0], 1, *z0.shape[-2:]), 0.0)
    shard["source"] = plan.sources
    shard["move_labels"], shard["move_shifts"] = plan.labels, plan.shifts
    # The noun under each latent cell (0: none; 1 + index in shapes): the mean shape probability over
    # the cell's pixels, where it is above 0.3 (for CorrectorConfig.move_nouns).
    best, noun = cell_nouns.max(1)
    shard["move_nouns"] = torch.where(best > 0.3, noun + 1, torch.zeros_like(noun)).flatten(1)
    shard["actions"] = [[x for x in a if not x.endswith(" in the latent")] + list(m)  # again: no repeats
                        for a, m in zip(shard["actions"], plan.actions)]
    shard["move_margin"] = int(margin)


def _upgrade_shards(backbone, model, folder: Path, n_shards: int, margin: int | None, progress: bool,
                    cells: bool = False) -> None:
    """Add move targets (``margin`` not None) and cell targets (``cells``) to shards built without them
    (decoding their z0 again; at correction_step 1.0 the VAE decoder is what made the images)."""
    from xlard.prompts import parse

    def missing(shard: dict) -> tuple[bool, bool]:
        return margin is not None and "move_nouns" not in shard, cells and "cell_nouns" not in shard

    todo = [k for k in range(n_shards)
            if any(missing(_load_shard(folder, k)))]
    if not todo:
        return
    decode = vae_decoder(backbone)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="distill: move/reader targets", unit="shard", file=sys.stderr)
    try:  # the bar is closed on Ctrl-C too: the interrupt line is then the last line
        for k in todo:
            t_shard = time.perf_counter()
            shard = _load_shard(folder, k)
            with torch.no_grad():
                images = decode(shard["z0"].float()).float().cpu()
            need_move, need_cells = missing(shard)
            _add_read_targets(shard, model, images, [parse(p) for p in shard["prompts"]] if need_move else (),
                              margin if need_move else None, need_cells)
            shard["seconds"] = float(shard.get("seconds", 0.0)) + time.perf_counter() - t_shard
            ckpt.save_atomic(shard, _shard_path(folder, k))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def load_dataset(folder: str | Path, n_items: int, chunk: int) -> dict[str, Any]:
    """The shards of :func:`build_dataset` as one batch (token dimensions padded to the longest).

    ``build_seconds`` is the time the shards took to build, summed over them
    (across interrupted and resumed builds; ``None`` when a shard predates the record).
    ``n_items`` and ``chunk`` are the build's own (its ``manifest.json``): the whole set is loaded.

    Raises:
        ValueError: ``n_items`` or ``chunk`` below 1 or not the build's, or shards of other row counts.
    """
    folder = Path(folder)
    for name, value in (("n_items", n_items), ("chunk", chunk)):  # 0 was "max() arg is empty" / ZeroDivisionError
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"distill.load_dataset: {name} must be an int >= 1, got {value!r}")
    n_items, chunk = int(n_items), int(chunk)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():  # another n_items or chunk read other shards' rows (4 rows for 5 items)
        try:
            built = json.loads(manifest_path.read_text())
            made = (len(built["items"]), int(built["chunk"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            made = None  # build_dataset names a damaged manifest
        if made is not None and made != (n_items, chunk):
            raise ValueError(f"distill.load_dataset: {folder} holds {made[0]} items in shards of {made[1]}, asked "
                             f"for {n_items} in shards of {chunk}")
    shards = [_load_shard(folder, k) for k in range(math.ceil(n_items / chunk))]
    t = max(s["tokens"].shape[1] for s in shards)

    def pad(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == t:
            return x
        out = x.new_zeros((x.shape[0], t) + tuple(x.shape[2:]))
        out[:, :x.shape[1]] = x
        return out

    data = {f: torch.cat([pad(s[f]) if f in ("tokens", "mask") else s[f] for s in shards]) for f in _FIELDS}
    for key in ("source", "move_labels", "move_shifts", "move_nouns", "cell_nouns", "cell_colors"):
        if all(key in s for s in shards):
            data[key] = torch.cat([s[key] for s in shards])
    data["tags"] = [tag for s in shards for tag in s["tags"]]
    data["actions"] = [a for s in shards for a in s["actions"]]
    data["prompts"] = [p for s in shards for p in s.get("prompts", [None] * len(s["tags"]))]
    data["build_seconds"] = (sum(float(s["seconds"]) for s in shards) if all("seconds" in s for s in shards)
                             else None)
    if data["z0"].shape[0] != n_items:  # shards of another chunk: rows of other items, or too few
        raise ValueError(f"distill.load_dataset: the shards of {folder} for {n_items} items in shards of {chunk} "
                         f"hold {data['z0'].shape[0]} rows; they were built with another chunk or item count")
    return data


def corrector_data(corrector, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the prompt inputs ``corrector`` reads: unchanged for a ``"text"`` corrector;
    for a ``"fields"`` one, the items' parsed field tokens and a zero pooled embedding
    (:func:`xlard.models.corrector_inputs`; the prompts come from the shards).

    Raises:
        ValueError: a ``"fields"`` corrector and items without their prompts.
    """
    cfg = getattr(corrector, "config", None)
    if getattr(cfg, "conditioning", "text") != "fields":
        return data
    from xlard.models import field_inputs
    from xlard.prompts import parse

    prompts = data.get("prompts")
    if prompts is None or len(prompts) != data["z0"].shape[0] or any(not isinstance(p, str) for p in prompts):
        raise ValueError("distill: a corrector with conditioning 'fields' needs each item's prompt (data['prompts'], "
                         "written into the shards by build_dataset)")
    own = field_inputs(cfg, [parse(p) for p in prompts])
    return {**data, "tokens": own["text_tokens"], "mask": own["text_mask"], "pooled": own["pooled"]}


def _move_check(corrector, data: dict[str, Any]) -> bool:
    """Whether the fit trains a move head; raises when the corrector and the targets disagree about it."""
    has_head = bool(getattr(getattr(corrector, "config", None), "move", False))
    has_source = "source" in data and "move_labels" in data and "move_shifts" in data
    if has_head and not has_source:
        raise ValueError("distill: the corrector has a move head (model.corrector_overrides move: true) but the edit "
                         "targets have no move targets; set distill.move: true")
    if has_source and not has_head:
        raise ValueError("distill: the edit targets carry move targets (distill.move) but the corrector has no move "
                         "head; set move: true in model.corrector_overrides")
    if has_head and corrector.config.move_nouns and "move_nouns" not in data:
        raise ValueError("distill: the corrector has a noun head (move_nouns) but the move targets name no nouns; "
                         "rebuild them with this xlard (distill.move)")
    return has_head


#: Weight of a subject or object cell in the move head's cell-label cross-entropy (a "none" cell weighs 1):
#: few cells belong to a moved object (about one in fifty of the shapes targets).
MOVE_LABEL_WEIGHT = 3.0


def _move_loss(move: tuple, labels: torch.Tensor, shifts: torch.Tensor, move_range: int,
               nouns: torch.Tensor | None = None) -> torch.Tensor:
    """The move head's loss: the cells' label cross-entropy (none / subject / object; the two objects'
    cells weighted by :data:`MOVE_LABEL_WEIGHT`) plus, on items with a move, the shift classes' cross-entropy
    (plus the auxiliary noun head's cross-entropy over every cell, when there is one)."""
    label_scores, shift_scores, noun_scores = move
    weight = torch.tensor([1.0, MOVE_LABEL_WEIGHT, MOVE_LABEL_WEIGHT], device=label_scores.device)
    loss = F.cross_entropy(label_scores.reshape(-1, 3).float(), labels.reshape(-1), weight=weight)
    moving = (labels > 0).any(-1)
    if moving.any():
        target = shifts[moving].clamp(-move_range, move_range) + move_range
        loss = loss + F.cross_entropy(shift_scores[moving].reshape(-1, 2 * move_range + 1).float(),
                                      target.reshape(-1))
    if noun_scores is not None:
        loss = loss + F.cross_entropy(noun_scores.reshape(-1, noun_scores.shape[-1]).float(), nouns.reshape(-1))
    return loss


def _move_term(corrector, move: tuple, data: dict[str, Any], rows, device) -> tuple[torch.Tensor, tuple]:
    """The move head's loss on ``rows`` and its hard choices' counts (:func:`_move_accuracy`)."""
    labels, shifts = data["move_labels"][rows].to(device), data["move_shifts"][rows].to(device)
    nouns = data["move_nouns"][rows].to(device) if move[2] is not None else None
    r = corrector.config.move_range
    return _move_loss(move, labels, shifts, r, nouns), _move_accuracy(move, labels, shifts, r)


def _move_accuracy(move: tuple, labels: torch.Tensor, shifts: torch.Tensor,
                   move_range: int) -> tuple[int, int, int, int, int, int]:
    """(object cells labelled right, object cells, none cells right, none cells, shifts right, shifts) of the
    head's hard choices (a shift is one slot's one axis on an item with a move)."""
    label_scores, shift_scores = move[:2]
    right = label_scores.argmax(-1) == labels
    obj = labels > 0
    moving = obj.any(-1)
    shift_right = (shift_scores.argmax(-1) - move_range == shifts)[moving]
    return (int((right & obj).sum()), int(obj.sum()), int((right & ~obj).sum()), int((~obj).sum()),
            int(shift_right.sum()), int(shift_right.numel()))


def _check_fit(owner: str, data: Any, epochs: Any, batch_size: Any, val_fraction: Any) -> None:
    """The arguments every fit shares, named: epochs 0 was a ZeroDivisionError and -1 returned untrained; a batch
    size of -4 trained on order[0:-4]; a val_fraction of -0.1 held back 90%; a [N, 4, 1, 8] target broadcast
    against [N, 4, 8, 8] latents, and a NaN target left NaN weights."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):  # numpy ints as before
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 <= val_fraction < 1:
        raise ValueError(f"{owner}: val_fraction must be a number in [0, 1), got {val_fraction!r}")
    z0 = data.get("z0") if isinstance(data, Mapping) else None
    if not isinstance(z0, torch.Tensor) or z0.dim() != 4:
        raise ValueError(f"{owner}: data must hold the edit targets' z0 [N, C, H, W] (load_dataset), got "
                         f"{type(z0).__name__ if not isinstance(z0, torch.Tensor) else tuple(z0.shape)}")
    n = z0.shape[0]
    rows = {k: v.shape[0] for k, v in data.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    bad = {k: r for k, r in rows.items() if r != n}
    if bad:
        raise ValueError(f"{owner}: every field of data must hold one row per item ({n}, as z0), got {bad}")
    target = data.get("target")
    if isinstance(target, torch.Tensor) and target.shape != z0.shape:
        raise ValueError(f"{owner}: data's target must have z0's shape {tuple(z0.shape)}, got {tuple(target.shape)}")
    for key in ("z0", "target"):
        value = data.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad_rows = (~torch.isfinite(value.flatten(1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{owner}: data's {key} holds NaN or infinite values in {len(bad_rows)} item(s) (rows "
                             f"{bad_rows[:5]}): damaged edit targets; build them again")


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-back rows, fitted rows): the same seeded split for every stage of the fit."""
    perm = torch.randperm(n, generator=derived_generator(seed, "distill", "split"))
    n_val = int(round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"distill: {n} items leave none to fit after holding back {n_val}")
    return perm[:n_val], perm[n_val:]


def _optimiser(corrector, lr: float, weight_decay: float, total: int):
    """AdamW over the policy mean's parameters, 100-step warmup, cosine to 5% of ``lr`` at ``total`` steps."""
    params = [p for name, p in corrector.named_parameters()
              if name != "log_std" and not name.startswith("value_head") and p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    return params, opt, sched


def fit_corrector(corrector, data: dict[str, Any], *, epochs: int, lr: float, batch_size: int, weight_decay: float,
                  val_fraction: float, seed: int, log_path: str | Path | None = None, progress: bool = True,
                  move_weight: float = 0.1) -> dict[str, float]:
    """Regress the corrector's mean onto the targets (MSE; AdamW, 100-step warmup, cosine to 5%).

    A seeded ``val_fraction`` of the items is held back to report how much of the
    targets the corrector explains on items it did not fit (``val_r2 = 1 - val_mse /
    val_zero_mse``: R^2 against the zero correction, i.e. around 0, not around the
    targets' mean; the edit targets are differences of latents).
    A corrector with a move head (``CorrectorConfig.move``) regresses its residual
    onto the targets and fits the head's cell labels and shifts to the targets'
    (``move_labels``, ``move_shifts``; cross-entropy, weight ``move_weight``);
    ``val_object_cell_acc`` / ``val_none_cell_acc`` / ``val_shift_acc`` are the
    held-back objects' cells, other cells and shifts the head gets right.

    Returns:
        ``{"train_mse", "val_mse", "val_zero_mse", "val_r2", "epochs", "seconds"}``
        (and the three accuracies with a move head).
    """
    _check_fit("distill.fit_corrector", data, epochs, batch_size, val_fraction)
    data = corrector_data(corrector, data)
    move = _move_check(corrector, data)
    n = data["z0"].shape[0]
    val, train_rows = _split(n, val_fraction, seed)
    device = corrector.head.weight.device
    per_epoch = max(1, len(train_rows) // batch_size)
    params, opt, sched = _optimiser(corrector, lr, weight_decay, epochs * per_epoch)

    def batch(rows):
        return [data[f][rows].to(device) for f in _FIELDS]

    def losses(rows) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
        z0, target, tokens, mask, pooled = batch(rows)
        # The residual alone: a move head is fitted by its own term, reader_move has nothing to fit.
        residual, move_scores = corrector.distill_outputs(z0, tokens, pooled, mask)
        mse = (residual - target).square().mean()
        return (mse, *_move_term(corrector, move_scores, data, rows, device)) if move else (mse, None, ())

    def step_loss(rows):
        mse, ce, _ = losses(rows)
        return (mse if ce is None else mse + move_weight * ce), mse

    def evaluate(rows) -> tuple[float, float, list[int]]:
        counts = [0] * 6
        if len(rows) == 0:
            return float("nan"), float("nan"), counts
        corrector.eval()
        total_mse = 0.0
        with torch.no_grad():
            for i in range(0, len(rows), 256):
                mse, _, acc = losses(rows[i:i + 256])
                total_mse += float(mse) * len(rows[i:i + 256])
                counts = [a + b for a, b in zip(counts, acc or (0,) * 6)]
            zero = float(data["target"][rows].square().mean())
        return total_mse / len(rows), zero, counts

    t0 = time.perf_counter()

    def end_of_epoch(epoch: int, train_mse: float) -> dict[str, float]:
        val_mse, zero, counts = evaluate(val)
        row = {"epoch": epoch + 1, "train_mse": train_mse, "val_mse": val_mse, "val_zero_mse": zero,
               "val_r2": 1.0 - val_mse / zero if zero > 0 else float("nan"), "seconds": time.perf_counter() - t0}
        if move:
            for name, k in (("val_object_cell_acc", 0), ("val_none_cell_acc", 2), ("val_shift_acc", 4)):
                row[name] = counts[k] / counts[k + 1] if counts[k + 1] else float("nan")
        return row

    row = _epochs(corrector, params, opt, sched, train_rows, epochs=epochs, batch_size=batch_size,
                  order_seed=(seed, "distill"), step_loss=step_loss, end_of_epoch=end_of_epoch,
                  log_path=log_path, append=False, desc="distill: fit", progress=progress,
                  postfix=lambda r: {"train": f"{r['train_mse']:.4f}", "val_r2": f"{r['val_r2']:.3f}"})
    return {**row, "epochs": epochs}


def fit_reader(corrector, data: dict[str, Any], *, epochs: int, lr: float = 2e-3, batch_size: int = 64,
               val_fraction: float = 0.05, seed: int = 0, log_path: str | Path | None = None,
               progress: bool = True) -> dict[str, float]:
    """Fit the corrector's :class:`~xlard.models.LatentReader` (``CorrectorConfig.reader``) on the cell targets.

    The reader learns, from z0 alone, the understanding model's reading of the decoded z0 per
    latent cell (``data["cell_nouns"]``, ``data["cell_colors"]``, :func:`build_dataset` with
    ``cells=True``): binary cross-entropy on the noun probabilities, cross-entropy on the color
    distribution (AdamW, one-cycle schedule to ``lr``). Its normalisation is set from the fitted
    items' z0 first. The same items as the corrector's fit are held back (:func:`_split`). The
    reader stays frozen inside the corrector afterwards.

    Returns:
        ``{"reader_train_loss", "reader_val_loss", "reader_val_noun_acc", "reader_val_color_acc",
        "reader_epochs", "reader_seconds"}``: the accuracies are the share of held-back object cells
        (a noun probability above 0.3) whose most likely noun is the target's, and of held-back
        cells whose most likely color is the target's (background included).

    Raises:
        ValueError: the corrector has no reader, the data no cell targets, or their vocabulary sizes differ.
    """
    cfg = getattr(corrector, "config", None)
    if not getattr(cfg, "reader", False):
        raise ValueError("distill.fit_reader: the corrector has no reader (CorrectorConfig.reader is False)")
    _check_fit("distill.fit_reader", data, epochs, batch_size, val_fraction)
    if "cell_nouns" not in data or "cell_colors" not in data:
        raise ValueError("distill.fit_reader: the edit targets have no cell targets (cell_nouns, cell_colors); "
                         "build them with build_dataset(cells=True)")
    reader = corrector.reader
    nouns, colors = data["cell_nouns"], data["cell_colors"]
    if nouns.shape[1] != len(reader.nouns) or colors.shape[1] != 1 + len(reader.colors):
        raise ValueError(f"distill.fit_reader: the cell targets have {nouns.shape[1]} nouns and {colors.shape[1]} "
                         f"color classes, the reader reads {len(reader.nouns)} nouns and 1 + {len(reader.colors)} "
                         "colors (reader_nouns / reader_colors must be the understanding model's shapes / colors)")
    if nouns.shape[-2:] != data["z0"].shape[-2:]:
        raise ValueError(f"distill.fit_reader: cell targets of {tuple(nouns.shape[-2:])} cells for latents of "
                         f"{tuple(data['z0'].shape[-2:])}")
    n = data["z0"].shape[0]
    val, train_rows = _split(n, val_fraction, seed)
    device = reader.scale.device
    z_fit = data["z0"][train_rows].float()
    with torch.no_grad():
        reader.shift.copy_(z_fit.mean(dim=(0, 2, 3), keepdim=True))
        reader.scale.copy_(z_fit.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6))
    params = list(reader.parameters())
    per_epoch = max(1, len(train_rows) // batch_size)
    reader.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch)

    def losses(rows):
        z0 = data["z0"][rows].to(device).float()
        noun_t, color_t = nouns[rows].to(device).float(), colors[rows].to(device).float()
        noun_l, color_l = reader(z0)
        loss = (F.binary_cross_entropy_with_logits(noun_l, noun_t)
                - (color_t * F.log_softmax(color_l, dim=1)).sum(1).mean())
        return loss, noun_l, color_l, noun_t, color_t

    def step_loss(rows):
        loss = losses(rows)[0]
        return loss, loss

    t0 = time.perf_counter()

    def end_of_epoch(epoch: int, train_loss: float) -> dict[str, float]:
        reader.eval()
        total, hits = 0.0, [0, 0, 0, 0]
        with torch.no_grad():
            for i in range(0, len(val), 256):
                rows = val[i:i + 256]
                loss, noun_l, color_l, noun_t, color_t = losses(rows)
                total += float(loss) * len(rows)
                obj = noun_t.max(1).values > 0.3
                hits[0] += int((noun_l.argmax(1) == noun_t.argmax(1))[obj].sum())
                hits[1] += int(obj.sum())
                hits[2] += int((color_l.argmax(1) == color_t.argmax(1)).sum())
                hits[3] += color_t[:, 0].numel()
        nan = float("nan")
        return {"reader_epoch": epoch + 1, "reader_train_loss": train_loss,
                "reader_val_loss": total / len(val) if len(val) else nan,
                "reader_val_noun_acc": hits[0] / hits[1] if hits[1] else nan,
                "reader_val_color_acc": hits[2] / hits[3] if hits[3] else nan,
                "reader_seconds": time.perf_counter() - t0}

    try:
        row = _epochs(reader, params, opt, sched, train_rows, epochs=epochs, batch_size=batch_size,
                      order_seed=(seed, "distill", "reader"), step_loss=step_loss, end_of_epoch=end_of_epoch,
                      log_path=log_path, append=False, desc="distill: reader", progress=progress,
                      postfix=lambda r: {"noun": f"{r['reader_val_noun_acc']:.3f}",
                                         "color": f"{r['reader_val_color_acc']:.3f}"})
    finally:
        reader.requires_grad_(False)
        # its last gradients stayed on the frozen reader: PPO's clipping counted them in every policy step's norm
        # (about twice the policy's own), and a resumed run, whose reader came from a file, had none
        reader.zero_grad(set_to_none=True)
    out = {k: v for k, v in row.items() if k != "reader_epoch"}
    return {**out, "reader_epochs": epochs}


def _epochs(corrector, params, opt, sched, train_rows: torch.Tensor, *, epochs: int, batch_size: int,
            order_seed: tuple, step_loss: Callable, end_of_epoch: Callable, log_path, append: bool, desc: str,
            progress: bool, postfix: Callable) -> dict[str, float]:
    """The epoch loop both fits share: a seeded order per epoch, ``step_loss(rows) -> (loss, tracked)``,
    gradient clipping at 1, one JSON row per epoch (``end_of_epoch(epoch, mean tracked)``) into
    ``log_path`` and a progress bar; returns the last row, the corrector left in eval mode."""
    per_epoch = max(1, len(train_rows) // batch_size)
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a" if append else "w")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs, desc=desc, unit="epoch", file=sys.stderr)
    row: dict[str, float] = {}
    try:
        for epoch in range(epochs):
            corrector.train()
            order = train_rows[torch.randperm(len(train_rows), generator=derived_generator(*order_seed, epoch))]
            running = 0.0
            for i in range(per_epoch):
                loss, tracked = step_loss(order[i * batch_size:(i + 1) * batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                running += float(tracked.detach())
            row = end_of_epoch(epoch, running / per_epoch)
            if log is not None:
                log.write(_io.dumps(row) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(postfix(row))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    corrector.eval()
    return row


def fit_corrector_decoded(corrector, data: dict[str, Any], decode: Callable[[torch.Tensor], torch.Tensor], *,
                          epochs: int, lr: float, batch_size: int, weight_decay: float, val_fraction: float,
                          seed: int, pixel_weight: float = 100.0, latent_weight: float = 1.0,
                          log_path: str | Path | None = None, progress: bool = True, move_weight: float = 0.1
                          ) -> dict[str, float]:
    """Fine-tune the corrector so that its corrected latent *decodes* to the edited image.

    The loss is ``pixel_weight * mse(decode(z0 + mean), decode(z0 + target)) +
    latent_weight * mse(mean, target)``: the frozen decoder turns the last few percent
    of latent error into visible remnants (faint objects where the edit erased one),
    and a loss on its output weighs an error by what it does to the image. Only valid
    where ``decode`` is what turns the corrected latent into the image
    (``correction_step`` 1.0). Same held-back items as :func:`fit_corrector`.
    With a move head the corrected latent is ``copy_cells(z0, source) + residual``
    with the targets' own sources (the head keeps its cross-entropy term, weight
    ``move_weight``), so the residual learns its part and not the head's mistakes.

    Returns:
        ``{"decoder_epochs", "decoder_train_pixel_mse", "decoder_val_pixel_mse",
        "decoder_val_zero_pixel_mse", "decoder_val_r2", "decoder_seconds"}``
        (``zero``: the uncorrected latent's decoded error).
    """
    if pixel_weight <= 0 or latent_weight < 0:
        raise ValueError(f"distill: pixel_weight must be > 0 and latent_weight >= 0, got {pixel_weight} and "
                         f"{latent_weight}")
    _check_fit("distill.fit_corrector_decoded", data, epochs, batch_size, val_fraction)
    from xlard.models import copy_cells

    data = corrector_data(corrector, data)
    move = _move_check(corrector, data)
    n = data["z0"].shape[0]
    val, train_rows = _split(n, val_fraction, seed)
    device = corrector.head.weight.device
    t0 = time.perf_counter()

    def start(rows) -> torch.Tensor:  # what the residual is added to: z0, or z0 with the targets' moves
        z0 = data["z0"][rows]
        return copy_cells(z0, data["source"][rows]) if move else z0

    with torch.no_grad():  # the edited images, as the decoder renders the targets
        goal = torch.cat([decode((start(slice(i, i + 64)) + data["target"][i:i + 64]).to(device)).cpu()
                          for i in range(0, n, 64)])
    per_epoch = max(1, len(train_rows) // batch_size)
    params, opt, sched = _optimiser(corrector, lr, weight_decay, epochs * per_epoch)

    def losses(rows, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixel MSE, latent MSE, the move head's loss or None); ``zero``: the uncorrected latent's."""
        z0, target, tokens, mask, pooled = [data[f][rows].to(device) for f in _FIELDS]
        base, ce = start(rows).to(device), None
        if zero:
            mean, base = torch.zeros_like(z0), z0
        else:  # the residual alone, as in fit_corrector
            mean, move_scores = corrector.distill_outputs(z0, tokens, pooled, mask)
            if move:
                ce, _ = _move_term(corrector, move_scores, data, rows, device)
        pixel = (decode(base + mean) - goal[rows].to(device)).square().mean()
        return pixel, (mean - target).square().mean(), ce

    def evaluate(rows) -> tuple[float, float, float]:
        if len(rows) == 0:
            return float("nan"), float("nan"), float("nan")
        corrector.eval()
        sums = [0.0, 0.0, 0.0]
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                part = rows[i:i + 64]
                pixel, latent, _ = losses(part)
                sums[0] += float(pixel) * len(part)
                sums[1] += float(latent) * len(part)
                sums[2] += float(losses(part, zero=True)[0]) * len(part)
        zero_latent = float(data["target"][rows].square().mean())
        r2 = 1.0 - sums[1] / len(rows) / zero_latent if zero_latent > 0 else float("nan")
        return sums[0] / len(rows), sums[2] / len(rows), r2

    def step_loss(rows):
        pixel, latent, ce = losses(rows)
        loss = pixel_weight * pixel + latent_weight * latent
        return (loss if ce is None else loss + move_weight * ce), pixel

    def end_of_epoch(epoch: int, train_pixel: float) -> dict[str, float]:
        val_pixel, zero_pixel, r2 = evaluate(val)
        return {"decoder_epoch": epoch + 1, "decoder_train_pixel_mse": train_pixel,
                "decoder_val_pixel_mse": val_pixel, "decoder_val_zero_pixel_mse": zero_pixel,
                "decoder_val_r2": r2, "decoder_seconds": time.perf_counter() - t0}

    row = _epochs(corrector, params, opt, sched, train_rows, epochs=epochs, batch_size=batch_size,
                  order_seed=(seed, "distill-decoded"), step_loss=step_loss, end_of_epoch=end_of_epoch,
                  log_path=log_path, append=True, desc="distill: decoder-space fit", progress=progress,
                  postfix=lambda r: {"pixel": f"{r['decoder_train_pixel_mse']:.5f}",
                                     "val_r2": f"{r['decoder_val_r2']:.3f}"})
    row.pop("decoder_epoch", None)
    return {**row, "decoder_epochs": epochs}
