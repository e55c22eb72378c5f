"""The eval matrix: the base model and every finished adapter on every domain's test set.

    run_eval_matrix(cfg, store, adapters) -> dict   also written to eval/matrix.json:
        {"models": ["base", <domain>...], "datasets": [<domain>...], "loss": {model: {dataset: x}},
         "ppl": {...}, "n_examples": {dataset: n}}

Same prompt format, masking and packing as training (each dataset with its own domain's micro-batch
size). Runs as one Ray task (a GPU when resources.device is cuda, checked on the task's node like a
training worker), loading the base model once and switching adapters with PEFT's load_adapter /
set_adapter.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def test_examples(cfg, store, domain: str, tok, split: str = "test"):
    from pipeline.train.data import Example, read_split, tokenize_example
    t = cfg.train
    rows = read_split(store, domain, split, columns=("prompt", "response")).to_pylist()
    out = [Example(*tokenize_example(tok, r["prompt"], r["response"], t.max_seq_length, t.mask_prompt, t.chat_template))
           for r in rows]
    return [e for e in out if e.n_target_tokens > 0]


def compute_matrix(cfg, adapters: list[str]) -> dict:
    import torch
    from pipeline.storage import open_store
    from pipeline.train.device import worker_device
    from pipeline.train.export import _local_dir
    from pipeline.train.loop import evaluate, ppl
    from pipeline.train.model import load_adapter_onto, load_model, load_tokenizer, resolve_base
    device = worker_device(cfg)
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    store = open_store(cfg)
    base = resolve_base(cfg, store)
    tok = load_tokenizer(base, cfg)
    model = load_model(base, cfg, device)
    data = {d: test_examples(cfg, store, d, tok) for d in cfg.domains}
    data = {d: x for d, x in data.items() if x}
    t = cfg.train

    def losses(m, name: str) -> dict[str, float]:
        out = {}
        for d, ex in data.items():
            t0 = time.time()
            rows = max(1, cfg.hyper_for(d).tokens_per_micro_batch // t.max_seq_length)
            out[d] = evaluate(m, ex, rows=rows, seq_len=t.max_seq_length, pad_id=tok.pad_token_id, device=device,
                              max_batches=t.eval_max_batches, packing=t.packing)[0]
            log.info("eval matrix: %s on %s test (%d examples): loss %.4f (%.1fs)", name, d, len(ex), out[d],
                     time.time() - t0)
        return out

    loss = {"base": losses(model, "base")}
    peft_model = None
    for a in adapters:
        path = _local_dir(store, f"adapters/{a}")
        if peft_model is None:
            peft_model = load_adapter_onto(model, path, adapter_name=a)
        else:
            peft_model.load_adapter(path, adapter_name=a)
        peft_model.set_adapter(a)
        loss[a] = losses(peft_model, f"{a} adapter")
    models = ["base"] + list(adapters)
    return {"models": models, "datasets": list(data), "loss": loss,
            "ppl": {m: {d: ppl(v) for d, v in loss[m].items()} for m in models},
            "n_examples": {d: len(ex) for d, ex in data.items()}}


def run_eval_matrix(cfg, store, adapters: list[str]) -> dict:
    import ray
    r = cfg.resources
    opts = {"num_cpus": r.cpus_per_trial, "num_gpus": r.gpus_per_trial if r.device == "cuda" else 0}
    log.info("eval matrix: base model and %d adapter(s) on %d test set(s)", len(adapters), len(cfg.domains))
    matrix = ray.get(ray.remote(**opts)(compute_matrix).remote(cfg, list(adapters)))
    store.write_json("eval/matrix.json", matrix)
    log.info("eval matrix written to %s", store.uri_of("eval/matrix.json"))
    return matrix
