"""Training stage: one QLoRA adapter per domain, as Ray Tune trials: each runs one training worker
(pipeline.train.worker; resources.workers_per_trial 1, the default) or a Ray Train TorchTrainer with
resources.workers_per_trial workers.

    run_train(cfg) -> dict[domain, dict]   each value: the training report plus "status"
                                           ("finished" | "failed" | "skipped") and "error"

Modules: data (Ray Data reading and tokenizing the SFT shards, the per-epoch plan), loop (the
per-worker recipe), sessions (where checkpoints and reports go), replicas (a domain's workers), identity
(what identifies a domain's training), faults (test fault injection), worker (a one-worker trial),
backend (a TorchTrainer's torch backend), schedule (trials), export (adapters/<domain>/), preview (`prepare --show-examples`). The model,
tokenization, kernels and device checks it shares with the evaluation are pipeline.lm. Training does not
evaluate the adapters on the test splits: that is the eval stage (pipeline.eval, `adapters eval`), which
`adapters run` runs next.
"""
from __future__ import annotations

import logging

from pipeline.lm.tiny import ensure_tiny
from pipeline.raycluster import ensure_ray
from pipeline.redaction import scrub
from pipeline.storage import open_store
from pipeline.train.export import export_merged, upload_to_hub
from pipeline.train.schedule import run_domains

log = logging.getLogger(__name__)


def run_train(cfg) -> dict[str, dict]:

    store = open_store(cfg)
    ensure_ray(cfg)
    if cfg.model.base == "tiny":
        ensure_tiny(cfg, store)
    results = run_domains(cfg, store)
    done = [d for d, r in results.items() if r.get("status") == "finished"]
    if cfg.train.merge_export:
        for d in done:
            try:
                results[d]["merged_uri"] = export_merged(cfg, d, store)
            except Exception as e:
                log.error("merged export of %s failed: %s", d, e)
                results[d]["merged_error"] = str(e)
    if cfg.hub.repo_id:
        for d in done:
            try:
                results[d]["hub_repo"] = upload_to_hub(cfg, d, store)
                log.info("domain %s: adapter uploaded to the Hugging Face Hub: %s", d, results[d]["hub_repo"])
            except Exception as e:  # noqa: BLE001 - the adapter is saved; the upload can be repeated
                log.error("domain %s: upload to the Hub (%s) failed: %s", d, cfg.hub.repo_id.format(domain=d),
                          scrub(str(e))[:500])
                results[d]["hub_error"] = scrub(str(e))[:2000]
    for d, r in results.items():
        log.info("domain %s: %s%s", d, r.get("status"),
                 f" val_loss {r['val_loss']:.4f} (base {r['base_val_loss']:.4f})" if r.get("status") == "finished"
                 else f" ({(r.get('error') or '').splitlines()[0][:300]})")
    return results
