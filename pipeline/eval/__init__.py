"""Evaluation stage (`adapters eval`, and `adapters run` after train): the base model and every finished
adapter on every domain's test split. Training does not evaluate; this stage does, on its own.

    run_eval_stage(cfg, train_command=None) -> matrix dict (None when off or nothing to evaluate)
        the stage: the finished adapters (pipeline.status's words), skipped when eval/matrix.json is up to
        date (``fingerprint``) without starting Ray; with ``train_command`` (`adapters eval`) "no finished
        adapter" is a usage error naming that command; without (`adapters run`) it is logged, and the run
        goes on to the report
    run_eval(cfg, store, adapters) -> matrix dict (None when there is nothing to evaluate)
        writes eval/scores/<model>/<dataset>.parquet (one row per test item) and eval/matrix.json

Modules: plan (which test rows, how each is scored: from the sources' declared tasks), tasks (each task
kind's scorer: its sequences, its metrics, its counts), scoring (the model side: packed log-likelihoods,
generation), metrics (ROUGE-L, token F1), stats
(bootstrap intervals, paired tests), matrix (cells, comparisons, verdicts), generate
(`adapters generate`).

How it runs: the driver plans (reads the test splits, picks the samples), then Ray tasks score, one
per group of models (``eval.workers``; auto: one per GPU on CUDA, one on the CPU). Each task loads the
base model once (4-bit as configured; CUDA checked on its node, no CPU fallback), tokenizes each
dataset once, then switches models with PEFT (``load_adapter`` / ``set_adapter``; the base model is the
same weights with ``disable_adapter()``): reloading a 7B base per adapter costs more than scoring a
test split, and the adapters' weights are small. One INFO line per model x dataset. A re-run whose
adapters, data and eval settings are unchanged (``fingerprint``) keeps the existing matrix and starts no
Ray; a change to any of them (an adapter retrained, --set eval.seed=..., other test data) re-runs it.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Optional

from pipeline import layout
from pipeline.errors import UsageError
from pipeline.eval.harness import run_harness
from pipeline.eval.matrix import build_matrix, example_rows
from pipeline.eval.plan import plan_dataset
from pipeline.eval.scoring import BaseAndAdapters, score_items, summary_line, TokenizedPlan
from pipeline.fingerprint import fingerprint as fingerprint_of
from pipeline.lm.compat import compat_record
from pipeline.lm.device import worker_device
from pipeline.lm.kernels import apply_fused_kernels
from pipeline.lm.model import load_model, load_tokenizer, resolve_base
from pipeline.raycluster import ensure_ray
from pipeline.sources import registry
from pipeline.status import domain_state
from pipeline.storage import open_store

log = logging.getLogger(__name__)


def task_logging() -> None:
    """INFO lines of a Ray task reach the driver's console (its stdout is forwarded)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)


