"""Argument checks and normalisation shared by :mod:`xlard.ops` and :mod:`xlard.reference`, and the
"hub id or local folder" check of the model loaders (:func:`model_location`).

Every message names the argument, what was expected and what came.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Literal

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8)
MODES = ("absolute", "relative", "otsu")
#: How the component ops cut a map (:data:`MODES`), for type checkers.
Mode = Literal["absolute", "relative", "otsu"]
_INT32_MAX = 2**31 - 1


def check_tensor(op: str, name: str, value, dtypes=None, min_dim: int | None = None, dim=None) -> None:
    """Raise TypeError/ValueError unless ``value`` is a tensor of an allowed dtype and rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"xlard.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"xlard.{op}: {name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"xlard.{op}: {name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if dim is not None and value.dim() not in (dim if isinstance(dim, tuple) else (dim,)):
        raise ValueError(f"xlard.{op}: {name} must have {dim} dimensions, got shape {tuple(value.shape)}")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"xlard.{op}: all tensors must be on one device, got {listing}")


_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MAX = 2**63 - 1


def show(value) -> str:
    """``repr(value)`` for a message, cut short: an int of 400 digits would fill the screen."""
    if torch.compiler.is_compiling():  # a float torch.compile traces as a symbol has no repr there (the message
        return "(a value traced by torch.compile)"  # was lost: "repr_impl not implemented")
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text)} characters)"


def is_finite_real(value) -> bool:
    """A real number (not a bool) that is finite as a float: an int too large for a float (10**400) is not."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):  # 10**400 has no float; any smaller int has a finite one
        try:
            float(value)
        except OverflowError:
            return False
        return True
    # Comparisons, not math.isfinite: torch.compile traces a float that changes between calls as a symbol, which
    # math.isfinite cannot take (a fullgraph error); comparisons become guards, so a NaN or inf given later
    # retraces and is refused. Against math.inf, not the largest float: numpy compares float32 inf with that
    # in float32, where it is inf too.
    return bool(value == value) and bool(-math.inf < value < math.inf)


def check_scalar_fits(op: str, name: str, value, dtype: torch.dtype) -> None:
    """Every provider computes a scalar parameter in the inputs' accumulation type, float32 for all but
    float64 inputs; a finite value beyond float32's range (1e39) became inf there (NaN scores, inf latents)
    on the CPU and an unexplained overflow error on Triton."""
    if dtype != torch.float64 and abs(float(value)) > _FLOAT32_MAX:
        raise ValueError(f"xlard.{op}: {name} must lie within float32's range (magnitude <= 3.4e38) for "
                         f"{str(dtype).replace('torch.', '')} inputs, which are computed in float32; got {show(value)}")


#: Otsu's class sums are exact int64s: 255 * n**2 stays below 2**63 up to n = 2**27 pixels per map (docs/ops.md).
OTSU_MAX_PIXELS = 2 ** 27


#: Component slots ``component_stats`` may allocate (maps x max_components): 2**27, a few GB of statistics.
MAX_STATS_SLOTS = 1 << 27


def check_components_args(op, maps, threshold, mode, min_area, connectivity, max_components=None) -> None:
    """Validate the arguments of the connected-component ops."""
    check_tensor(op, "maps", maps, FLOAT_DTYPES + MASK_DTYPES, min_dim=2)
    if not is_finite_real(threshold):
        raise ValueError(f"xlard.{op}: threshold must be a finite real number, got {show(threshold)}")
    if maps.is_floating_point():
        check_scalar_fits(op, "threshold", threshold, maps.dtype)
    if mode not in MODES:
        raise ValueError(f"xlard.{op}: mode must be one of {MODES}, got {mode!r}")
    if mode == "relative" and isinstance(maps, torch.Tensor) and maps.is_floating_point():
        check_relative_threshold(f"xlard.{op}: threshold", threshold)
    if not isinstance(min_area, numbers.Integral) or isinstance(min_area, bool) or not 1 <= min_area <= _INT64_MAX:
        raise ValueError(f"xlard.{op}: min_area must be an integer in [1, 2**63 - 1], got {show(min_area)}")
    if not isinstance(connectivity, numbers.Integral) or isinstance(connectivity, bool) or connectivity not in (4, 8):
        raise ValueError(f"xlard.{op}: connectivity must be 4 or 8, got {connectivity!r}")
    if max_components is not None and (
        not isinstance(max_components, numbers.Integral) or isinstance(max_components, bool)
        or not 1 <= max_components <= _INT32_MAX
    ):
        raise ValueError(f"xlard.{op}: max_components must be an integer in [1, 2**31 - 1] (labels are int32, "
                         f"so no map holds more components), got {show(max_components)}")
    h, w = maps.shape[-2:]
    if h * w > _INT32_MAX:
        raise ValueError(f"xlard.{op}: one map may hold at most 2**31 - 1 pixels (int32 labels), got {h} x {w}")
    if max_components is not None:
        m = maps.numel() // max(1, h * w)
        if m * max_components > MAX_STATS_SLOTS:  # 2**31 - 1 slots for one map had the OOM killer end the process
            raise ValueError(f"xlard.{op}: {m} map(s) x max_components {max_components} = {m * max_components} "
                             f"component slots; at most {MAX_STATS_SLOTS} (each slot holds several statistics): "
                             f"ask for fewer slots (a map of {h} x {w} pixels holds at most {h * w} components)")
    if mode == "otsu" and h * w > OTSU_MAX_PIXELS:
        raise ValueError(f"xlard.{op}: mode 'otsu' takes maps of at most 2**27 pixels (its exact int64 class "
                         f"sums would overflow beyond), got {h} x {w}; use mode 'absolute' or 'relative', or "
                         f"downsample the map")


def require_max_components(op: str, max_components) -> None:
    """``component_stats`` needs a K: :func:`check_components_args` reads None as "no K" (the label/count ops)."""
    if max_components is None:
        raise ValueError(f"xlard.{op}: max_components must be an integer in [1, 2**31 - 1] (the number of component "
                         "slots returned), got None")


def check_relative_threshold(name: str, threshold: float) -> None:
    """A relative cut (a fraction of each map's maximum) must lie in [0, 1): at 1 or more nothing is
    foreground by construction, below 0 every pixel is (zeros included)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{name} with mode 'relative' is a fraction of each map's maximum and must lie in [0, 1) "
                         f"(at 1 or more nothing is foreground, below 0 every pixel is), got {threshold!r}; "
                         f"for a cut on the values themselves use mode 'absolute'")


