"""Ray Tune over the domains: one trial per domain, each running one training worker (pipeline.train.worker,
resources.workers_per_trial 1, the default) or a TorchTrainer with resources.workers_per_trial workers.

    run_domains(cfg, store) -> dict[domain, dict]

- A domain whose adapters/<domain>/training_report.json carries this run's TrainingIdentity (training
  settings, the base model's fingerprint, the domain's SFT data; pipeline/train/identity.py) is skipped
  (finished earlier); one whose
  identity differs is trained again, with a line saying what changed; a domain without SFT train
  shards is recorded as skipped. adapters/ is shared by every run_name: a trial leaves the adapter
  there until its own export replaces it, so a failing run never turns another run's finished domain
  into "not started".
- Before any trial starts, each domain's latest checkpoint under runs/<run_name>/train/<domain>/
  is checked against the config: another base model, LoRA shape or data layout is a clear error.
- Trials: GPU per trial on CUDA clusters, CPU on CPU-only; resources.max_concurrent_trials, else as
  many at once as the cluster holds (queued otherwise). A worker that fails is retried from its last
  checkpoint up to train.max_failures times. A failing domain is recorded as failed with its cause
  and does not stop the others.
- Outcome: runs/<run_name>/domains/<domain>.json {"domain", "state", "error", "updated", "heartbeat", "pid",
  "host", "val_loss", "adapter_uri"}, written by pipeline.status.write_outcome; state is running (heartbeat
  refreshed every HEARTBEAT_S by the trial; pid/host are the driver's), finished, failed, skipped or
  interrupted (Ctrl-C: the driver marks every unfinished domain and re-raises). Results come back through
  the Store, read by pipeline.status.domain_state (the DomainOutcome: state file, training report and a
  worker's fatal error), not Result.metrics.
- Metrics: every report of the training workers reaches the Tune trial (TuneReportCallback), so the
  dashboard's trial table and Tune's TensorBoard / CSV / JSON loggers under runs/<run_name>/tune/ carry
  train_loss, val_loss, tokens_per_s, step (timesteps_total = step: the loggers' x-axis); tracking.mlflow and
  tracking.wandb add Ray's MLflow and W&B logger callbacks (tracking_callbacks).
- Secrets: Ray Tune copies AWS_* credentials from the driver's environment into each trial actor's
  runtime_env, which Ray writes to its logs. Their names are taken out of the set Tune copies while it
  runs (the driver keeps them for Tune's own storage calls); the trials get them from the environment
  their node already has. WANDB_API_KEY, which Ray's W&B callback would put in its logging actor's
  runtime_env, reaches that actor as a constructor argument instead (_wandb_callback).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Iterator, Optional

from ray.exceptions import RayTaskError

from pipeline import layout
from pipeline.capacity import assess, read_capacity
from pipeline.errors import find_cause, no_space_message, UsageError, UserFacingError
from pipeline.redaction import is_secret_name
from pipeline.status import DomainOutcome, clear_fatal, domain_state, write_outcome
from pipeline.storage import open_store
from pipeline.train.data import sft_shards, tokenized_dataset
from pipeline.train.faults import FaultPlan, FAULTS_ENV
from pipeline.train.identity import IncompatibleCheckpointError, TrainingIdentity
from pipeline.train.loop import CHECKPOINT_SCORE, train_loop_per_worker
from pipeline.train.worker import START_TIMED_OUT, train_in_one_worker

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The Tune trial (a thin driver around the domain's worker or TorchTrainer) holds this much CPU, taken out of
# the trial's resources.cpus_per_trial so that N trials fit in N * cpus_per_trial CPUs.
TRIAL_CPU = 0.01
HEARTBEAT_S = 30.0
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"   # Ray Train's (v2) name for it


def write_state(store, cfg, domain: str, state: str, error: Optional[str] = None,
                report: Optional[dict] = None, driver: Optional[dict] = None) -> dict:
    return write_outcome(store, cfg.run_name, domain, state, error, report, driver)


def outcome(store, cfg, domain: str) -> DomainOutcome:
    return domain_state(store, cfg.run_name, domain)


def latest_checkpoint_state(store, cfg, domain: str) -> Optional[tuple[str, dict]]:
    best = None
    for rel in store.list_files(layout.checkpoints(cfg.run_name, domain), layout.CHECKPOINT_STATE):
        try:
            st = store.read_json(rel)
        except Exception:
            continue  # a checkpoint being written when a run died: not complete, not used
        if best is None or st.get("step", -1) > best[1].get("step", -1):
            best = (rel, st)
    return best


def _leftover_of_a_finished_adapter(o: DomainOutcome, ck_state: dict, identity: TrainingIdentity) -> bool:
    """Whether this run's checkpoints of `domain` are those of its finished adapter, now not current: this
    run finished the domain and nothing has run since (its state file says finished), and the latest
    checkpoint was made for another identity. Resuming from them would continue the old training (a
    changed learning rate would not retrain), or be refused as incompatible (a rebuilt base). The
    checkpoints of an attempt that did not finish are never discarded: those are resumed or refused."""
    return o.finished_report is not None and o.recorded == "finished" and not identity.made_by(ck_state)


def preflight(cfg, store) -> tuple[list[str], dict[str, dict]]:
    """(domains to train, results known without training). Raises UserFacingError on an
    incompatible checkpoint, before any trial starts."""
    todo: list[str] = []
    known: dict[str, dict] = {}
    problems = []
    prepared = (store.read_json_or(layout.MANIFEST) or {}).get("domains", {})
    for d in cfg.domains:
        o = outcome(store, cfg, d)
        rep = o.finished_report
        identity = TrainingIdentity.of(cfg, d, store)
        why = identity.why_not_current(rep)
        if why is None:
            log.info("domain %s: finished earlier (adapter %s): skipped", d, rep.get("adapter_uri"))
            write_state(store, cfg, d, "finished", report=rep)
            known[d] = {**rep, "status": "finished", "skipped": True}
            continue
        if rep:
            log.info("domain %s: the adapter finished earlier (%s) is not current: %s; training it again",
                     d, rep.get("adapter_uri"), why)
        missing = [s for s in SPLITS if not store.list_files(layout.sft(d, s), ".parquet")]
        rows = ((prepared.get(d) or {}).get("sft_rows") or {}).get("train")
        if "train" in missing or "val" in missing or rows == 0:
            msg = (f"no SFT data for domain {d} (missing splits {missing} under {store.uri_of(layout.sft(d))}); "
                   "run `adapters prepare` or remove the domain from `domains`" if missing else
                   f"prepare made no training examples for domain {d} ({(prepared.get(d) or {}).get('reason') or 'its sources gave no conversations to train on'}; "
                   f"see {layout.MANIFEST}); a text-only custom source gives corpus rows only")
            log.warning(msg)
            write_state(store, cfg, d, "skipped", error=msg)
            known[d] = {"domain": d, "status": "skipped", "error": msg}
            continue
        ck = latest_checkpoint_state(store, cfg, d)
        if ck is not None and _leftover_of_a_finished_adapter(o, ck[1], identity):
            log.info("domain %s: the checkpoints under %s are those of the adapter it replaces: training starts "
                     "from step 0", d, store.uri_of(layout.checkpoints(cfg.run_name, d)))
            store.delete(layout.checkpoints(cfg.run_name, d))   # Ray Train's own run state for it too
            ck = None
        if ck is not None:
            try:
                identity.check_resume(ck[1].get("compat", {}), store.uri_of(ck[0].rsplit("/", 1)[0]))
            except IncompatibleCheckpointError as e:
                problems.append(str(e))
        todo.append(d)
    if problems:
        raise UserFacingError("\n".join(problems))
    return todo, known


def max_concurrent(cfg, capacity=None) -> int:
    """resources.max_concurrent_trials, else as many trials as the cluster holds once its autoscaler
    has added what it can (not only the GPUs present at start), at most one per domain."""
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


@contextlib.contextmanager
def _heartbeat(store, cfg, domain: str, driver: dict) -> Iterator[None]:
    """Keep the domain's state file saying `running` with a fresh heartbeat while the trial runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                if outcome(store, cfg, domain).recorded != "running":
                    return  # the driver marked it (interrupted): do not overwrite that
                write_state(store, cfg, domain, "running", driver=driver)
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is not worth a failed domain
                log.warning("domain %s: heartbeat not written: %s", domain, e)

    write_state(store, cfg, domain, "running", driver=driver)
    thread = threading.Thread(target=beat, name=f"heartbeat-{domain}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _trial(params: dict, cfg, faults: Optional[str], driver: dict) -> None:
    """One domain, inside a Tune trial: one training worker (pipeline.train.worker), or a TorchTrainer with
    resources.workers_per_trial workers."""
    from ray import tune

    trial_started = time.time()
    domain = params["domain"]
    store = open_store(cfg)
    # an adapter already in adapters/<domain>/ (another run_name's, or made with other inputs) stays until
    # this trial's export replaces it: a trial that fails leaves it, and that run's state, as they were
    identity = TrainingIdentity.of(cfg, domain, store)
    clear_fatal(store, cfg.run_name, domain)
    r = cfg.resources
    cuda = r.device == "cuda"
    per_worker = {"CPU": max(TRIAL_CPU, r.cpus_per_trial - TRIAL_CPU), **({"GPU": r.gpus_per_trial} if cuda else {})}
    error = None
    with _heartbeat(store, cfg, domain, driver):
        try:
            if r.workers_per_trial == 1 and not r.ray_train_for_one_worker:
                sft_shards(store, domain)   # none for training: fail here, not in each attempt of the worker
                train_in_one_worker(cfg, domain, FaultPlan.parse(faults, domain), identity.fingerprint(), trial_started,
                                    per_worker, tune.report)
            else:
                _torch_trainer(cfg, domain, store, faults, identity, trial_started, per_worker).fit()
        except Exception as e:  # TrainingFailedError wraps the worker's exception
            cause = _user_facing_cause(e)
            error = f"{type(cause).__name__}: {cause}" if cause else _summarize(_worker_error(e))
            # a full disk (a checkpoint's upload, Ray Train's own files): the one line naming path and free space
            full = no_space_message(e, store.uri_of(layout.checkpoints(cfg.run_name, domain)))
            if full and not cause:
                error = f"{full}\n{error}"
            if START_TIMED_OUT in str(e):
                error = unplaced_workers(r, per_worker) + "\n" + error
    o = outcome(store, cfg, domain)
    if error and o.recorded == "interrupted":
        # the driver marked it on Ctrl-C / SIGTERM / SIGHUP: a terminal's Ctrl-C reaches this trial's workers
        # too, and their end is not the domain's failure (the same command resumes it)
        return
    if o.fatal:
        error = o.fatal
    report = None if error else identity.current(o.finished_report)
    if report is None and error is None:
        error = "training ended without an adapter (no training_report.json was written)"
    if error:
        write_state(store, cfg, domain, "failed", error=error[:4000])
        raise RuntimeError(f"domain {domain} failed: {error.splitlines()[0][:500]}")
    write_state(store, cfg, domain, "finished", report=report)


def _torch_trainer(cfg, domain: str, store, faults: Optional[str], identity: TrainingIdentity, trial_started: float,
                   per_worker: dict):
    """Ray Train for a trial of several workers (data parallel: its worker group, process group and
    checkpoint management), or of one with resources.ray_train_for_one_worker."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from pipeline.train.backend import trial_torch_config   # imports torch and ray at its top: in the trial only

    r = cfg.resources
    storage_path, fs = store.ray_storage(layout.checkpoints(cfg.run_name))
    # Ray Train (its controller reads it from this process's environment) waits this long for the worker
    # group's resources, then gives up; controller_failure_limit=0 below: it does not start over
    os.environ[WORKER_START_TIMEOUT_ENV] = str(r.worker_start_timeout_s)
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=trial_torch_config(cfg),   # the CUDA check first
        train_loop_config={"cfg": cfg, "domain": domain, "faults": FaultPlan.parse(faults, domain),
                           "fingerprint": identity.fingerprint(), "trial_started": trial_started},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.device == "cuda",
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=domain, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            # every checkpoint is reported with the val loss of its weights: Ray keeps the best
            # ones by it, and always the latest
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep, checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="min"),
            callbacks=[TuneReportCallback()]),   # the workers' metrics reach this Tune trial
        datasets={"sft": tokenized_dataset(store, domain, cfg)},
        # every worker reads all examples and takes its rows of each micro-batch (see loop.py)
        dataset_config=ray.train.DataConfig(datasets_to_split=[]))


def _worker_error(e: BaseException) -> str:
    """The error of a trial's worker as `Type: message`, then where it came from: a RayTaskError's own
    first line names the actor method and pid, not what went wrong."""
    inner = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {inner}\n{e}"
    return f"{type(e).__name__}: {e}"


def _user_facing_cause(e: BaseException) -> Optional[BaseException]:
    """The project's own error (a UserFacingError: the message names the node and the fix) inside what
    Ray Train raises, e.g. ControllerError -> RayTaskError -> CudaUnavailableError from the workers'
    device check at the worker group's start; None when there is none."""
    # a RayTaskError carrying a UserFacingError has `cause` itself: the original, not the wrapper, is the answer
    return find_cause(e, lambda x: isinstance(x, UserFacingError) and not hasattr(x, "cause"))


def unplaced_workers(r, per_worker: dict) -> str:
    """The cause line of a trial whose workers Ray could not place within resources.worker_start_timeout_s."""
    import ray
    try:
        avail = ray.available_resources()   # a resource all in use is left out of it
        free = {k: round(avail.get(k, 0.0), 3) for k in per_worker}
    except Exception:  # noqa: BLE001 - only for the message
        free = "unknown"
    want = ", ".join(f"{k} {v:g}" for k, v in per_worker.items())
    return (f"the trial's {r.workers_per_trial} worker(s) could not be placed within resources.worker_start_timeout_s="
            f"{r.worker_start_timeout_s:g}s: each waited for {{{want}}} on one node (free now: {free}); no node "
            f"offers it and the autoscaler, if any, did not add one. Check the cluster's node types and limits, "
            f"lower resources.cpus_per_trial / gpus_per_trial / workers_per_trial, or raise "
            f"resources.worker_start_timeout_s if nodes take longer to come up")


def check_resources(cfg, capacity=None) -> None:
    """Fail at once when no trial could ever be scheduled (Tune would wait forever); when none fits now
    but an autoscaler can add nodes, say so and go on: the queued trials are what it scales up for."""
    v = assess(capacity or read_capacity(), cfg.resources, len(cfg.domains))
    if v.state == "impossible":
        raise UserFacingError(f"{v.detail}: {v.fix}")
    log.info("%s%s", v.detail, f" ({v.fix})" if v.fix else "")


@contextlib.contextmanager
def secrets_kept_from_tune_trials() -> Iterator[None]:
    """Ray Tune copies the variables named in its ENV_VARS_TO_PROPAGATE (AWS_* credentials among them)
    from the driver's environment into every trial actor's runtime_env, which Ray writes to its logs. The
    credential names are taken out of that set while Tune runs. The driver keeps its environment: Tune's
    own calls to the run's storage on S3 (experiment state, a failed trial's error file) need it. The
    trials get the credentials from the environment their node already has (a local Ray's nodes inherited
    this process's at ray.init)."""
    try:
        from ray.tune.execution import class_cache
        copied = class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):  # not where Ray 2.60 keeps it: nothing to take out
        log.warning("Ray Tune's list of copied environment variables was not found; credentials in this "
                    "environment may reach the trials' runtime_env")
        yield
        return
    secret = {v for v in copied if is_secret_name(v)}
    copied -= secret   # in place: Tune reads the same set object when it starts each trial
    try:
        yield
    finally:
        copied |= secret