def evaluate_models(cfg, plans: list, names: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Ray task: score the models `names` ("base" and/or adapter names) on every plan; model -> dataset -> results."""
    import torch
    task_logging()
    device = worker_device(cfg)
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    store = open_store(cfg)
    base = resolve_base(cfg, store)
    tok = load_tokenizer(base, cfg)
    model = load_model(base, cfg, device)
    apply_fused_kernels(model, device, cfg.train.fused_kernels)
    tokenized = {p.domain: TokenizedPlan(tok, p, cfg.train, cfg.eval.max_new_tokens) for p in plans}
    out: dict[str, dict[str, list[dict]]] = {}
    models = BaseAndAdapters(model, store)
    for name in names:
        who, t_model = "base model" if name == "base" else f"{name} adapter", time.time()
        with models.use(name) as target:
            for p in plans:
                t0 = time.time()
                res = score_items(target, tok, tokenized[p.domain], p, device, cfg.eval, cfg.train,
                                  side_by_side=name in ("base", p.domain))
                out.setdefault(name, {})[p.domain] = res
                # every cell is in eval/matrix.json; the console gets one progress line per model (below)
                log.debug("eval: %s on %s test (%d items): %s (%.1fs)", who, p.domain, len(p.items),
                          summary_line(p, res), time.time() - t0)
        own = out[name].get(name)
        log.info("eval: %s done on %d test set(s) in %.1fs%s", who, len(plans), time.time() - t_model,
                 f"; own domain: {summary_line(next(p for p in plans if p.domain == name), own)}" if own else "")
    return out


def model_groups(cfg, models: list[str]) -> list[list[str]]:
    """Models split over eval.workers tasks (auto: the GPUs the cluster has on CUDA, else one)."""
    n = cfg.eval.workers
    if n == "auto":
        n = 1
        if cfg.resources.device == "cuda":
            import ray
            n = int(ray.cluster_resources().get("GPU", 0) // max(cfg.resources.gpus_per_trial, 1e-9)) or 1
    n = max(1, min(int(n), len(models)))
    return [models[i::n] for i in range(n)]


# lm-eval's settings: they decide eval/harness.json (pipeline/eval/harness.py), not the matrix
HARNESS_SETTINGS = {"harness_tasks", "harness_include_path", "harness_limit", "harness_batch_size"}


def fingerprint(cfg, store, adapters: list[str]) -> str:
    """What decides the matrix: eval settings (not lm-eval's harness_*: harness.json has its own), prompt
    format, base model, data, each adapter's report."""
    manifest = store.read_json_or(layout.MANIFEST) or {}
    reports = {a: hashlib.sha256(store.read_bytes(layout.training_report(a))).hexdigest() for a in adapters}
    d = {"eval": cfg.eval.model_dump(mode="json", exclude=HARNESS_SETTINGS), "compat": compat_record(cfg, cfg.domains[0]),
         "domains": cfg.domains, "data": manifest.get("fingerprint"), "adapters": reports}
    return fingerprint_of(d)


def run_eval(cfg, store, adapters: list[str]) -> Optional[dict]:
    import pyarrow as pa
    import ray
    t0 = time.time()
    reg = registry(cfg.data)
    plans = [p for p in (plan_dataset(cfg, store, d, reg) for d in cfg.domains) if p is not None]
    if not plans:
        log.warning("eval: no domain has test rows under %s: nothing to evaluate", store.uri_of(layout.sft()))
        return None
    fp = fingerprint(cfg, store, adapters)   # run_eval_stage has found the matrix out of date (or missing)
    models = ["base"] + list(adapters)
    groups = model_groups(cfg, models)
    r = cfg.resources
    opts = {"num_cpus": r.cpus_per_trial, "num_gpus": r.gpus_per_trial if r.device == "cuda" else 0}
    log.info("eval: %d model(s) on %d test set(s) (%s) in %d Ray task(s)", len(models), len(plans),
             ", ".join(f"{p.domain} {len(p.items)}" for p in plans), len(groups))
    plans_ref = ray.put(plans)
    task = ray.remote(**opts)(evaluate_models)
    results: dict[str, dict[str, list[dict]]] = {}
    for part in ray.get([task.remote(cfg, plans_ref, g) for g in groups]):
        results.update(part)
    scores = {m: {p.domain: example_rows(p, results[m][p.domain]) for p in plans} for m in models}
    for m, per in scores.items():
        for d, rows in per.items():
            store.write_table(layout.eval_scores(m, d), pa.Table.from_pylist(rows))
    matrix = build_matrix(plans, scores, cfg.eval)
    matrix.update(fingerprint=fp, wall_time_s=time.time() - t0)
    store.write_json(layout.EVAL_MATRIX, matrix)
    for d, v in matrix["verdicts"].items():
        log.info("eval: %s adapter vs base on %s: %s %s (difference %s, p=%s)", d, d, v["metric"], v["verdict"],
                 "n/a" if v["difference"] is None else f"{v['difference']:+.4f}", "n/a" if v["p"] is None else f"{v['p']:.3g}")
    log.info("eval: written to %s in %.1fs", store.uri_of(layout.EVAL_MATRIX), time.time() - t0)
    return matrix


def finished_adapters(cfg, store) -> list[str]:
    """The selected domains whose adapter is finished, as `adapters status` says it (a later failed or
    interrupted attempt of this run outranks an older adapter)."""
    return [d for d in cfg.domains if domain_state(store, cfg.run_name, d).state == "finished"]


def run_eval_stage(cfg, train_command: Optional[str] = None) -> Optional[dict]:
    """The evaluation stage. Off with eval.enabled: false (or the older train.eval_matrix: false)."""
    if not cfg.eval.enabled or not cfg.train.eval_matrix:
        log.info("eval: off (%s: false)", "eval.enabled" if not cfg.eval.enabled else
                 "train.eval_matrix; the evaluation's settings are now under eval:, e.g. eval.enabled")
        return None
    store = open_store(cfg)
    adapters = finished_adapters(cfg, store)
    if not adapters:
        where = store.uri_of(layout.ADAPTERS)
        if train_command:
            raise UsageError(f"no finished adapter of {', '.join(cfg.domains)} under {where}: run `{train_command}` "
                             "first (`adapters status` shows each domain's state)")
        log.warning("eval: no finished adapter under %s: nothing to evaluate", where)
        return None
    # the up-to-date check reads only files: a re-run with nothing changed starts no Ray
    if up_to_date(cfg, store, adapters):
        log.info("eval: %s is up to date (same adapters, data and eval settings): kept",
                 store.uri_of(layout.EVAL_MATRIX))
        matrix = store.read_json(layout.EVAL_MATRIX)
    else:
        ensure_ray(cfg)
        matrix = run_eval(cfg, store, adapters)
    if cfg.eval.harness_tasks:   # lm-eval's standard benchmarks (pipeline/eval/harness.py): kept when unchanged
        run_harness(cfg, store, adapters)
    return matrix


def up_to_date(cfg, store, adapters: list[str]) -> bool:
    """Whether eval/matrix.json was made from these adapters, this data and these eval settings."""
    old = store.read_json_or(layout.EVAL_MATRIX)
    return isinstance(old, dict) and old.get("fingerprint") == fingerprint(cfg, store, adapters)
