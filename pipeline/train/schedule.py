"""Ray Tune over the domains: one trial per domain, each trial a TorchTrainer with one worker.

    run_domains(cfg, store) -> dict[domain, dict]

- A domain whose adapters/<domain>/training_report.json carries this config's fingerprint is
  skipped (finished earlier); a domain without SFT train shards is recorded as skipped.
- Before any trial starts, each domain's latest checkpoint under runs/<run_name>/train/<domain>/
  is checked against the config: another base model, LoRA shape or data layout is a clear error.
- Trials: GPU per trial on CUDA clusters, CPU on CPU-only; resources.max_concurrent_trials, else as
  many at once as the cluster holds (queued otherwise). FailureConfig(max_failures=train.max_failures)
  retries a worker from its last checkpoint. A failing domain is recorded as failed with its cause
  and does not stop the others.
- State: runs/<run_name>/domains/<domain>.json {"domain","state","error","updated","val_loss","adapter_uri"}.
  Results come back through the Store (training_report.json, state and fatal files), not Result.metrics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The Tune trial (a thin driver around the domain's TorchTrainer) holds this much CPU, taken out of
# the trial's resources.cpus_per_trial so that N trials fit in N * cpus_per_trial CPUs.
TRIAL_CPU = 0.01


def domain_fingerprint(cfg, domain: str) -> str:
    """What makes a finished adapter current: model, this domain's hyperparameters, data layout."""
    t = cfg.train
    d = {"model": cfg.model.model_dump(mode="json"), "hyper": cfg.hyper_for(domain),
         "train": {k: getattr(t, k) for k in ("max_seq_length", "packing", "mask_prompt", "chat_template", "seed",
                                              "gradient_checkpointing")}}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_rel(cfg, domain: str) -> str:
    return f"runs/{cfg.run_name}/domains/{domain}.json"


def write_state(store, cfg, domain: str, state: str, error: Optional[str] = None,
                report: Optional[dict] = None) -> dict:
    rec = {"domain": domain, "state": state, "error": error,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "val_loss": (report or {}).get("val_loss"), "adapter_uri": (report or {}).get("adapter_uri")}
    store.write_json(state_rel(cfg, domain), rec)
    return rec


def finished_report(store, cfg, domain: str) -> Optional[dict]:
    rep = store.read_json_or(f"adapters/{domain}/training_report.json")
    if rep and rep.get("status") == "finished" and rep.get("config_fingerprint") == domain_fingerprint(cfg, domain):
        return rep
    return None


def latest_checkpoint_state(store, cfg, domain: str) -> Optional[tuple[str, dict]]:
    best = None
    for rel in store.list_files(f"runs/{cfg.run_name}/train/{domain}", "train_state.json"):
        try:
            st = store.read_json(rel)
        except Exception:
            continue  # a checkpoint being written when a run died: not complete, not used
        if best is None or st.get("step", -1) > best[1].get("step", -1):
            best = (rel, st)
    return best


def preflight(cfg, store) -> tuple[list[str], dict[str, dict]]:
    """(domains to train, results known without training). Raises UserFacingError on an
    incompatible checkpoint, before any trial starts."""
    from pipeline.errors import UserFacingError
    from pipeline.train.loop import IncompatibleCheckpointError, check_compat, compat_record
    todo: list[str] = []
    known: dict[str, dict] = {}
    problems = []
    for d in cfg.domains:
        rep = finished_report(store, cfg, d)
        if rep is not None:
            log.info("domain %s: finished earlier (adapter %s): skipped", d, rep.get("adapter_uri"))
            write_state(store, cfg, d, "finished", report=rep)
            known[d] = {**rep, "status": "finished", "skipped": True}
            continue
        missing = [s for s in SPLITS if not store.list_files(f"data/sft/{d}/{s}", ".parquet")]
        if "train" in missing or "val" in missing:
            msg = (f"no SFT data for domain {d} (missing splits {missing} under {store.uri_of(f'data/sft/{d}')}); "
                   "run `adapters prepare` or remove the domain from `domains`")
            log.warning(msg)
            write_state(store, cfg, d, "skipped", error=msg)
            known[d] = {"domain": d, "status": "skipped", "error": msg}
            continue
        ck = latest_checkpoint_state(store, cfg, d)
        if ck is not None:
            try:
                check_compat(ck[1].get("compat", {}), compat_record(cfg, d), store.uri_of(ck[0].rsplit("/", 1)[0]))
            except IncompatibleCheckpointError as e:
                problems.append(str(e))
        todo.append(d)
    if problems:
        raise UserFacingError("\n".join(problems))
    return todo, known


