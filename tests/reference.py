"""Oracles and in-process stand-ins shared by the tests."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

from cluster.control.placement import WorkerSlot, plan_placement, replica_counts
from experts.bank import ExpertBank
from experts.layout import experts_modules
from router.remote import ExpertRouter
from router.seam import route_experts
from router.table import RoutingTable


def transformers_model(path, dtype=torch.float32):
    quantized = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    options = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options).eval()


MXFP4 = "gpt_oss_mxfp4"  # the `checkpoints` fixture's GPT-OSS with mxfp4 experts
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS experts [E, in, out] -> mxfp4 blocks [E, out, in / 32, 16] and scales [E, out, in / 32], uint8:
    32 values share a power-of-two scale (exponent + 127), each value the nearest e2m1, two to a byte."""
    groups = weight.transpose(1, 2).float().unflatten(-1, (-1, 32))  # [E, out, in / 32, 32]
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(amax)) - 2  # e2m1's largest magnitude is 6 = 1.5 * 2**2
    scaled = groups / torch.exp2(exponent)
    nibble = (scaled.abs().unsqueeze(-1) - FP4_MAGNITUDES).abs().argmin(-1) | ((scaled < 0).long() << 3)
    blocks = (nibble[..., 0::2] | nibble[..., 1::2] << 4).to(torch.uint8)
    return blocks.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8).contiguous()


def write_mxfp4_checkpoint(source: Path, target: Path) -> Path:
    """A copy of a GPT-OSS checkpoint with its experts stored as the released checkpoints store them."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(tensors.pop(name))
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def attach(model, path, num_workers: int, client_factory, replicas: int = 1, dtype=None, device="cpu") -> ExpertRouter:
    """Place the model's experts on `num_workers` banks (on `device`, in `dtype`, unset: the checkpoint's) and route
    its experts modules to them."""
    layers = experts_modules(model)
    shape = {layer: m.num_experts for layer, m in layers.items()}
    slots = [WorkerSlot(node=f"node-{i}") for i in range(num_workers)]
    plan = plan_placement(replica_counts(shape, {}, replicas), slots, expert_bytes=1)
    client = client_factory([ExpertBank(path, pairs, dtype, device) for pairs in plan])
    addresses = getattr(client, "addresses", {w: f"bank-{w}" for w in range(num_workers)})
    router = ExpertRouter(RoutingTable.from_plan(0, plan, addresses, shape), client)
    route_experts(model, router)
    return router
