"""Where a domain's checkpoints and reports go: Ray Train's session on a cluster, a local folder in unit tests
and benches; and the checks every checkpoint passes before anything in it is read.

    LocalSession(root)                  checkpoints as folders under root (the last one resumed), reports in a list
    RaySession(store, run_name, domain) ray.train's checkpoint and report calls; a newer complete checkpoint in
                                        the run's storage than Ray's run snapshot names is found too
    StoreSession(store, run_name, domain, keep, on_report)
                                        a one-worker trial's (pipeline.train.worker): checkpoints written to the
                                        run's storage and pruned here, reports handed to on_report
    load_tensors(path)                  torch.load with weights_only=True: tensors and plain containers only
    UnsafeCheckpointError               a checkpoint file that could run code when read: refused unread

The recipe (pipeline/train/loop.py) takes a session and never asks which one it has.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from pipeline import layout

log = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects other than tensors and plain containers (or is a pickle this
    version never reads): refused unread, since unpickling it could run code from the output folder."""


class LocalSession:
    """Checkpoints as directories under `root` (the last one is resumed); reports kept in a list."""

    def __init__(self, root: str, resume: bool = True):
        self.root, self.resume, self.reports = root, resume, []

    def restore_dir(self) -> Optional[str]:
        if not self.resume or not os.path.isdir(self.root):
            return None
        cks = sorted(d for d in os.listdir(self.root) if d.startswith("checkpoint_"))
        return os.path.join(self.root, cks[-1]) if cks else None

    def checkpoint_file(self, step: int, name: str) -> Optional[bytes]:
        path = os.path.join(self.root, f"checkpoint_{step:08d}", name)
        return open(path, "rb").read() if os.path.isfile(path) else None

    def report(self, metrics: dict, ckpt_dir: Optional[str] = None) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir:
            shutil.copytree(ckpt_dir, os.path.join(self.root, f"checkpoint_{metrics['step']:08d}"))


class _StoredCheckpoints:
    """The checkpoints of one domain in the run's storage (runs/<run>/train/<domain>/*/train_state.json)."""

    def __init__(self, store, run_name: str, domain: str):
        self.store, self.prefix = store, layout.checkpoints(run_name, domain)

    def _stored_checkpoints(self) -> list[tuple[str, int]]:
        """(directory, step) of the checkpoints with a train_state.json in storage, newest first."""
        found = []
        for rel in self.store.list_files(self.prefix, layout.CHECKPOINT_STATE):
            try:
                found.append((rel.rsplit("/", 1)[0], int(self.store.read_json(rel)["step"])))
            except Exception:  # noqa: BLE001 - being written or deleted: not this one
                continue
        return sorted(found, key=lambda c: -c[1])

    def _newest_complete(self, after_step: int = -1) -> Optional[str]:
        """A local copy of the newest stored checkpoint newer than ``after_step`` that reads completely, or
        None. One holding pickled objects raises UnsafeCheckpointError (named by its storage URI)."""
        for rel, step in self._stored_checkpoints():
            if step <= after_step:
                break
            local = tempfile.mkdtemp(prefix="restore-")
            try:
                self.store.download_dir(rel, local)
                try:
                    _check_checkpoint_loads(local)
                except UnsafeCheckpointError as e:
                    raise UnsafeCheckpointError(str(e).replace(local, self.store.uri_of(rel))) from None
            except UnsafeCheckpointError:
                shutil.rmtree(local, ignore_errors=True)
                raise
            except Exception as e:  # noqa: BLE001 - cut short by the kill: an older one is used
                log.warning("checkpoint %s is incomplete (%s): not used", self.store.uri_of(rel), e)
                shutil.rmtree(local, ignore_errors=True)
                continue
            return local
        return None

    def checkpoint_file(self, step: int, name: str) -> Optional[bytes]:
        """`name` from the kept checkpoint of `step` (the best by val loss are kept), or None."""
        for rel, found in self._stored_checkpoints():
            if found == step:
                try:
                    return self.store.read_bytes(f"{rel}/{name}")
                except Exception:  # noqa: BLE001 - deleted meanwhile (only the best few are kept)
                    return None
        return None


class RaySession(_StoredCheckpoints):
    """ray.train's checkpoint and report calls; earlier checkpoints are found in the run's storage."""

    def __init__(self, store, run_name: str, domain: str):
        import ray.train
        super().__init__(store, run_name, domain)
        self._ckpt = ray.train.get_checkpoint()

    def restore_dir(self) -> Optional[str]:
        """Ray's latest checkpoint, or a newer complete one in the run's storage. Ray registers a
        checkpoint in its run snapshot only after the worker has uploaded it, when the controller next
        polls; a driver killed in between leaves checkpoints that Ray's snapshot does not name."""
        ray_dir = self._ckpt.to_directory(tempfile.mkdtemp(prefix="restore-")) if self._ckpt else None
        ray_step = _checkpoint_step(ray_dir) if ray_dir else -1
        local = self._newest_complete(after_step=ray_step)
        if local is None:
            return ray_dir
        log.info("checkpoint of step %d found in storage, newer than Ray's run snapshot names (%s)",
                 _checkpoint_step(local), ray_step if ray_step >= 0 else "none")
        if ray_dir:
            shutil.rmtree(ray_dir, ignore_errors=True)
        return local

    def report(self, metrics: dict, ckpt_dir: Optional[str] = None) -> None:
        import ray.train
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)


