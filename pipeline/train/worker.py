"""A one-worker trial without Ray Train (resources.workers_per_trial 1, the default).

    train_in_one_worker(cfg, domain, dataset, faults, fingerprint, trial_started, per_worker, report)

Written by hand because Ray Train's controller and worker group cost a trial ~15-20 s of its start on a
GPU node (docs/PERFORMANCE.md: the controller's constructor 8.5 s, the worker's init_train_context 3.3 s,
the dataset coordinator) and give a single worker nothing it needs: there is no process group to set up.
What they did for it is done here, in the same terms:

- the worker's resources are reserved in a placement group, waited for resources.worker_start_timeout_s
  (an autoscaler sees the demand; then the domain fails naming what could not be placed);
- one actor in it runs the recipe (pipeline.train.loop.run_worker) with a StoreSession: checkpoints in the
  run's storage, the best train.checkpoints_to_keep by val loss and the latest kept;
- the examples are read and tokenized in a task of their own (no Ray Data), started with the trial: while the
  actor's process starts and loads the model, and once for all attempts (a retry does not tokenize again);
  the task keeps them in the token cache (pipeline.train.data), and a later run reads them from there;
- its reports reach the Tune trial (the dashboard, Tune's loggers, MLflow / W&B);
- when it raises or its process dies, a new one resumes from the latest checkpoint, up to
  train.max_failures times (Train's FailureConfig).

Several workers per trial (data parallel) keep Ray Train's TorchTrainer (pipeline.train.schedule).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.storage import open_store
from pipeline.train.data import tokenized_examples
from pipeline.train.loop import CHECKPOINT_SCORE, run_worker, worker_marks
from pipeline.train.sessions import StoreSession

log = logging.getLogger(__name__)

REPORT_POLL_S = 1.0
# the words the trial's error carries when the worker could not be placed (Ray Train's, for several workers)
START_TIMED_OUT = "worker group startup timed out"


@ray.remote
class DomainWorker:
    """The domain's training worker: `train` runs the recipe; `reports` hands over what it reported since the
    last call (the actor runs both at once: max_concurrency=2)."""

    def __init__(self) -> None:
        self._reports: list[dict] = []
        self._lock = threading.Lock()

    def train(self, cfg, domain: str, examples: list, faults, fingerprint: Optional[str],
              trial_started: Optional[float]) -> None:
        """examples: [the ObjectRef of tokenized_examples] (in a list: Ray would wait for a bare one before
        this method starts, and the model would load only after it)."""
        marks = worker_marks(trial_started)
        session = StoreSession(open_store(cfg), cfg.run_name, domain, cfg.train.checkpoints_to_keep,
                               CHECKPOINT_SCORE, self._add)
        run_worker(cfg, domain, lambda: ray.get(examples[0]), session, faults, fingerprint, marks)

    def _add(self, metrics: dict) -> None:
        with self._lock:
            self._reports.append(metrics)

    def reports(self) -> list[dict]:
        with self._lock:
            out, self._reports = self._reports, []
        return out


def train_in_one_worker(cfg, domain: str, faults, fingerprint: Optional[str], trial_started: float,
                        per_worker: dict, report: Callable[[dict], None]) -> None:
    """Train `domain` in one worker holding `per_worker` ({"CPU": n, "GPU": m}); every report goes to `report`.
    Raises the worker's last error once train.max_failures retries are spent."""
    attempts = cfg.train.max_failures + 1
    examples = tokenized_examples.remote(cfg, domain)
    for attempt in range(1, attempts + 1):
        pg = placement_group([per_worker])
        try:
            if not pg.wait(cfg.resources.worker_start_timeout_s):
                raise RuntimeError(f"{START_TIMED_OUT} after {cfg.resources.worker_start_timeout_s:g}s")
            worker = DomainWorker.options(
                num_cpus=per_worker.get("CPU", 0), num_gpus=per_worker.get("GPU", 0), max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
            try:
                _follow(worker, worker.train.remote(cfg, domain, [examples], faults, fingerprint, trial_started), report)
                return
            except (RayActorError, RayTaskError) as e:
                if attempt == attempts:
                    raise
                log.warning("domain %s: the training worker failed (%s); attempt %d of %d resumes from the latest "
                            "checkpoint", domain, str(e).strip().splitlines()[-1][:300], attempt + 1, attempts)
            finally:
                ray.kill(worker)
        finally:
            remove_placement_group(pg)


def _follow(worker, done, report: Callable[[dict], None]) -> None:
    """Forward the worker's reports until `done` (its train call) ends; raises what it raised."""
    while True:
        finished, _ = ray.wait([done], timeout=REPORT_POLL_S)
        for metrics in ray.get(worker.reports.remote()):
            report(metrics)
        if finished:
            ray.get(done)
            return
