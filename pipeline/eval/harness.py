"""Standard benchmarks through lm-evaluation-harness (the optional [harness] extra): lm-eval's own tasks
(``eval.harness_tasks``, e.g. medmcqa, pubmedqa) on the base model and on every finished domain adapter.

    check_tasks(cfg) -> None                       ConfigError naming unknown tasks or a missing lm-eval
    run_harness(cfg, store, domains) -> list[HarnessRow]
        writes eval/harness.json (settings, the rows, the `lm_eval` command that reproduces each model's
        numbers) and eval/harness/<model>.json (lm-eval's own results: task configs, versions, n-samples)

The numbers are lm-eval's, computed by lm-eval: its task definitions (prompts, few-shot counts, splits,
metrics) and its HF model (``lm_eval.models.huggingface.HFLM``), loading the base model by name or path
with ``peft=<adapter folder>`` for an adapter, exactly as ``lm_eval --model hf --model_args
pretrained=BASE,peft=ADAPTER,dtype=...`` does. So they compare with published lm-eval numbers for the same
task, model and precision (unless ``eval.harness_limit`` cuts the rows). The base is loaded in the compute
dtype (bfloat16 on a GPU, float32 on the CPU), not in 4-bit: lm-eval 0.4 passes 4-bit settings to
``from_pretrained`` as ``load_in_4bit``, which transformers 5 no longer takes, and published numbers are
made unquantized. Loading per model (no adapter switching on one base, as pipeline/eval does) is the price
of running lm-eval's own code path.

Runs as Ray tasks (spread over ``eval.workers`` like the matrix), each model loaded on the task's node
(CUDA checked there, no CPU fallback). A local task folder (``eval.harness_include_path``) is read here and
written out on that node, so its tasks need no shared file system. Offline (``OFFLINE`` / ``HF_HUB_OFFLINE``
/ ``HF_DATASETS_OFFLINE``, data.download.offline) the task never touches the network; a task whose dataset
is on the Hugging Face Hub and not in the local datasets cache then fails naming the task and the fix.
A re-run with the same models, tasks and settings keeps eval/harness.json.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict

from pipeline import layout
from pipeline.config import ConfigError
from pipeline.errors import UserFacingError, find_cause
from pipeline.lm.device import worker_device
from pipeline.lm.model import resolve_base
from pipeline.raycluster import ensure_ray
from pipeline.storage import open_store

log = logging.getLogger(__name__)

INSTALL = "pip install -e '.[harness]' (or pip install 'lm-eval>=0.4.9,<0.5')"
MAX_INCLUDE_MB = 64   # task YAMLs and small local data; larger data belongs where every node reads it
# library loggers quieted to warnings in the task: their INFO lines (per request batch) would bury the pipeline's
QUIET = ("lm-eval", "lm_eval", "datasets", "evaluate")


class HarnessError(UserFacingError):
    """lm-eval could not run a task: the message names the task, the cause and the fix."""


class HarnessRow(BaseModel):
    """One metric of one lm-eval task for one model ("base" or a domain's adapter)."""
    model_config = ConfigDict(frozen=True)
    model: str
    task: str
    metric: str
    filter: str              # lm-eval's filter name ("none" for plain scoring)
    value: float
    stderr: Optional[float]  # lm-eval's own standard error (None where it gives none)
    n: Optional[int]         # rows scored (a group's: None)
    num_fewshot: Optional[int] = None


# ---- the driver side --------------------------------------------------------------------------------

def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"eval.harness_tasks needs lm-evaluation-harness, which is not installed ({e}): {INSTALL}") from None
    return lm_eval, TaskManager


def _include_dir(cfg) -> Optional[Path]:
    p = cfg.eval.harness_include_path
    if p is None:
        return None
    d = Path(p)
    if not d.is_dir() or not any(d.rglob("*.yaml")):
        raise ConfigError(f"eval.harness_include_path: no folder of task YAMLs at {d}: point it at a folder holding "
                          "lm-eval task YAMLs (lm-eval's own format)")
    return d