SCORE_FILE = "checkpoint_score.json"   # a StoreSession checkpoint's score (the val loss of its weights)


class StoreSession(_StoredCheckpoints):
    """A one-worker trial's session (pipeline.train.worker): what Ray Train's CheckpointConfig does for a
    TorchTrainer, done here, since that trial has no Train controller. Each checkpoint is uploaded to
    runs/<run>/train/<domain>/checkpoint_<step> with train_state.json last (a checkpoint without it is one
    cut short: never listed); then all but the ``keep`` best by ``score_key`` (lower is better) and the
    latest are deleted, as Ray's CheckpointConfig(num_to_keep) does. Every report goes to ``on_report`` (the trial forwards it to Tune)."""

    def __init__(self, store, run_name: str, domain: str, keep: Optional[int], score_key: str,
                 on_report: Callable[[dict], None]):
        super().__init__(store, run_name, domain)
        self.keep, self.score_key, self.on_report = keep, score_key, on_report

    def restore_dir(self) -> Optional[str]:
        return self._newest_complete()

    def report(self, metrics: dict, ckpt_dir: Optional[str] = None) -> None:
        if ckpt_dir:
            self._upload(ckpt_dir, int(metrics["step"]), float(metrics[self.score_key]))
            self._prune()
        self.on_report(dict(metrics))

    def _upload(self, ckpt_dir: str, step: int, score: float) -> None:
        rel = f"{self.prefix}/checkpoint_{step:08d}"
        with open(os.path.join(ckpt_dir, SCORE_FILE), "w") as f:
            json.dump({"step": step, self.score_key: score}, f)
        state = os.path.join(ckpt_dir, layout.CHECKPOINT_STATE)
        with tempfile.TemporaryDirectory(prefix="ckpt-") as rest:
            for name in os.listdir(ckpt_dir):
                if name != layout.CHECKPOINT_STATE:
                    shutil.copy2(os.path.join(ckpt_dir, name), rest)
            self.store.upload_dir(rest, rel)
        self.store.upload_file(state, f"{rel}/{layout.CHECKPOINT_STATE}")

    def _prune(self) -> None:
        stored = self._stored_checkpoints()          # newest first: the latest is always kept
        if self.keep is None or len(stored) <= self.keep:
            return

        def score(rel: str) -> float:
            try:
                return float(self.store.read_json(f"{rel}/{SCORE_FILE}")[self.score_key])
            except Exception:  # noqa: BLE001 - another writer's (Ray Train's) checkpoint: ranked last
                return float("inf")
        ranked = sorted(stored, key=lambda c: (score(c[0]), -c[1]))
        kept = {rel for rel, _ in ranked[:self.keep]} | {stored[0][0]}
        for rel, _ in stored:
            if rel not in kept:
                self.store.delete(rel)


CHECKPOINT_FILES = ("adapter.pt", "optimizer.pt", "scheduler.pt", "rng.json", layout.CHECKPOINT_STATE)
# What an older version wrote (the RNG states as a full pickle): never read, a checkpoint holding it is refused
PICKLED_FILES = ("rng.pt",)


def _checkpoint_step(ck_dir: str) -> int:
    with open(os.path.join(ck_dir, layout.CHECKPOINT_STATE)) as f:
        return int(json.load(f)["step"])


def load_tensors(path: "str | io.BytesIO", map_location: Any = "cpu", where: Optional[str] = None) -> Any:
    """A checkpoint's .pt file: tensors and plain containers only (torch's weights_only unpickler). Anything
    else in it is refused before it is built (UnsafeCheckpointError naming the file); nothing in it runs.
    where: how to name the file for the user (its storage URI), default the local path."""
    import pickle
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused {where or path}: it holds pickled objects other than tensors ({first[:200]}); nothing in it "
            "was loaded or run. Delete that checkpoint directory (or use a new run_name) if you did not put it "
            "there, and check who can write to the output.") from None


def refuse_pickles(ck_dir: str) -> None:
    for name in PICKLED_FILES:
        if os.path.exists(os.path.join(ck_dir, name)):
            raise UnsafeCheckpointError(
                f"refused the checkpoint {ck_dir}: it holds {name}, a pickle that this version never loads (an "
                "older version's checkpoint, or a crafted one); nothing in it was read or run. Delete that "
                "checkpoint directory or use a new run_name.")


def _check_checkpoint_loads(ck_dir: str) -> None:
    """Every file of a checkpoint is there and reads (a copy cut short does not); one holding anything but
    tensors raises UnsafeCheckpointError (not a cut-short copy: the domain fails, see load_tensors)."""
    _checkpoint_step(ck_dir)
    refuse_pickles(ck_dir)
    for name in CHECKPOINT_FILES[:-2]:
        load_tensors(os.path.join(ck_dir, name))
    read_rng_state(os.path.join(ck_dir, "rng.json"))


def read_rng_state(path: str) -> dict:
    with open(path) as f:
        st = json.load(f)
    if not isinstance(st, dict) or not {"torch", "numpy", "python"} <= set(st):
        raise ValueError(f"{path}: not an RNG state record")
    return st
