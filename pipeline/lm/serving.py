"""What vLLM's multi-LoRA serving refuses of an adapter: read from its adapter_config.json after
training (the export's training report and model card), and known from the config before it (`adapters
doctor`, the pre-flight).

    serving_problems(adapter_config, max_lora_rank=VLLM_MAX_LORA_RANK) -> what vLLM's multi-LoRA refuses
    config_serving_warnings(cfg) -> the same, known from the config before training
"""
from __future__ import annotations

# vLLM's --max-lora-rank choices (vllm.config.LoRAConfig.max_lora_rank); its default is 16
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MAX_LORA_RANK = VLLM_LORA_RANKS[-1]
# layers whose LoRA vLLM does not serve (recent vLLM dropped LoRA on embeddings / the LM head)
VLLM_UNSUPPORTED_MODULES = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out")


def serving_problems(ac: dict, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """Why vLLM's multi-LoRA serving would refuse this adapter_config.json (empty: it loads)."""
    problems = []
    ranks = [ac.get("r") or 0] + list((ac.get("rank_pattern") or {}).values())
    if max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is above vLLM's largest --max-lora-rank ({max_lora_rank}): "
                        f"train with lora.r <= {max_lora_rank}")
    tm = ac.get("target_modules")
    names = [tm] if isinstance(tm, str) else list(tm or [])
    if any("." in n for n in names):
        problems.append("target_modules are module paths, not names: serving engines match names (q_proj, ...)")
    bad = sorted({n.rsplit(".", 1)[-1] for n in names} & set(VLLM_UNSUPPORTED_MODULES))
    if bad:
        problems.append(f"LoRA on {', '.join(bad)}: vLLM serves LoRA on the decoder's linear layers only")
    if ac.get("modules_to_save"):
        problems.append(f"modules_to_save {ac['modules_to_save']}: full trained copies of layers, which vLLM does not load")
    if ac.get("use_dora"):
        problems.append("DoRA (use_dora): not served by vLLM")
    if ac.get("bias", "none") != "none":
        problems.append(f"bias {ac['bias']!r}: vLLM loads LoRA without bias terms only")
    return problems


def config_serving_warnings(cfg) -> list[str]:
    """What the config already tells about serving each domain's adapter with vLLM (doctor and pre-flight)."""
    out = []
    for d in cfg.domains:
        lora = cfg.hyper_for(d).lora
        tm = lora.target_modules
        ac = {"r": lora.r, "target_modules": tm if isinstance(tm, list) else ["q_proj"], "bias": "none"}
        for p in serving_problems(ac):
            out.append(f"{d}: {p}")
    return out