STARTUP_LINE_EVERY_S = 15.0


def startup_progress_callback(every_s: float = STARTUP_LINE_EVERY_S, clock=time.monotonic):
    """A Tune callback that breaks the silence before training shows its first step: at least every
    ``every_s`` one line per trial still starting (Ray's worker group, the model's load, tokenization:
    about a minute on a GPU node, see docs/PERFORMANCE.md), and one while no trial has started yet.
    Tune calls on_step_begin from its control loop several times a second, so no thread is needed."""
    from ray.tune import Callback

    class StartupProgress(Callback):
        def __init__(self):
            self.t0 = None
            self.started: dict[str, float] = {}    # domain -> when its trial started
            self.said: dict[str, float] = {}       # domain (or "" before any trial) -> last line
            self.done: set[str] = set()            # domains that reported (a step) or ended

        def on_step_begin(self, iteration, trials, **info):
            now = clock()
            if self.t0 is None:
                self.t0 = self.said[""] = now
            if not self.started and now - self.said[""] >= every_s:
                self.said[""] = now
                log.info("training: Ray Tune is starting the first trial (%.0fs)", now - self.t0)
            for d, t in self.started.items():
                if d not in self.done and now - self.said.get(d, t) >= every_s:
                    self.said[d] = now
                    log.info("domain %s: starting (%.0fs): Ray's worker group, the model's load and tokenization "
                             "come before the first step", d, now - t)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.config.get("domain", trial.trial_id), clock())

        def _end(self, trial) -> None:
            self.done.add(trial.config.get("domain", trial.trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._end(trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

    return StartupProgress()


def _tune_callbacks(cfg) -> list:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    loggers = [JsonLoggerCallback(), CSVLoggerCallback(), startup_progress_callback()]
    if cfg.train.tensorboard:
        from ray.tune.logger import TBXLoggerCallback
        loggers.append(TBXLoggerCallback())
    return loggers + tracking_callbacks(cfg)


def tracking_callbacks(cfg) -> list:
    """tracking.mlflow / tracking.wandb as Ray Tune's own logger callbacks; they run in this driver process
    (W&B: in an actor on this node). Every report carries `step` and `timesteps_total` (the training step),
    which MLflow's callback takes as the step; W&B's charts are set to plot against `step`."""
    out: list = []
    t = cfg.tracking
    if t.mlflow is not None:
        try:
            from ray.air.integrations.mlflow import MLflowLoggerCallback
            import mlflow  # noqa: F401
        except ImportError:
            raise UsageError("tracking.mlflow is set but mlflow is not installed: pip install -e '.[tracking]' "
                             "(or remove tracking.mlflow)") from None
        if t.mlflow.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked (it wants a database): a local file:// URI is asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        out.append(MLflowLoggerCallback(tracking_uri=t.mlflow.tracking_uri, experiment_name=t.mlflow.experiment,
                                        tags={"run_name": cfg.run_name, "base_model": cfg.model.base},
                                        save_artifact=t.mlflow.artifacts))
    if t.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("tracking.wandb is set but wandb is not installed: pip install -e '.[tracking]' "
                             "(or remove tracking.wandb)") from None
        if t.wandb.mode == "offline":
            os.environ.setdefault("WANDB_MODE", "offline")   # Ray's callback asks for an API key unless so
        out.append(_wandb_callback(cfg))
    return out


def _wandb_callback(cfg):
    """Ray's WandbLoggerCallback, with two changes. Ray puts WANDB_API_KEY into the logging actor's
    runtime_env, which Ray writes to its logs: here the key travels as an argument of the actor (not logged)
    and is set in that actor's own environment. And the charts' x-axis is the training step (`step`), not
    Tune's report count."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class StepAxisActor(_WandbLoggingActor):
        def __init__(self, *args, _api_key=None, **kwargs):
            if _api_key:
                os.environ["WANDB_API_KEY"] = _api_key
            super().__init__(*args, **kwargs)

        def run(self):
            init = self._wandb.init

            def init_with_step_axis(*a, **k):
                run = init(*a, **k)
                run.define_metric("step")
                run.define_metric("*", step_metric="step")
                return run
            self._wandb.init = init_with_step_axis   # this actor's own process
            return super().run()

    class Callback(WandbLoggerCallback):
        _logger_actor_cls = StepAxisActor

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            key = os.environ.pop("WANDB_API_KEY", None)
            try:
                super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs,
                                             **({"_api_key": key} if key else {}))
            finally:
                if key is not None:
                    os.environ["WANDB_API_KEY"] = key

    w = cfg.tracking.wandb
    where = {}
    if "://" not in cfg.output:
        # W&B writes its run files under `dir`; by default that is the trial's local folder, which Tune copies
        # to the output when the trial ends, before W&B has finished writing: the copy would lack the history
        where["dir"] = os.path.join(cfg.output, layout.run(cfg.run_name))
        os.makedirs(where["dir"], exist_ok=True)
    return Callback(project=w.project, entity=w.entity, mode=w.mode, group=cfg.run_name,
                    excludes=["domain", "timesteps_total"], upload_checkpoints=False, **where)


def mark_interrupted(store, cfg, domains: list[str]) -> None:
    for d in domains:
        if outcome(store, cfg, d).recorded not in ("finished", "failed", "skipped"):
            write_state(store, cfg, d, "interrupted", error="interrupted (Ctrl-C, SIGTERM or SIGHUP) before it finished; the same "
                        "command resumes it from its last checkpoint")


def run_domains(cfg, store) -> dict[str, dict]:
    from ray import tune
    todo, results = preflight(cfg, store)
    if todo:
        check_resources(cfg)
        storage_path, fs = store.ray_storage(layout.tune(cfg.run_name))
        trainable = tune.with_parameters(_trial, cfg=cfg, faults=os.environ.get(FAULTS_ENV),
                                         driver={"pid": os.getpid(), "host": socket.gethostname()})
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": TRIAL_CPU}),
            param_space={"domain": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(cfg), reuse_actors=False),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage_path,
                                      storage_filesystem=fs, failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=_tune_callbacks(cfg), verbose=0))
        # Ctrl-C reaches us as KeyboardInterrupt (Tune's own handler would let the trials run on), and
        # the loggers are ours only (train.tensorboard decides on the TensorBoard one)
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        try:
            with secrets_kept_from_tune_trials():
                tuner.fit()  # errors of single trials are in the state files
        except KeyboardInterrupt:
            mark_interrupted(store, cfg, todo)
            raise
    for d in cfg.domains:
        if d in results:
            continue
        o = outcome(store, cfg, d)
        rep = TrainingIdentity.of(cfg, d, store).current(o.finished_report)
        if rep is not None and o.recorded == "finished":
            results[d] = {**rep, "status": "finished"}
        else:
            err = (o.record or {}).get("error") or "the trial did not record a result"
            results[d] = {"domain": d, "status": "failed", "error": err}
            if o.recorded != "failed":
                write_state(store, cfg, d, "failed", error=err)
    return results