def check_tasks(cfg) -> None:
    """Every name in eval.harness_tasks is a task or group lm-eval knows (its own, and those in
    eval.harness_include_path); otherwise a ConfigError naming them, the closest names and how to list all."""
    if not cfg.eval.harness_tasks:
        return
    _, TaskManager = _lm_eval()
    inc = _include_dir(cfg)
    tm = TaskManager(include_path=str(inc) if inc else None)
    known = set(tm.all_tasks)
    unknown = [t for t in cfg.eval.harness_tasks if t not in known]
    if unknown:
        near = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        hints = "; ".join(f"{t}: did you mean {', '.join(m)}?" for t, m in near.items() if m)
        raise ConfigError(f"eval.harness_tasks: lm-eval knows no task {', '.join(repr(t) for t in unknown)}"
                          + (f" ({hints})" if hints else "")
                          + "; `lm-eval ls tasks` lists them"
                          + (f" (with --include_path {inc})" if inc else "; a local task needs eval.harness_include_path"))


def _include_files(inc: Optional[Path]) -> dict[str, bytes]:
    """The task folder's files (relative path -> bytes), to be written out on the evaluating node."""
    if inc is None:
        return {}
    files = {str(f.relative_to(inc)): f for f in sorted(inc.rglob("*"))
             if f.is_file() and "__pycache__" not in f.parts}
    total = sum(f.stat().st_size for f in files.values())
    if total > MAX_INCLUDE_MB << 20:
        raise ConfigError(f"eval.harness_include_path {inc} holds {total / 2**20:.0f} MB; it is shipped to the "
                          f"evaluating node, so keep it under {MAX_INCLUDE_MB} MB (task YAMLs and small data) and "
                          "point larger data_files at paths every node can read")
    return {k: f.read_bytes() for k, f in files.items()}


def _offline(cfg) -> bool:
    return bool(cfg.data.download.offline) or any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def model_args(cfg, store, name: str) -> str:
    """lm-eval's --model_args for `name` as a person re-runs it (the output's URIs, not a node's temp folder)."""
    base = store.uri_of("base_model") if cfg.model.base == "tiny" else cfg.model.base
    parts = [f"pretrained={base}"]
    if cfg.model.revision and cfg.model.base != "tiny":
        parts.append(f"revision={cfg.model.revision}")
    if name != "base":
        parts.append(f"peft={store.uri_of(layout.adapter(name))}")
    parts.append(f"dtype={_dtype_name(cfg)}")
    return ",".join(parts)


def _dtype_name(cfg, device: Optional[str] = None) -> str:
    device = device or cfg.resources.device
    if device == "cpu":
        return "float32"
    return {"auto": "bfloat16"}.get(cfg.model.compute_dtype, cfg.model.compute_dtype)


def command_line(cfg, store, name: str) -> str:
    """The `lm_eval` command whose numbers these are."""
    import shlex
    e = cfg.eval
    parts = ["lm_eval", "--model", "hf", "--model_args", model_args(cfg, store, name),
             "--tasks", ",".join(e.harness_tasks), "--batch_size", str(e.harness_batch_size)]
    if e.harness_include_path:
        parts += ["--include_path", e.harness_include_path]
    if e.harness_limit:
        parts += ["--limit", str(e.harness_limit)]
    return shlex.join(parts)


