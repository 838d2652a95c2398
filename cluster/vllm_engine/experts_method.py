"""The MoE experts method of engines with an expert tier: vLLM's router picks each token's experts, the expert
workers compute them. Engines started without a tier get vLLM's own method, unchanged.

E = experts, T = tokens, K = experts per token, D = hidden
"""

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.models.utils import extract_layer_index

from cluster.vllm_engine import tier

NOT_HOSTED = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")  # the experts' own weights: on the workers


class RemoteExperts(UnquantizedFusedMoEMethod):
    def __init__(self, moe):
        spec = tier.spec_in(get_current_vllm_config().additional_config)
        if spec is None:
            super().__init__(moe)
            self.router = None
            return
        FusedMoEMethodBase.__init__(self, moe)
        if moe.moe_parallel_config.use_ep or moe.moe_parallel_config.tp_size > 1:
            raise ValueError("an expert tier serves the experts itself: run the engine without expert or tensor "
                             "parallelism")
        self.router = tier.router_for(spec)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        if self.router is None:
            return super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                          params_dtype, **extra_weight_attrs)
        layer.moecluster_layer = extract_layer_index(layer.layer_name)
        for name in NOT_HOSTED:
            # The checkpoint's expert tensors are read and dropped: the workers hold them.
            placeholder = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            placeholder.weight_loader = _dropped
            layer.register_parameter(name, placeholder)

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        if self.router is None:
            return super().maybe_roundup_sizes(hidden_size, intermediate_size_per_partition, act_dtype,
                                               moe_parallel_config)
        # The workers' kernels take the checkpoint's sizes: no padding for vLLM's.
        return FusedMoEMethodBase.maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype,
                                                      moe_parallel_config)

    def process_weights_after_loading(self, layer) -> None:
        if self.router is None:
            super().process_weights_after_loading(layer)

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig:
        if self.router is None:
            return super().get_fused_moe_quant_config(layer)
        return FusedMoEQuantConfig.make()

    @property
    def supports_eplb(self) -> bool:
        return self.router is None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        """[T, D] from x [T, D], topk_weights [T, K] and topk_ids [T, K]. A shared expert is the runner's to
        compute (this method says it cannot overlap one), so `shared_experts` is None here."""
        if self.router is None:
            return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        if layer.apply_router_weight_on_input:
            raise NotImplementedError("experts with the router weight applied to their input are not served yet")
        return torch.ops.moecluster.route_experts(x, topk_ids, topk_weights, layer.moecluster_layer)


def _dropped(param, loaded_weight, *args, return_success: bool = False, **kwargs):
    return True if return_success else None