def check_position_args(op: str, centroids, relations, tau) -> None:
    """Types, shapes, device and ``tau`` of ``position_scores`` (their values: :func:`check_relation_values`)."""
    check_tensor(op, "centroids", centroids, FLOAT_DTYPES, dim=3)
    if centroids.shape[-1] != 2:
        raise ValueError(f"xlard.{op}: centroids must have shape [B, T, 2], got {tuple(centroids.shape)}")
    check_tensor(op, "relations", relations, (torch.int64,), dim=(2, 3))
    if relations.shape[-1] != 3 or (relations.dim() == 3 and relations.shape[0] != centroids.shape[0]):
        raise ValueError(f"xlard.{op}: relations must have shape [R, 3] or [B, R, 3] with B = {centroids.shape[0]}, "
                         f"got {tuple(relations.shape)}")
    check_same_device(op, centroids=centroids, relations=relations)
    if not isinstance(tau, numbers.Real) or isinstance(tau, bool):
        raise TypeError(f"xlard.{op}: tau must be a real number (the sigmoid's sharpness), got {type(tau).__name__}")
    if not is_finite_real(tau) or not tau > 0.0:
        raise ValueError(f"xlard.{op}: tau must be a finite float > 0 (the sigmoid's sharpness: 0 scores every "
                         f"relation 0.5, a negative tau turns every relation around), got {show(tau)}")
    check_scalar_fits(op, "tau", tau, centroids.dtype)


