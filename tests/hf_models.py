"""Tiny configurations of the real transformers MoE classes (built from
config, no hub download), one per supported family; the same keyword
arguments work on transformers 4.57 and 5.x."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, hidden_act="silu")

TINY = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                   pad_token_id=1, eos_token_id=2)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
                         n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
                         n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                         first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(COMMON, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=8, max_position_embeddings=131072)),
}

FAMILIES = sorted(TINY)


def build(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """The tiny model of a family in eval mode, with random weights that make
    routing non-trivial (router and expert weights scaled up)."""
    import transformers

    cfg_name, cls_name, kw = TINY[family]
    cfg = getattr(transformers, cfg_name)(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if ("gate" in name.split(".")[-2:][0] or "router" in name) else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    model = model.to(dtype)
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # transformers 5.x grouped_mm has no float64
    return model


def input_ids(batch=2, seq=9, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
