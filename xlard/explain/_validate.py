"""Argument checks shared by the explanation modules: error prefixes, tensor ranks, images in [0, 1]."""
from __future__ import annotations

import torch

_PIXEL_TOLERANCE = 1e-3  # decoded images may overshoot [0, 1] by rounding; clamp within this


def _err(fn: str, message: str) -> str:
    return f"xlard.explain.{fn}: {message}"


def _check_tensor(fn: str, name: str, value, dims: tuple[int, ...], floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(value).__name__}"))
    if value.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(_err(fn, f"{name} must have {want} dimensions, got shape {tuple(value.shape)}"))
    if floating and not value.is_floating_point():
        raise TypeError(_err(fn, f"{name} must be a floating-point tensor, got {value.dtype}"))


def _as_image(fn: str, name: str, image, batched_ok: bool = True) -> torch.Tensor:
    """An image as float32 CHW (or BCHW) in [0, 1]: float in [0, 1], or uint8 in [0, 255]."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        if isinstance(image, np.ndarray):
            arr = image
            # numpy images are HWC (or HW, gray): channels move first. Whether the first axis is a channel
            # axis is never guessed: a 3-row image is as likely as a 3-channel one.
            if arr.ndim == 3:
                if arr.shape[-1] not in (1, 3, 4):
                    raise ValueError(_err(fn, f"{name}: a numpy image must be [H, W, C] with 1, 3 or 4 channels "
                                              f"last (or [H, W]), got shape {arr.shape}; pass a torch.Tensor for "
                                              f"[C, H, W]"))
                arr = arr.transpose(2, 0, 1)
            elif arr.ndim == 2:
                arr = arr[None]
            else:
                raise ValueError(_err(fn, f"{name}: a numpy image must be [H, W, C] or [H, W], got shape "
                                          f"{arr.shape}"))
            image = torch.from_numpy(arr.copy())
        else:
            raise TypeError(_err(fn, f"{name} must be a torch.Tensor [3, H, W] (or a numpy array), "
                                     f"got {type(image).__name__}"))
    if image.is_meta:
        raise ValueError(_err(fn, f"{name} is a meta tensor (shapes only, no pixels)"))
    dims = (3, 4) if batched_ok else (3,)
    if image.dim() not in dims:
        raise ValueError(_err(fn, f"{name} must be [3, H, W]{' or [B, 3, H, W]' if batched_ok else ''}, "
                                  f"got shape {tuple(image.shape)}"))
    if image.shape[-3] not in (1, 3, 4):
        raise ValueError(_err(fn, f"{name} must have 1, 3 or 4 channels (dim -3), got shape {tuple(image.shape)}"))
    if image.shape[-3] == 4:  # RGBA: drop alpha
        image = image[..., :3, :, :]
    if image.shape[-3] == 1:
        image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(_err(fn, f"{name} must be float in [0, 1] or uint8, got {image.dtype}"))
    x = image.detach().float()
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(_err(fn, f"{name} has non-finite pixels"))
        lo, hi = x.min().item(), x.max().item()
        if lo < -_PIXEL_TOLERANCE or hi > 1 + _PIXEL_TOLERANCE:
            fix = ("0..255 values? divide by 255 (or pass uint8)" if lo >= -_PIXEL_TOLERANCE and hi > 2 else
                   "map a [-1, 1] decoder output with (x + 1) / 2 and clamp(0, 1)")
            raise ValueError(_err(fn, f"{name} must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; {fix}"))
    return x.clamp(0.0, 1.0)