def fingerprint(cfg, store, domains: list[str], files: dict[str, bytes]) -> str:
    """What decides the numbers: tasks, their local files, limit, lm-eval's version, the base, each adapter."""
    import importlib.metadata as md
    reports = {d: hashlib.sha256(store.read_bytes(layout.training_report(d))).hexdigest() for d in domains}
    base = store.read_json_or(layout.TINY_META, {}).get("fingerprint") if cfg.model.base == "tiny" else None
    d = {"tasks": cfg.eval.harness_tasks, "limit": cfg.eval.harness_limit, "lm_eval": md.version("lm_eval"),
         "files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
         "base": [cfg.model.base, cfg.model.revision, base, _dtype_name(cfg)], "adapters": reports}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_harness(cfg, store, domains: list[str]) -> list[HarnessRow]:
    """lm-eval's tasks on the base model and on each of `domains`' finished adapters (Ray started if needed);
    the rows, also written to eval/harness.json (and kept when nothing that decides them changed)."""
    import ray
    missing = [d for d in domains if (store.read_json_or(layout.training_report(d)) or {}).get("status") != "finished"]
    if missing:
        raise UserFacingError(f"harness: no finished adapter for {', '.join(missing)} under {store.uri_of('adapters')}: "
                              "train first")
    files = _include_files(_include_dir(cfg))
    fp = fingerprint(cfg, store, domains, files)
    old = store.read_json_or(layout.HARNESS_JSON)
    if isinstance(old, dict) and old.get("fingerprint") == fp:
        log.info("harness: %s is up to date (same models, tasks and settings): kept", store.uri_of(layout.HARNESS_JSON))
        return [HarnessRow(**r) for r in old.get("rows") or []]
    check_tasks(cfg)            # lm-eval's task index (seconds to build): only when the tasks will run
    ensure_ray(cfg)             # only now: unchanged results above start no Ray
    t0 = time.time()
    models = ["base"] + list(domains)
    from pipeline.eval import model_groups   # the eval package imports this module at its top
    groups = model_groups(cfg, models)
    r = cfg.resources
    opts = {"num_cpus": r.cpus_per_trial, "num_gpus": r.gpus_per_trial if r.device == "cuda" else 0}
    log.info("harness: lm-eval task(s) %s on %d model(s) in %d Ray task(s)%s", ", ".join(cfg.eval.harness_tasks),
             len(models), len(groups), f", {cfg.eval.harness_limit} rows per task" if cfg.eval.harness_limit else "")
    task = ray.remote(**opts)(harness_models)
    files_ref = ray.put(files)
    out: dict[str, dict] = {}
    try:
        for part in ray.get([task.remote(cfg, g, files_ref, _offline(cfg)) for g in groups]):
            out.update(part)
    except ray.exceptions.RayTaskError as e:
        said = find_cause(e, lambda x: isinstance(x, (UserFacingError, ConfigError)))
        if said is None:
            raise
        raise said from None   # its own message, not the task's traceback
    rows: list[HarnessRow] = []
    for m in models:
        rows += results_rows(m, out[m])
        store.write_json(layout.harness_results(m), out[m])
    store.write_json(layout.HARNESS_JSON, {
        "fingerprint": fp, "tasks": cfg.eval.harness_tasks, "limit": cfg.eval.harness_limit,
        "include_path": cfg.eval.harness_include_path, "models": models,
        "lm_eval_version": out["base"].get("lm_eval_version"),
        "commands": {m: command_line(cfg, store, m) for m in models},
        "rows": [x.model_dump() for x in rows], "wall_time_s": round(time.time() - t0, 1)})
    log.info("harness: %d row(s) written to %s in %.1fs", len(rows), store.uri_of(layout.HARNESS_JSON), time.time() - t0)
    return rows


