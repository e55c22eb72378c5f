"""Small SFT Parquet shards (distinct text per domain) and tiny configs for the train tests."""
from __future__ import annotations

import random

from pipeline.config import Config
from pipeline.storage import Store

VOCAB = {
    "debate": (["resolution", "affirmative", "negative", "rebuttal", "evidence", "warrant", "impact", "judge",
                "cross-examination", "plan", "counterplan", "topicality"],
               "Argue the {a} side on the {b} of the {c}.", "The {a} wins because the {b} outweighs the {c} on {d}."),
    "medicine": (["patient", "diagnosis", "dose", "symptom", "therapy", "infection", "insulin", "cardiac",
                  "renal", "antibiotic", "fever", "biopsy"],
                 "Which {a} fits a {b} with {c}?", "Start {a} for the {b}; monitor {c} and {d} daily."),
    "education": (["photosynthesis", "fraction", "velocity", "cell", "equation", "molecule", "energy", "atom",
                   "algebra", "gravity", "enzyme", "circuit"],
                  "Explain the {a} in terms of {b} and {c}.", "A {a} relates {b} to {c}, as the {d} chapter shows."),
    "ecology": (["climate", "carbon", "glacier", "emissions", "warming", "ocean", "drought", "species",
                 "forest", "methane", "sea-level", "wildfire"],
                "Is the claim about {a} and {b} supported by {c}?", "SUPPORTS: {a} rises with {b}; {c} data from {d} agree."),
}


def sft_rows(domain: str, n: int, seed: int) -> list[dict]:
    words, q, a = VOCAB[domain]
    rng = random.Random(f"{domain}-{seed}")
    rows = []
    for i in range(n):
        w = [rng.choice(words) for _ in range(4)]
        rows.append({"messages": [{"role": "user", "content": q.format(a=w[0], b=w[1], c=w[2])},
                                  {"role": "assistant", "content": a.format(a=w[1], b=w[2], c=w[3], d=w[0])}],
                     "domain": domain, "source": "fixture", "doc_id": f"{domain}-{seed}-{i}", "task": "qa",
                     "group": f"{domain}-{seed}-{i}"})
    return rows


def write_sft(store: Store, domains=tuple(VOCAB), n=(64, 16, 16)) -> None:
    import pyarrow as pa
    for d in domains:
        for split, k, seed in zip(("train", "val", "test"), n, (1, 2, 3)):
            rows = [{**r, "split": split} for r in sft_rows(d, k, seed)]
            store.write_table(f"data/sft/{d}/{split}/part-00000.parquet", pa.Table.from_pylist(rows))
    store.write_text("data/_SUCCESS", "")


def tiny_config(output: str, **over) -> Config:
    d = {
        "run_name": "t", "output": output, "domains": list(VOCAB),
        "model": {"base": "tiny", "quantization": "nf4",
                  "tiny": {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "pretrain_steps": 30,
                           "max_position_embeddings": 256}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_seq_length": 128, "tokens_per_micro_batch": 512, "max_steps": 12, "learning_rate": 0.005,
                  "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 4, "log_every": 2,
                  "gradient_checkpointing": False, "max_failures": 1, "eval_matrix": True},
        "resources": {"device": "cpu", "cpus_per_trial": 0.5, "max_concurrent_trials": 2},
    }
    for k, v in over.items():
        cur = d
        keys = k.split("__")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = v
    return Config.model_validate(d)


def tiny_lora_model(cfg, store: Store, device: str = "cpu", checkpointing: bool = False, b_scale: float = 0.05,
                    fused_kernels: bool = False):
    """cfg's tiny base (4-bit per cfg.model.quantization) on `device` with cfg's LoRA for debate, its B matrices
    made non-zero so that every gradient path carries signal; Liger's kernels first when fused_kernels."""
    import torch
    from pipeline.lm import kernels
    from pipeline.lm.model import add_lora, load_model, resolve_base
    torch.manual_seed(0)
    base = load_model(resolve_base(cfg, store), cfg, device)
    if fused_kernels:
        kernels.apply_fused_kernels(base, device, "auto")
    model = add_lora(base, cfg.hyper_for("debate").lora, cfg, checkpointing)
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_((torch.randn(p.shape, generator=g) * b_scale).to(p))
    return model


def loss_and_grads(model, batch, device: str = "cpu", seed: int = 5):
    """(the summed loss of `batch`, {name: fp32 gradient} of every trained parameter), the RNG seeded first."""
    import torch
    from pipeline.lm import kernels
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = kernels.loss_sum(model, batch, device)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_debate_env(out, n=(64, 16, 16), **over):
    """(cfg, store, tokenizer) of a tiny base built under `out` on debate rows: tiny_config(out, **over),
    write_sft(n), the tiny model pretrained and saved."""
    from pipeline.lm.model import load_tokenizer, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    cfg = tiny_config(str(out), **over)
    store = Store(str(out))
    write_sft(store, domains=["debate"], n=n)
    ensure_tiny(cfg, store)
    return cfg, store, load_tokenizer(resolve_base(cfg, store), cfg)
