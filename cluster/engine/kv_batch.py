"""Row surgery on a transformers DynamicCache, so sequences can join and leave a running batch.

B = sequences, H = heads, S = cached positions (left-padded), Dh = head dim
"""

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if layer.is_initialized]


def _sync(layer) -> None:
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = layer.keys.shape[-2]


def new_cache(config) -> DynamicCache:
    """A cache for the engine's batches: every position kept, full-attention layers growing in place."""
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in cache.layers:
        # Sliding-window layers drop old positions on their own, which would misalign rows of different
        # lengths; recording the past keeps every position while the mask still limits attention to the window.
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


class _GrowingLayer(DynamicLayer):
    """Appends into buffers with spare positions, doubling when full, where DynamicLayer copies the whole cache
    at every step (torch.cat): a decode step's cost stops growing with the sequence length. The row surgery
    below replaces `keys`/`values` with fresh tensors; the next update then starts a new buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = (None, None)
        key_buffer, value_buffer = self._buffers
        self.keys, key_buffer = _append(self.keys, key_states, key_buffer)
        self.values, value_buffer = _append(self.values, value_states, value_buffer)
        self._buffers = (key_buffer, value_buffer)
        return self.keys, self.values


def _append(cached: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None):
    """[B, H, S, Dh] + [B, H, n, Dh] -> ([B, H, S + n, Dh] view of the buffer, buffer)."""
    length = cached.shape[-2] if cached.dim() == 4 else 0
    end = length + new.shape[-2]
    in_buffer = (buffer is not None and length and cached.data_ptr() == buffer.data_ptr()
                 and cached.shape[:2] == buffer.shape[:2] and end <= buffer.shape[-2])
    if not in_buffer:
        buffer = new.new_empty((*new.shape[:2], max(2 * end, 64), new.shape[-1]))
        if length:
            buffer[:, :, :length] = cached
    buffer[:, :, length:end] = new
    return buffer[:, :, :end], buffer


def left_padded(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, L] ids, [n, L] attention mask) of `prompts`, right-aligned: L is the longest prompt."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    starts = torch.tensor([width - len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device) >= starts[:, None]).long()
    return ids, mask


def join(caches: list[DynamicCache], masks: list[torch.Tensor]) -> tuple[DynamicCache, torch.Tensor]:
    """Every row of `caches` in the first of them, right-aligned to the widest; and their joined [B, S] mask."""
    width = max(mask.shape[1] for mask in masks)
    into = caches[0]
    for index, layer in enumerate(into.layers):
        layer.keys = torch.cat([_padded(cache.layers[index].keys, width) for cache in caches])  # [B, H, S, Dh]
        layer.values = torch.cat([_padded(cache.layers[index].values, width) for cache in caches])
        _sync(layer)
    return into, torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in masks])


def _padded(states: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, Dh] grown to `width` positions on the left."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))


def select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep `rows`, then drop the leading positions that every kept row has as padding."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask[index]
    first = int(mask.any(0).int().argmax()) if mask.numel() else 0
    for layer in _layers(cache):
        layer.keys = layer.keys[index, :, first:]
        layer.values = layer.values[index, :, first:]
        _sync(layer)
    return mask[:, first:]