def check_relation_values(op: str, relations: torch.Tensor, tokens: int) -> None:
    """Token indices in [0, tokens) and codes 0..3 (reads the relations on the host)."""
    if not relations.numel():
        return
    idx, code = relations[..., :2], relations[..., 2]
    if bool((idx < 0).any() | (idx >= tokens).any()):
        raise ValueError(f"xlard.{op}: relations name token indices outside [0, {tokens}): "
                         f"min {int(idx.min())}, max {int(idx.max())}")
    if bool((code < 0).any() | (code > 3).any()):
        raise ValueError(f"xlard.{op}: relation codes must be LEFT_OF=0, RIGHT_OF=1, ABOVE=2 or BELOW=3, "
                         f"got values in [{int(code.min())}, {int(code.max())}]")


def check_color_args(op: str, patch_features, color_embeddings, patch_mask) -> None:
    """Types, shapes and device of ``color_scores``' arguments."""
    check_tensor(op, "patch_features", patch_features, FLOAT_DTYPES, dim=3)
    check_tensor(op, "color_embeddings", color_embeddings, FLOAT_DTYPES, dim=(2, 3))
    b, n, d = patch_features.shape
    if color_embeddings.shape[-1] != d or (color_embeddings.dim() == 3 and color_embeddings.shape[0] != b):
        raise ValueError(f"xlard.{op}: color_embeddings must have shape [C, {d}] or [{b}, C, {d}], "
                         f"got {tuple(color_embeddings.shape)}")
    c = color_embeddings.shape[-2]
    if patch_mask is not None:
        check_tensor(op, "patch_mask", patch_mask, (torch.bool,), dim=3)
        if tuple(patch_mask.shape) != (b, c, n):
            raise ValueError(f"xlard.{op}: patch_mask must have shape [B, C, N] = [{b}, {c}, {n}], "
                             f"got {tuple(patch_mask.shape)}")
    check_same_device(op, patch_features=patch_features, color_embeddings=color_embeddings, patch_mask=patch_mask)


