"""What identifies a domain's training, built once from the config and the domain; the resume check,
the skip-if-finished check and the fingerprints stored with an adapter and its checkpoints derive from it.

    TrainingIdentity.of(cfg, domain, store) -> TrainingIdentity
        .fingerprint()            {"settings", "base", "data"}: stored as `config_fingerprint` in the training
                                  report and every checkpoint
        .why_not_current(report)  None when `report` is a finished adapter made with this identity, else why not
        .current(report)          `report` when it is one, else None (the skip-if-finished check)
        .check_resume(saved, where)   refuses a checkpoint made with other settings (IncompatibleCheckpointError)
    compat_record(cfg, domain)    (pipeline.lm.compat) what a checkpoint must agree on to be resumed (`.resume`)

Two views of the settings, on purpose: an adapter is current only while everything that changes its
weights is the same (`settings`: the whole model section and the domain's hyperparameters, plus
TRAIN_KEYS and gradient checkpointing); a checkpoint can be resumed while what its tensors and its data
position depend on is the same (RESUME_KEYS: the base model, the LoRA shape, the data layout), so a
changed learning rate or step count resumes. Both are stored on disk, so their keys stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline import layout
from pipeline.fingerprint import fingerprint
from pipeline.lm.compat import TRAIN_KEYS, compat_record
from pipeline.lm.tiny import tiny_fingerprint


class IncompatibleCheckpointError(RuntimeError):
    pass


def settings_fingerprint(cfg, domain: str) -> str:
    """What makes a finished adapter current: model, this domain's hyperparameters, data layout."""
    t = cfg.train
    d = {"model": cfg.model.model_dump(mode="json"), "hyper": cfg.hyper_for(domain).model_dump(mode="json"),
         "train": {k: getattr(t, k) for k in TRAIN_KEYS + ("gradient_checkpointing",)}}
    return fingerprint(d, 16)


def check_compat(saved: dict, current: dict, where: str) -> None:
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise IncompatibleCheckpointError(
            f"cannot resume from the checkpoint at {where}: it was made with other settings ("
            + "; ".join(diffs) + "). Use a new run_name to start fresh, restore the old settings to resume, "
            "or delete that run directory.")


_CHANGED = {"settings": "the training settings changed", "base": "the base model changed (rebuilt or another one)",
            "data": "this domain's SFT data changed (prepared again from other inputs or settings)"}


@dataclass(frozen=True)
class TrainingIdentity:
    """Everything a domain's adapter depends on: "settings" (settings_fingerprint), "base" (the base model: for
    the tiny demo base, the fingerprint of what it is built from, so a rebuilt tiny base counts; else
    model.base@revision), "data" (this domain's SFT shards: prepare's fingerprint of its inputs, and the
    shards' names and sizes); and `resume`, the compat record a checkpoint must match."""
    domain: str
    settings: str
    base: str
    data: str
    resume: dict

    @classmethod
    def of(cls, cfg, domain: str, store) -> "TrainingIdentity":
        tiny = None
        if cfg.model.base == "tiny":
            tiny = tiny_fingerprint(cfg, store)
            base = "tiny:" + tiny
        else:
            base = f"{cfg.model.base}@{cfg.model.revision or 'main'}"
        shards = [(f, store.size(f)) for f in store.list_files(layout.sft(domain), ".parquet")]
        inputs = (store.read_json_or(layout.domain_marker(domain)) or {}).get("fingerprint")
        return cls(domain, settings_fingerprint(cfg, domain), base, fingerprint([inputs, shards], 16),
                   compat_record(cfg, domain, tiny))

    def fingerprint(self) -> dict:
        return {"settings": self.settings, "base": self.base, "data": self.data}

    def why_not_current(self, rep: Optional[dict]) -> Optional[str]:
        """None when `rep` (a training report) is a finished adapter made with this identity; else why it is
        not (for the console)."""
        if not rep or rep.get("status") != "finished":
            return "no finished adapter"
        made = rep.get("config_fingerprint")
        if not isinstance(made, dict):
            return "it was made by an older version that did not record its base model and data"
        mine = self.fingerprint()
        return "; ".join(_CHANGED[k] for k in mine if made.get(k) != mine[k]) or None

    def current(self, rep: Optional[dict]) -> Optional[dict]:
        """`rep` when it is a finished adapter made with this identity, else None."""
        return rep if self.why_not_current(rep) is None else None

    def made_by(self, checkpoint_state: dict) -> bool:
        """Whether a checkpoint (its train_state.json) was made for this identity."""
        return checkpoint_state.get("config_fingerprint") == self.fingerprint()

    def check_resume(self, saved_compat: dict, where: str) -> None:
        check_compat(saved_compat, self.resume, where)