def max_concurrent(cfg, capacity=None) -> int:
    """resources.max_concurrent_trials, else as many trials as the cluster holds once its autoscaler
    has added what it can (not only the GPUs present at start), at most one per domain."""
    from pipeline.capacity import assess, read_capacity
    r = cfg.resources
    if r.max_concurrent_trials:
        return r.max_concurrent_trials
    n = len(cfg.domains)
    v = assess(capacity or read_capacity(), r, n)
    return max(1, min(n, v.slots_max if v.slots_max is not None else n))


def _summarize(error: str) -> str:
    """Put the worker's own exception line first; keep the traceback after it."""
    lines = [x for x in error.strip().splitlines() if x.strip()]
    if len(lines) > 1 and "Traceback" in error:
        return f"{lines[-1].strip()}\n{error}"
    return error


def _trial(params: dict) -> None:
    """One domain: a TorchTrainer with one worker. Runs inside a Tune trial."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer
    from pipeline.config import Config
    from pipeline.storage import open_store
    from pipeline.train.data import tokenized_dataset
    from pipeline.train.loop import fatal_rel, train_loop_per_worker

    cfg = Config.model_validate(params["cfg"])
    domain = params["domain"]
    store = open_store(cfg)
    write_state(store, cfg, domain, "running")
    old = f"adapters/{domain}/training_report.json"
    if store.is_file(old):  # made with other settings: it no longer marks a current adapter
        store.write_bytes(f"adapters/{domain}/training_report.previous.json", store.read_bytes(old))
        store.delete(old)
    if store.exists(fatal_rel(cfg.run_name, domain)):
        store.delete(fatal_rel(cfg.run_name, domain))
    r = cfg.resources
    cuda = r.device == "cuda"
    per_worker = {"CPU": max(TRIAL_CPU, r.cpus_per_trial - TRIAL_CPU), **({"GPU": r.gpus_per_trial} if cuda else {})}
    storage_path, fs = store.ray_storage(f"runs/{cfg.run_name}/train")
    error = None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        datasets = {"sft": tokenized_dataset(store, domain, cfg)}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": params["cfg"], "domain": domain, "faults": params.get("faults"),
                               "fingerprint": domain_fingerprint(cfg, domain)},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=cuda, resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=domain, storage_path=storage_path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)),
            datasets=datasets)
        trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        error = _summarize(f"{type(e).__name__}: {e}")
    fatal = store.read_json_or(fatal_rel(cfg.run_name, domain))
    if fatal:
        error = fatal["error"]
    report = None if error else finished_report(store, cfg, domain)
    if report is None and error is None:
        error = "training ended without an adapter (no training_report.json was written)"
    if error:
        write_state(store, cfg, domain, "failed", error=error[:4000])
        raise RuntimeError(f"domain {domain} failed: {error[:1000]}")
    write_state(store, cfg, domain, "finished", report=report)


def check_resources(cfg, capacity=None) -> None:
    """Fail at once when no trial could ever be scheduled (Tune would wait forever); when none fits now
    but an autoscaler can add nodes, say so and go on: the queued trials are what it scales up for."""
    from pipeline.capacity import assess, read_capacity
    from pipeline.errors import UserFacingError
    v = assess(capacity or read_capacity(), cfg.resources, len(cfg.domains))
    if v.state == "impossible":
        raise UserFacingError(f"{v.detail}: {v.fix}")
    log.info("%s%s", v.detail, f" ({v.fix})" if v.fix else "")


def run_domains(cfg, store) -> dict[str, dict]:
    from ray import tune
    from pipeline.train.loop import FAULTS_ENV
    todo, results = preflight(cfg, store)
    if todo:
        check_resources(cfg)
        storage_path, fs = store.ray_storage(f"runs/{cfg.run_name}/tune")
        cfg_json = cfg.model_dump(mode="json")
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": TRIAL_CPU}),
            param_space={"domain": tune.grid_search(todo), "cfg": cfg_json, "faults": os.environ.get(FAULTS_ENV)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg), reuse_actors=False),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage_path,
                                      storage_filesystem=fs, failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=0))
        tuner.fit()  # errors of single trials are in the state files
    for d in cfg.domains:
        if d in results:
            continue
        rep = finished_report(store, cfg, d)
        st = store.read_json_or(state_rel(cfg, d)) or {}
        if rep is not None and st.get("state") == "finished":
            results[d] = {**rep, "status": "finished"}
        else:
            err = st.get("error") or "the trial did not record a result"
            results[d] = {"domain": d, "status": "failed", "error": err}
            if st.get("state") != "failed":
                write_state(store, cfg, d, "failed", error=err)
    return results
