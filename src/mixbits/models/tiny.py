"""Tiny random models of each supported family, built from its transformers config.

No model hub is reachable here, so every family mixbits has an adapter for
is exercised on a two-block model of its real architecture with random
weights (norm weights randomised too, so folding them matters). Used by the
tests and by `bench/architectures.py`.
"""

from __future__ import annotations

import torch
from torch import nn

COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {  # model_type: (config class, model class, settings beyond COMMON)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    # query_pre_attn_scalar = head_dim, as in Gemma 2 2B/9B and Gemma 3 (the defaults are 256: their head_dim)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16,
                                                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 64,
                                                              "query_pre_attn_scalar": 16}),
}
MOE_FAMILIES = {  # mixture-of-experts: four experts, two per token
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                             "moe_intermediate_size": 64, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 64,
                                                            "shared_expert_intermediate_size": 64}),
}


def tiny_model(family: str, seed: int = 0, **settings) -> nn.Module:
    """A two-block random model of `family` (a key of FAMILIES or MOE_FAMILIES), in eval mode."""
    import transformers

    config_name, model_name, extra = {**FAMILIES, **MOE_FAMILIES}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **settings})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # uneven norm weights about their identity (Gemma's norms scale by 1 + w, from w = 0)
        centre = 0.0 if family.startswith("gemma") else 1.0
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) - 0.5 + centre)
    return model


def tiny_vocabulary_gguf(path) -> None:
    """Write a GGUF holding only a tokenizer of the tiny models' 64-token vocabulary (what GGUF export and loading
    need beside the tensors; the default model's takes seconds to copy)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chr(ord("A") + i) for i in range(COMMON["vocab_size"])])
    writer.add_token_types([gguf.TokenType.NORMAL] * COMMON["vocab_size"])
    writer.add_token_scores([0.0] * COMMON["vocab_size"])  # transformers' GGUF tokenizer reader needs them
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
