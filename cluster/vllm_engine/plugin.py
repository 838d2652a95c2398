"""vLLM's general plugin `moecluster`: vLLM calls `register` in each of its processes before it builds a model."""


def register() -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from cluster.vllm_engine.experts_method import RemoteExperts

    if "UnquantizedFusedMoEMethod" not in _registered():
        UnquantizedFusedMoEMethod.register_oot(RemoteExperts)


def _registered() -> dict:
    from vllm.model_executor.custom_op import op_registry_oot

    return op_registry_oot
