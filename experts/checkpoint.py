"""Read a Hugging Face checkpoint tensor by tensor, so no process ever holds more than it serves."""

import json
import re
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

# A routed expert on disk: `...layers.{L}.{block}.experts.{E}.{proj}.weight` (one file entry per expert),
# or `...layers.{L}.mlp.experts.{param}` (GPT-OSS: all experts of a layer fused, sliced on read; its released
# checkpoints hold each projection as mxfp4 `{param}_blocks` and `{param}_scales`).
_PER_EXPERT = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.((?:gate_up_proj|down_proj)(?:_bias|_blocks|_scales)?)$")
_ROUTED = re.compile(r"\.experts\.")
_ROLES = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class CheckpointError(ValueError):
    """The checkpoint is not a servable MoE model, or misses a tensor."""


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert's mxfp4 projection, blocks [out, in / 32, 16] and scales [out, in / 32], as the [in, out] weight
    that transformers' GPT-OSS experts hold once dequantized."""
    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0]


def is_routed_expert(name: str) -> bool:
    return bool(_ROUTED.search(name))


class Checkpoint:
    """Tensor names of a safetensors checkpoint (single file or sharded) and lazy reads of them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = self._tensor_files()
        self._handles: dict[str, object] = {}

    def _tensor_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        with safe_open(single, "pt") as f:
            return {name: single.name for name in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, "pt")
        return self._handles[file]

    def require(self, name: str) -> str:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        if not (self.path / file).exists():
            raise CheckpointError(f"{self.path / file}: file is missing (it should hold tensor {name!r})")
        return file

    def read(self, name: str) -> torch.Tensor:
        return self._open(self.require(name)).get_tensor(name)

    def read_row(self, name: str, row: int) -> torch.Tensor:
        """One expert's slice of a fused [E, ...] tensor, without reading the others."""
        return self._open(self.require(name)).get_slice(name)[row]

    def read_mxfp4_row(self, blocks: str, scales: str, row: int, dtype: torch.dtype) -> torch.Tensor:
        """One expert's slice of fused mxfp4 `blocks` and `scales`, dequantized (see `dequantize_mxfp4`)."""
        block_rows, scale_rows = self.read_row(blocks, row), self.read_row(scales, row)
        if block_rows.shape[:-1] != scale_rows.shape:
            raise CheckpointError(f"{self.path}: {blocks} of shape {tuple(block_rows.shape)} per expert does not "
                                  f"match {scales} of shape {tuple(scale_rows.shape)}")
        return dequantize_mxfp4(block_rows, scale_rows, dtype)

    def dense_names(self) -> list[str]:
        return [name for name in self.files if not is_routed_expert(name)]

    @cached_property
    def expert_names(self) -> dict[tuple[int, int], dict[str, str]]:
        """{(layer, expert): {role: tensor name}} for per-expert checkpoints, roles gate/up/down."""
        names: dict[tuple[int, int], dict[str, str]] = {}
        for name in self.files:
            if m := _PER_EXPERT.search(name):
                names.setdefault((int(m[1]), int(m[2])), {})[_ROLES.get(m[3], m[3])] = name
        return names

    @cached_property
    def fused_names(self) -> dict[int, dict[str, str]]:
        """{layer: {param: tensor name}} for checkpoints that store a layer's experts as one [E, ...] tensor."""
        names: dict[int, dict[str, str]] = {}
        for name in self.files:
            if m := _FUSED.search(name):
                names.setdefault(int(m[1]), {})[m[2]] = name
        return names
