"""The eval matrix: the base model and every finished adapter on every domain's test set.

    run_eval_matrix(cfg, store, adapters) -> dict   also written to eval/matrix.json:
        {"models": ["base", <domain>...], "datasets": [<domain>...], "loss": {model: {dataset: x}},
         "ppl": {...}, "n_target_tokens": {dataset: n}}

Same prompt format, masking and packing as training. Runs as one Ray task (a GPU when
resources.device is cuda), loading the base model once and each adapter onto it in turn.
"""
from __future__ import annotations

import io
import logging

log = logging.getLogger(__name__)


def test_examples(cfg, store, domain: str, tok, split: str = "test"):
    import pyarrow.parquet as pq
    from pipeline.train.data import Example, tokenize_example
    rows = []
    for f in store.list_files(f"data/sft/{domain}/{split}", ".parquet"):
        rows.extend(pq.read_table(io.BytesIO(store.read_bytes(f)), columns=["prompt", "response"]).to_pylist())
    t = cfg.train
    out = [Example(*tokenize_example(tok, r["prompt"], r["response"], t.max_seq_length, t.mask_prompt, t.chat_template))
           for r in rows]
    return [e for e in out if e.n_target_tokens > 0]


def compute_matrix(cfg_json: dict, adapters: list[str]) -> dict:
    import torch
    from peft import PeftModel
    from pipeline.config import Config
    from pipeline.storage import open_store
    from pipeline.train.export import _local_dir
    from pipeline.train.loop import evaluate, ppl
    from pipeline.train.model import load_model, load_tokenizer, resolve_base
    cfg = Config.model_validate(cfg_json)
    store = open_store(cfg)
    device = "cuda" if cfg.resources.device == "cuda" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    base = resolve_base(cfg, store)
    tok = load_tokenizer(base, cfg)
    model = load_model(base, cfg, device)
    data = {d: test_examples(cfg, store, d, tok) for d in cfg.domains}
    data = {d: x for d, x in data.items() if x}
    t = cfg.train
    kw = dict(rows=max(1, t.tokens_per_micro_batch // t.max_seq_length), seq_len=t.max_seq_length,
              pad_id=tok.pad_token_id, device=device, max_batches=t.eval_max_batches, packing=t.packing)
    loss = {"base": {d: evaluate(model, ex, **kw)[0] for d, ex in data.items()}}
    peft_model = None
    for a in adapters:
        path = _local_dir(store, f"adapters/{a}")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=a)
        else:
            peft_model.load_adapter(path, adapter_name=a)
        peft_model.set_adapter(a)
        loss[a] = {d: evaluate(peft_model, ex, **kw)[0] for d, ex in data.items()}
    models = ["base"] + list(adapters)
    return {"models": models, "datasets": list(data), "loss": loss,
            "ppl": {m: {d: ppl(v) for d, v in loss[m].items()} for m in models},
            "n_examples": {d: len(ex) for d, ex in data.items()}}


def run_eval_matrix(cfg, store, adapters: list[str]) -> dict:
    import ray
    r = cfg.resources
    opts = {"num_cpus": r.cpus_per_trial, "num_gpus": r.gpus_per_trial if r.device == "cuda" else 0}
    matrix = ray.get(ray.remote(**opts)(compute_matrix).remote(cfg.model_dump(mode="json"), list(adapters)))
    store.write_json("eval/matrix.json", matrix)
    log.info("eval matrix written to %s", store.uri_of("eval/matrix.json"))
    return matrix
