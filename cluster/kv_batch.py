"""Row surgery on a transformers DynamicCache, so sequences can join and leave a running batch.

B = sequences, H = heads, S = cached positions (left-padded), Dh = head dim
"""

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if layer.is_initialized]


def _sync(layer) -> None:
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = layer.keys.shape[-2]


def keep_all_positions(cache: DynamicCache) -> None:
    # Sliding-window layers drop old positions on their own, which would misalign rows of different lengths;
    # recording the past keeps every position while the mask still limits attention to the window.
    for layer in cache.layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def pad_left(cache: DynamicCache, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Grow every row to `width` positions on the left; returns the grown [B, width] mask."""
    pad = width - mask.shape[1]
    if pad <= 0:
        return mask
    for layer in _layers(cache):
        layer.keys = F.pad(layer.keys, (0, 0, pad, 0))  # [B, H, S, Dh]
        layer.values = F.pad(layer.values, (0, 0, pad, 0))
        _sync(layer)
    return F.pad(mask, (pad, 0))


def concat(into: DynamicCache, other: DynamicCache) -> None:
    """Append `other`'s rows to `into`; both must already have the same width."""
    for mine, theirs in zip(into.layers, other.layers):
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
        _sync(mine)


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep `rows`, then drop the leading positions that every kept row has as padding."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = mask[index]
    first = int(mask.any(0).int().argmax()) if mask.numel() else 0
    for layer in _layers(cache):
        layer.keys = layer.keys[index, :, first:]
        layer.values = layer.values[index, :, first:]
        _sync(layer)
    return mask[:, first:]