def check_latents(op: str, min_dim: int = 2, **tensors) -> torch.Tensor:
    """The latent ops' tensors: float, one shape, one dtype, one device (the first named sets them)."""
    first_name, first = next(iter(tensors.items()))
    check_tensor(op, first_name, first, FLOAT_DTYPES, min_dim=min_dim)
    for name, t in tensors.items():
        check_tensor(op, name, t, FLOAT_DTYPES)
        if t.shape != first.shape:
            raise ValueError(f"xlard.{op}: {name} must have the shape of {first_name} {tuple(first.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"xlard.{op}: {name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
    check_same_device(op, **tensors)
    return first


#: Host allocations below this many bytes are not checked against the free memory (that reads a file).
HOST_CHECK_BYTES = 1 << 30


def available_host_memory() -> int | None:
    """Bytes of memory the machine can hand out now (Linux's MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_host_memory(op: str, out_bytes: int, **inputs) -> None:
    """On the CPU, refuse before allocating when the outputs (``out_bytes``) plus the contiguous copies the
    kernels make of strided ``inputs`` need more memory than the machine has available.

    A stride-0 view (``expand``) of a few bytes can stand for terabytes once copied: the allocator's own error
    names no argument, and an allocation the system admits but cannot back has the OOM killer end the process.
    Skipped below :data:`HOST_CHECK_BYTES` and where the free memory is unknown.
    """
    tensors = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    if not tensors or next(iter(tensors.values())).device.type != "cpu" or torch.compiler.is_compiling():
        return  # while tracing, sizes may be symbolic: a comparison would add a guard per call site
    copies = {n: t.numel() * t.element_size() for n, t in tensors.items() if not t.is_contiguous()}
    need = out_bytes + sum(copies.values())
    if need < HOST_CHECK_BYTES:
        return
    free = available_host_memory()
    if free is not None:
        try:  # freed output buffers xlard keeps for reuse (xlard.ops.cpu_buffer_cache_bytes) are free to it too
            free += int(torch.ops.xlard._cpu_buffer_cache(False))
        except (AttributeError, RuntimeError, ValueError):
            pass
    if free is None or need <= free:
        return
    parts = ([f"{_gib(out_bytes)} of outputs and working copies"] if out_bytes else []) + [
        f"{_gib(b)} to copy the strided view {n} (shape {tuple(tensors[n].shape)}, strides {tensors[n].stride()})"
        for n, b in copies.items()]
    raise MemoryError(f"xlard.{op}: would need {_gib(need)} ({', '.join(parts)}), more than the {_gib(free)} this "
                      f"machine has available; pass smaller batches"
                      + (", or contiguous tensors of their real size" if copies else ""))


def alpha_view(alpha, z0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
    """``alpha`` (float or [B] tensor) shaped to broadcast against ``z0`` [B, C, ...]."""
    if isinstance(alpha, torch.Tensor):
        return alpha.to(dtype).reshape(-1, *([1] * (z0.dim() - 1)))
    return float(alpha)


def split_alpha(op: str, alpha, z0: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(alpha tensor or None, alpha scalar) as the op schemas take them."""
    if isinstance(alpha, torch.Tensor):
        check_tensor(op, "alpha", alpha, FLOAT_DTYPES)
        if alpha.dim() == 0:
            alpha = alpha.reshape(1).expand(z0.shape[0])
        if alpha.dim() != 1 or alpha.shape[0] != z0.shape[0]:
            raise ValueError(f"xlard.{op}: alpha must be a float or a [B] tensor with B = {z0.shape[0]}, "
                             f"got shape {tuple(alpha.shape)}")
        if alpha.device != z0.device:
            raise ValueError(f"xlard.{op}: alpha must be on {z0.device}, got {alpha.device}")
        return alpha, 1.0
    if not is_finite_real(alpha):
        raise ValueError(f"xlard.{op}: alpha must be a finite float or a [B] tensor, got {show(alpha)}")
    check_scalar_fits(op, "alpha", alpha, z0.dtype)
    return None, float(alpha)


def broadcast_log_std(log_std, x: torch.Tensor, op: str = "gaussian_log_prob") -> torch.Tensor:
    """``log_std`` expanded (a view, no copy) to ``x.shape[1:]``, or to ``x.shape`` when it has a batch dim.

    Accepted: a float, a scalar tensor, ``[C]`` (per channel, dim 1 of x), or any
    shape that broadcasts to ``x.shape`` ([C, 1, 1], [C, H, W], [B, C, H, W], ...).
    """
    if not isinstance(log_std, torch.Tensor):
        if not isinstance(log_std, numbers.Real) or isinstance(log_std, bool):
            raise TypeError(f"xlard.{op}: log_std must be a float or a tensor, got {type(log_std).__name__}")
        if not is_finite_real(log_std):
            raise ValueError(f"xlard.{op}: log_std must be a finite number, got {show(log_std)}")
        check_scalar_fits(op, "log_std", log_std, x.dtype)
        # in x's accumulation type: float64 inputs keep a float64 log_std (0.1 is not rounded to float32)
        # torch.full, not torch.tensor: a fill on the GPU, no blocking host copy (CUDA graphs capture it)
        log_std = torch.full((), float(log_std), device=x.device,
                             dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    check_tensor(op, "log_std", log_std, FLOAT_DTYPES)
    if log_std.device != x.device:
        raise ValueError(f"xlard.{op}: log_std must be on {x.device}, got {log_std.device}")
    rest = x.shape[1:]
    if log_std.dim() == 1 and x.dim() > 2 and log_std.shape[0] == x.shape[1] and log_std.shape[0] != 1:
        log_std = log_std.reshape(-1, *([1] * (x.dim() - 2)))
    try:
        if log_std.dim() > x.dim():
            raise RuntimeError
        if log_std.dim() == x.dim():
            if log_std.shape[0] != 1:
                return log_std.expand(x.shape)
            log_std = log_std[0]
        return log_std.expand(rest)
    except RuntimeError:
        raise ValueError(
            f"xlard.{op}: log_std of shape {tuple(log_std.shape)} does not broadcast to x of shape {tuple(x.shape)} "
            "(expected a scalar, [C], or a shape broadcastable to x)"
        ) from None


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a local path, never a hub id (``name`` or ``owner/name``)."""
    return (name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def short_reason(exc_or_text, limit: int = 300) -> str:
    """An exception's (or a text's) words on one line, at most ``limit`` characters, cut at a word and marked with
    " ..." (a library's long message cut mid-word read as its whole text: "pass 'local_files_on)")."""
    text = " ".join(str(exc_or_text).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def cached_snapshot(name: str, marker: str | None, revision: str | None = None, cache_dir=None) -> str | None:
    """The folder of hub model ``name``'s snapshot in the local Hugging Face cache when it holds ``marker``
    (``model_index.json`` for a pipeline, ``config.json`` for a transformers model; None: any snapshot), at
    ``revision`` (default the cached ``main``); None when it is not cached there, or ``name`` is no hub id.
    Never touches the network."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    try:
        if marker is not None:
            found = try_to_load_from_cache(str(name), marker, cache_dir=cache_dir, revision=revision)
            return os.path.dirname(found) if isinstance(found, str) and os.path.isfile(found) else None
        repo = os.path.join(str(cache_dir or constants.HF_HUB_CACHE), "models--" + str(name).replace("/", "--"))
        ref = os.path.join(repo, "refs", revision or "main")
        commit = open(ref, encoding="utf-8").read().strip() if os.path.isfile(ref) else revision
        snapshot = os.path.join(repo, "snapshots", commit) if commit else None
        return snapshot if snapshot and os.path.isdir(snapshot) else None
    except Exception:  # an invalid id (HFValidationError), an unreadable cache folder: nothing cached to read
        return None


def model_location(who: str, name, marker: str, kind: str, others: str = "") -> str:
    """What to load for a "hub id or local folder" argument, checked before any loading.

    An existing path must be a folder holding ``marker`` (``kind`` names what such a folder is); a name that
    can only be a path (see :func:`looks_like_path`) must exist. Anything else is passed on as a hub id.
    ``others`` lists what else the argument takes, for the messages (e.g. ``", 'shapes'"``).

    Raises:
        ValueError: ``name`` is not a non-empty string or path.
        FileNotFoundError: a path that does not exist, or a folder without ``marker``.
        NotADirectoryError: a path to a file.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"{who} must be a hub model id or a local folder, got {name!r}")
    if "\x00" in str(name):  # os and huggingface_hub refuse it with their own words ("embedded null byte")
        raise ValueError(f"{who} must be a hub model id or a local folder, got {name!r} (a NUL character)")
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{who}: {text} is a file; give {kind}{others} or a hub model id")
        if not (path / marker).is_file():
            also = (f" (a local folder is read before the hub id {text!r}: run elsewhere, or give the id's "
                    "cached snapshot folder)" if not text.startswith((".", "/", "~")) and text.count("/") == 1
                    and cached_snapshot(text, marker) is not None else "")
            raise FileNotFoundError(f"{who}: {text} has no {marker}, so it is not {kind}{also}")
        return str(path)
    if looks_like_path(text):
        raise FileNotFoundError(f"{who}: no folder at {text}; check the path (a hub model id reads 'name' "
                                f"or 'owner/name')")
    return text


def missing_device(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine ("cuda asked, but this torch is built without CUDA"), or
    None when it can (the CPU always can). Callers add their own fix (drop --device, device='cpu')."""
    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "meta holds shapes only, no values: nothing could be computed or saved there"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            return f"{device} asked, but {why}"
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            return f"{device} asked, but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"{device} asked, but MPS is not available here"
    backend = getattr(torch, device.type, None)  # torch.xpu, torch.mtia, ...: their is_available() tells
    available = getattr(backend, "is_available", None)
    if callable(available):
        try:
            ok = bool(available())
        except Exception:  # noqa: BLE001 - a backend that cannot even answer is not available
            ok = False
        if not ok:
            return f"{device} asked, but {device.type} is not available in this torch"
    return None  # other device types: torch names what it cannot do


def as_device(device, owner: str) -> torch.device | None:
    """``device`` (a torch.device or its name; None stays None) checked to exist on this machine.

    Raises:
        ValueError: ``"<owner>: device ..."``: not a device name, or one this machine lacks.
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{owner}: device must be a torch device or its name, got {device!r}") from None
    why = missing_device(device)
    if why is not None:
        raise ValueError(f"{owner}: device: {why}; use device='cpu'")
    return device
