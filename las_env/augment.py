"""On-device data augmentation: random crop (zero or reflect padding) and horizontal flip, batched.

Runs where the batch lives (the whole data set is resident on the training device), as one
gather, so no host-device transfer happens per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_MODES = ("zeros", "reflect")
"""How the crop pads: zeros (ours, torchvision's RandomCrop default) or reflect (the authors' AWP scripts)."""


def augment_batch(
    x: Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True, pad_mode: str = "zeros"
) -> Tensor:
    """Random crop with zero (or reflect) padding, then random horizontal flip, for a whole batch at once.

    Each image is padded by ``padding`` pixels on every side (zeros, or ``pad_mode="reflect"``:
    the mirror image of the border, without repeating the edge pixel) and a window of the
    original size is cut at a uniformly random offset (``0 .. 2 * padding`` per axis), so an
    image moves by up to ``padding`` pixels in each direction; with ``flip`` it is then
    mirrored left-right with probability 1/2. Crop and flip are one gather on ``x``'s device.

    Random numbers come only from ``generator`` (drawn on the generator's device, then moved
    to ``x``'s), in the order: row offsets, column offsets, flip mask; the same generator
    state therefore gives the same output.

    Args:
        x: ``(N, C, H, W)`` images.
        generator: Source of randomness.
        padding: Padding per side, ``>= 0``; 0 disables the crop.
        flip: Whether to apply random horizontal flips.
        pad_mode: ``"zeros"`` (ours) or ``"reflect"`` (the authors' AWP/LAS-AWP scripts).

    Returns:
        A new tensor shaped like ``x`` (``x`` is not modified).
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W) images, got shape {tuple(x.shape)}.")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be 'zeros' (ours) or 'reflect' (the authors' AWP), got {pad_mode!r}.")
    n, _, h, w = x.shape
    if n == 0 or (padding == 0 and not flip):
        return x.clone()

    gen_device = generator.device
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
        mode = "constant" if pad_mode == "zeros" else "reflect"
        src = F.pad(x, (padding, padding, padding, padding), mode=mode)
    else:
        dy = dx = torch.zeros(n, dtype=torch.long, device=x.device)
        src = x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H) source row per output row
    cols_fwd = torch.arange(w, device=x.device)
    if flip:
        flipped = (torch.rand(n, generator=generator, device=gen_device) < 0.5).to(x.device)
        # Flipping the crop reads its columns right to left, so fold it into the same gather.
        cols_local = torch.where(flipped[:, None], (w - 1 - cols_fwd)[None, :], cols_fwd[None, :])
    else:
        cols_local = cols_fwd[None, :].expand(n, w)
    cols = dx[:, None] + cols_local  # (N, W)

    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return src[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
