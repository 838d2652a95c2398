"""How many KV-cache positions fit in the memory free where the model's cache lives."""

import os
from pathlib import Path

import torch


def position_bytes(config, dtype: torch.dtype) -> int:
    """Bytes one cached position takes over every layer: its keys and values."""
    config = config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # MemAvailable counts the page cache the kernel would give back
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def positions_in(free: int, fraction: float, model) -> int:
    """The positions `fraction` of `free` bytes holds for `model`'s cache."""
    return max(1, int(free * fraction) // position_bytes(model.config, model.dtype))