def results_rows(model: str, res: dict) -> list[HarnessRow]:
    """lm-eval's results dict ({"results": {task: {"acc,none": .., "acc_stderr,none": ..}}, "n-samples": ..})
    as rows: one per task, metric and filter; a group's aggregate rows too."""
    def number(x) -> Optional[float]:   # lm-eval writes "N/A" (or NaN) where it has no figure
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None

    rows = []
    n_samples = res.get("n-samples") or {}
    n_shot = res.get("n-shot") or {}
    for task, metrics in (res.get("results") or {}).items():
        n = (n_samples.get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            if number(value) is None:
                log.warning("harness: %s: %s %s is %s (no rows scored?): left out", model, task, metric, value)
                continue
            rows.append(HarnessRow(model=model, task=task, metric=metric, filter=filt, value=float(value),
                                   stderr=number(metrics.get(f"{metric}_stderr,{filt}")),
                                   n=int(n) if n is not None else None,
                                   num_fewshot=n_shot.get(task) if isinstance(n_shot.get(task), int) else None))
    return rows


# ---- the Ray task ---------------------------------------------------------------------------------------

def harness_models(cfg, names: list[str], files: dict[str, bytes], offline: bool) -> dict[str, dict]:
    """Ray task: lm-eval's tasks on each of `names` ("base" or a domain); model -> lm-eval's results (JSON-safe)."""
    import torch
    from pipeline.eval import task_logging   # the eval package imports this module at its top
    task_logging()
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    if offline:
        _offline_now()
    # lm-eval bootstraps some metrics' standard errors (perplexity, F1, BLEU, ...) in a forked process pool.
    # Forked from a Ray worker, whose other threads may hold locks at that moment, a child can wait for good
    # and the pool's clean-up with it (seen in CI). With DISABLE_MULTIPROC it bootstraps in this process.
    os.environ["DISABLE_MULTIPROC"] = "1"
    lm_eval, TaskManager = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    device = worker_device(cfg)
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    store = open_store(cfg)
    base = resolve_base(cfg, store)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="harness-tasks-") as inc:
        for rel, data in files.items():
            (Path(inc) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(inc) / rel).write_bytes(data)
        tm = TaskManager(include_path=inc if files else None)
        load_datasets(cfg.eval.harness_tasks, tm, offline)   # a Hub dataset out of reach fails before any model loads
        for name in names:
            t0 = time.time()
            who = "base model" if name == "base" else f"{name} adapter"
            with contextlib.ExitStack() as stack:   # an adapter on S3: a local copy while lm-eval loads it
                adapter = stack.enter_context(store.local_copy(layout.adapter(name))) if name != "base" else None
                lm = HFLM(pretrained=base,
                          revision=cfg.model.revision if base == cfg.model.base and cfg.model.revision else "main",
                          peft=adapter, device=device, dtype=_dtype_name(cfg, device),
                          batch_size=cfg.eval.harness_batch_size, trust_remote_code=bool(cfg.model.trust_remote_code))
            res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.eval.harness_tasks), task_manager=tm,
                                          limit=cfg.eval.harness_limit, log_samples=False)
            keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
            out[name] = json.loads(json.dumps({k: res.get(k) for k in keep}, default=str))
            out[name]["lm_eval_version"] = lm_eval.__version__
            log.info("harness: %s done in %.1fs: %s", who, time.time() - t0, "; ".join(
                f"{r.task} {r.metric} {r.value:.4f}" for r in results_rows(name, out[name]) if r.filter == "none")[:600])
            del lm
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def load_datasets(tasks: list[str], tm, offline: bool) -> None:
    """Build lm-eval's tasks (which loads their datasets) once, so that a dataset out of reach is said plainly:
    which task, that it is on the Hub, and what to do."""
    if offline:
        _offline_now()
    try:
        tm.load(list(tasks))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for one cause; the chain is searched
        hub = find_cause(e, _is_hub_error)
        if hub is None:
            raise
        mode = ("offline mode is on (OFFLINE / HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, data.download.offline) and it is "
                "not in the local datasets cache" if offline else "the Hub could not be reached")
        raise HarnessError(f"harness: lm-eval task(s) {', '.join(tasks)} read their dataset from the Hugging Face Hub and "
                           f"{mode} ({type(hub).__name__}: {str(hub)[:300]}). Run once with network access (the "
                           "dataset is cached for later offline runs; HF_DATASETS_CACHE says where), or run a local task: "
                           "a task YAML in eval.harness_include_path whose data are local files") from None


def _offline_now() -> None:
    """Offline from here on in this process. datasets and huggingface_hub read HF_DATASETS_OFFLINE and
    HF_HUB_OFFLINE once, at import, and a reused Ray worker (or a test process) may have imported them
    already: their module settings are set too."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import datasets.config
    import huggingface_hub.constants
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _is_hub_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError",
                         "DatasetNotFoundError", "ConnectTimeout", "ProxyError"})
