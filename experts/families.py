"""The MoE families moecluster serves, and the small shapes `init-model` gives each one."""

# Shapes shared by every family's demo checkpoint; each family adds its own names below.
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    tie_word_embeddings=False,
)

DEMO_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16,
        norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_hidden_layers=3,
        num_key_value_heads=4,  # MLA: every head has its own latent-derived key and value
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "gpt_oss": dict(
        intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "rope_theta": 150000.0, "original_max_position_embeddings": 16},
    ),
}
ARCHS = tuple(DEMO_CONFIGS)


def demo_config_kwargs(arch: str, vocab_size: int, **overrides) -> dict:
    return {**_COMMON, "vocab_size": vocab_size, **DEMO_CONFIGS[arch], **overrides}
