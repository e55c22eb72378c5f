"""The per-worker training recipe for one domain. It reads top to bottom:

    run_worker(cfg, domain, dataset, session, ...)   a worker: the tokenized dataset read while the model
                                         loads, then train_domain (pipeline.train.worker's actor, or
                                         train_loop_per_worker, Ray Train's entry, for several workers)
    train_domain(cfg, domain, data, session, recipe_cls=DomainRecipe) -> training report
        recipe.setup()          device (checked on this node), model (4-bit), LoRA, kernels, optimizer, schedule
        recipe.restore()        the latest checkpoint, if any (refused when made with other settings)
        while not recipe.done():
            recipe.train_step()     one optimizer step over grad_accum packed micro-batches
            recipe.after_step()     log + report to Tune (every log_every), evaluate, checkpoint
        recipe.evaluate_base()  the base model's val loss (adapter off, the same batches and loss as the
                                adapter's val loss), once per domain: after training, so that the first
                                step does not wait for it. The base model's test loss is the evaluation
                                stage's (pipeline/eval, eval/matrix.json), not the recipe's
        recipe.save()           the adapter with the lowest val loss exported, with its report

A checkpoint (every train.checkpoint_every steps, and at every evaluation that lowers the val loss)
holds the LoRA weights, optimizer, scheduler, RNG states, the data position (epoch, batch index),
history, the best evaluation so far and the compatibility record; it is reported with the val loss of
its weights (CHECKPOINT_SCORE; UNSCORED when the step was not evaluated), so the session (sessions.py)
keeps the best ones by val loss plus the latest. On a retry or a re-run with the same output and run_name, the
session hands the latest complete one back and the recipe continues from it; one made with another base model, LoRA shape or
data layout is refused with IncompatibleCheckpointError. A non-finite loss or gradient norm stops the
domain with NonFiniteLossError (nothing is checkpointed or exported after it).

With resources.workers_per_trial > 1 every worker holds all examples and the same batch plan, takes
every n-th row of each micro-batch, and the LoRA gradients are summed across workers before each
optimizer step: the global batch and the loss are those of one worker.

Fault injection for tests lives in pipeline.train.faults: a ``Faults`` collaborator the recipe is given
(``NO_FAULTS`` in production), called at setup, before each optimizer step and on each step's summed loss;
never inside the micro-batch loop.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import resource
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from pipeline import layout
from pipeline.lm import kernels
from pipeline.lm.data import collate
from pipeline.lm.device import CudaUnavailableError, worker_device
from pipeline.lm.kernels import loss_sum
from pipeline.lm.lora_fused import fuse_lora, fuse_swiglu_down
from pipeline.lm.model import add_lora, attn_implementation, compute_dtype, load_model, load_tokenizer, resolve_base
from pipeline.optimizers import build_optimizer
from pipeline.status import write_fatal
from pipeline.storage import open_store
from pipeline.train import export
from pipeline.train.data import collect, epoch_plan
from pipeline.train.faults import NO_FAULTS, Faults, with_faults
from pipeline.train.identity import IncompatibleCheckpointError, check_compat, compat_record
from pipeline.train.replicas import Replicas
from pipeline.train.sessions import RaySession, UnsafeCheckpointError, load_tensors, read_rng_state, refuse_pickles

log = logging.getLogger(__name__)

NAN = float("nan")
CHECKPOINT_SCORE = "checkpoint_val_loss"   # Ray keeps the checkpoints with the lowest (schedule.py)
UNSCORED = 1e30                            # a checkpoint made at a step that was not evaluated
# the metrics every report to Tune carries (NaN when not known at that step)
METRIC_KEYS = ("train_loss", "val_loss", "best_val_loss", "lr", "tokens_per_s", "base_val_loss")


class NonFiniteLossError(RuntimeError):
    pass


# ---- loss and evaluation -----------------------------------------------------------------------------

def evaluate(model, examples, rows: int, seq_len: int, pad_id: int, device, max_batches: Optional[int] = None,
             packing: bool = True, replicas: Optional[Replicas] = None) -> tuple[float, int]:
    """(mean token loss, target tokens) over a split, in a fixed order; workers split the batches."""
    import torch
    if not examples:
        return float("nan"), 0
    replicas = replicas or Replicas()
    was_training = model.training
    model.eval()
    summed, n = None, 0
    with torch.no_grad():
        for i, b in enumerate(epoch_plan(examples, 0, 0, rows, seq_len, packing, shuffle=False)):
            if max_batches is not None and i >= max_batches:
                break
            if i % replicas.size != replicas.rank:
                continue
            batch = collate(examples, b, pad_id)
            loss = loss_sum(model, batch, device).double()   # summed on the device, read back once
            summed = loss if summed is None else summed + loss
            n += batch["n_targets"]
    model.train(was_training)
    tot, n = replicas.sum([float(summed) if summed is not None else 0.0, float(n)])
    return (tot / n if n else float("nan")), int(n)


def ppl(loss: Optional[float]) -> Optional[float]:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return max(0.0, 1.0 - frac) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def peak_memory_gb(device, mem=None) -> float:
    import torch
    if mem is not None:
        return mem.overall()[0] / 2**30
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _rng_state() -> dict:
    """The RNG states as plain JSON (lists of ints): a checkpoint never needs a pickle to hold them."""
    import torch
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state().tolist(),
          "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
          "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: dict) -> None:
    import torch
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def _eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---- the recipe ---------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Progress: everything about a domain's run that a checkpoint carries besides tensors."""
    step: int = 0
    epoch: int = 0
    batch: int = 0                    # next micro-batch of the epoch's plan
    tokens: int = 0
    train_time: float = 0.0
    history: dict = field(default_factory=lambda: {"train": [], "val": []})
    base: Optional[dict] = None       # the base model's {"val": loss} (older checkpoints also hold "test": unused)
    best: Optional[dict] = None       # the evaluation with the lowest val loss: {"step", "val_loss"}
    evals_since_best: int = 0
    stopped: Optional[str] = None     # why training ended before max_steps
    resumed_from: Optional[int] = None


class DomainRecipe:
    """One domain's QLoRA training on one worker (see the module docstring for the order of calls)."""

    def __init__(self, cfg, domain: str, data: dict, session, fingerprint: Optional[str] = None,
                 faults: Faults = NO_FAULTS):
        self.cfg, self.domain, self.data, self.session, self.fingerprint = cfg, domain, data, session, fingerprint
        self.faults = faults   # test fault injection (pipeline/train/faults.py); NO_FAULTS does nothing
        self.hyper = cfg.hyper_for(domain)
        self.store = open_store(cfg)
        self.run_dir = layout.run(cfg.run_name)
        self.replicas = Replicas()
        self.state = TrainState()
        self.best_weights: Optional[dict] = None   # CPU copy of the LoRA weights of state.best
        self.last_eval: Optional[tuple[int, float, int]] = None   # (step, val loss, target tokens)
        self.t_start = time.time()
        self.t_loop: Optional[float] = None        # when this attempt's first step started (for the ETA)
        self.startup: dict[str, float] = {}        # seconds from the recipe's start to each start-up milestone
        # time.time() of the trial's start-up marks (Ray runs only, each present when known): "trial" (the
        # Tune trial began), "worker_process" (Ray started this worker's process), "worker_fn" (the train
        # function began)
        self.marks: dict[str, float] = {}
        self.restored_train_time = 0.0             # step time of the attempts before this one (from a checkpoint)

    # -- setup ---------------------------------------------------------------------------------------
    def resolve_device(self) -> str:
        return worker_device(self.cfg, allow_fake_gpu=not self.faults.real_cuda_check)

    def setup(self) -> None:
        import torch
        cfg, t, h = self.cfg, self.cfg.train, self.hyper
        self.faults.at_setup(self)
        self.device = self.resolve_device()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
        self._mark("device_ready_s")   # torch imported, the device checked (CUDA: its context made)
        self.seq_len = t.max_seq_length
        self.rows = max(1, h.tokens_per_micro_batch // self.seq_len)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        base_path = resolve_base(cfg, self.store)
        self.tok = load_tokenizer(base_path, cfg)
        self._mark("tokenizer_loaded_s")
        base_model = load_model(base_path, cfg, self.device)
        self._mark("model_loaded_s")
        if isinstance(self.data, Future):  # tokenization ran while the model loaded (train_loop_per_worker)
            self.data = self.data.result()
        self._mark("data_ready_s")
        if not self.data["train"]:
            raise RuntimeError(f"domain {self.domain}: no training examples (every example was empty or all prompt)")
        kernels.apply_fused_kernels(base_model, self.device, t.fused_kernels)   # Liger on CUDA when installed
        self.model = add_lora(base_model, h.lora, cfg, t.gradient_checkpointing)
        self.fused_lora = fuse_lora(self.model, t.fused_lora)                   # one autograd step per LoRA layer
        self.fused_mlps = fuse_swiglu_down(self.model) if t.fused_swiglu_down else 0   # keeps gate, up; not their product
        self._mark("lora_ready_s")
        self.mem = kernels.CudaMemory(self.device) if self.device.startswith("cuda") else None
        # None unless checkpoint_keep_last is auto on CUDA: then it measures and sets the kept layers
        self.budget = kernels.plan_checkpointing(self.model, t, self.mem, max_tokens=self.rows * self.seq_len)
        self.fused_loss = kernels.fused_loss_available(self.model, self.device, t.fused_kernels)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = build_optimizer(h, self.params)   # train.optimizer, from the table in pipeline/optimizers.py
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(h.lr_scheduler, h.warmup_steps, h.max_steps))
        # fp16 compute (GPUs without bf16) needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler("cuda") if compute_dtype(cfg, self.device) == torch.float16 else None
        self.compat = compat_record(cfg, self.domain)
        self.plan = self._epoch_plan()
        self._mark("setup_done_s")

    def _mark(self, name: str) -> None:
        """A start-up milestone: seconds since the recipe's start (the training report's `startup`)."""
        self.startup[name] = round(time.time() - self.t_start, 2)

    def _epoch_plan(self) -> list:
        t = self.cfg.train
        return epoch_plan(self.data["train"], self.state.epoch, t.seed, self.rows, self.seq_len, t.packing)

    def _eval(self, split: str) -> tuple[float, int]:
        t = self.cfg.train
        return evaluate(self.model, self.data[split], rows=self.rows, seq_len=self.seq_len, pad_id=self.tok.pad_token_id,
                        device=self.device, max_batches=t.eval_max_batches, packing=t.packing, replicas=self.replicas)

    def _lora_weights(self) -> dict:
        from peft import get_peft_model_state_dict
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.model).items()}

    def _load_lora(self, weights: dict) -> None:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(self.model, weights)

    # -- restore --------------------------------------------------------------------------------------
    def restore(self) -> None:
        ck = self.session.restore_dir()
        if not ck:
            return
        with open(os.path.join(ck, layout.CHECKPOINT_STATE)) as f:
            saved = json.load(f)
        where = f"{self.store.uri_of(self.run_dir)} ({self.domain}, step {saved['step']})"
        check_compat(saved["compat"], self.compat, where)
        refuse_pickles(ck)

        def load(name: str, map_location: Any = "cpu") -> Any:
            return load_tensors(os.path.join(ck, name), map_location, where=f"{name} of the checkpoint at {where}")
        self._load_lora(load("adapter.pt", self.device))
        self.opt.load_state_dict(load("optimizer.pt", self.device))
        self.sched.load_state_dict(load("scheduler.pt"))
        _set_rng_state(read_rng_state(os.path.join(ck, "rng.json")))
        self.state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        self.state.resumed_from = saved["step"]
        self.restored_train_time = self.state.train_time
        self.plan = self._epoch_plan()
        best = self.state.best
        if best and best["step"] == saved["step"]:
            self.best_weights = self._lora_weights()
        elif best:
            raw = self.session.checkpoint_file(best["step"], "adapter.pt")
            if raw is None:
                log.warning("domain %s: the checkpoint of the best evaluation (step %d) is gone; the best adapter "
                            "is chosen again from the evaluations after step %d", self.domain, best["step"], saved["step"])
                self.state.best, self.state.evals_since_best = None, 0
            else:
                self.best_weights = load_tensors(io.BytesIO(raw), "cpu",
                                                 where=f"adapter.pt of the checkpoint of step {best['step']} ({where})")
        log.info("domain %s: resumed from step %d", self.domain, saved["step"])

    def evaluate_base(self) -> None:
        """The base model's val loss: adapter off, the same batches, masking and loss function as the adapter's
        val loss (its baseline in the training report). Once per domain. Its test loss is not measured here: the
        evaluation stage scores the base model on every test split (eval/matrix.json), and the report takes it
        from there."""
        if self.state.base is not None:
            return
        with self.model.disable_adapter():
            self.state.base = {"val": self._eval("val")[0]}
        self.session.report(self._metrics(base_val_loss=self.state.base["val"]))

    # -- the loop -------------------------------------------------------------------------------------
    def done(self) -> bool:
        st, h = self.state, self.hyper
        if st.stopped is not None or st.step >= h.max_steps:
            return True
        if h.epochs_cap is not None and st.epoch + st.batch / len(self.plan) >= h.epochs_cap:
            st.stopped = f"epochs_cap {h.epochs_cap:g} reached at step {st.step}"
            log.info("domain %s: %s", self.domain, st.stopped)
            return True
        return False

    def micro_loss(self, batch: dict):
        """Summed token cross-entropy of one micro-batch (the LM head on target tokens only)."""
        return loss_sum(self.model, batch, self.device, self.fused_loss)

    def _next_micro_batches(self) -> list[list[list[int]]]:
        st = self.state
        micro = []
        for _ in range(self.hyper.grad_accum):
            micro.append(self.plan[st.batch])
            st.batch += 1
            if st.batch >= len(self.plan):
                st.epoch, st.batch = st.epoch + 1, 0
                self.plan = self._epoch_plan()
        return micro

    def train_step(self) -> None:
        import torch
        st, h = self.state, self.hyper
        self.faults.before_step(self, st.step + 1)
        t0 = time.time()
        if self.t_loop is None:
            self.t_loop = t0
            self.startup["first_step_s"] = round(t0 - self.t_start, 2)
            trial = self.marks.get("trial")
            if trial is not None:  # Ray's worker group and dataset set-up, then this recipe's start-up
                self.startup["trial_start_to_first_step_s"] = round(t0 - trial, 2)
                for name, t in (("worker_process", self.marks.get("worker_process")),
                                ("worker_fn", self.marks.get("worker_fn")), ("recipe", self.t_start)):
                    if t is not None:
                        self.startup[f"trial_start_to_{name}_s"] = round(t - trial, 2)
        examples, pad = self.data["train"], self.tok.pad_token_id
        micro = self._next_micro_batches()
        # the whole step's target count (all workers' rows): each worker's loss is its share of the mean
        n_targets = sum(e.n_target_tokens for rows in micro for row in rows for e in (examples[i] for i in row))
        # collated up front, and the loss read back once per step: the GPU never waits for the CPU in between
        batches = [collate(examples, rows, pad) for rows in map(self.replicas.mine, micro) if rows]
        summed = None
        if self.budget:
            self.budget.before_step()
        for b in batches:
            ls = self.micro_loss(b)
            if self.budget:
                self.budget.after_forward(b["input_ids"].numel())
            loss = ls / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            summed = ls.detach() if summed is None else summed + ls.detach()
        tokens = sum(b["n_tokens"] for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        widest = max((b["input_ids"].numel() for b in batches), default=0)
        step_loss = self.faults.step_loss(st.step + 1, float(summed) if summed is not None else 0.0)
        step_loss = self.replicas.sum_gradients(self.params, step_loss)
        tokens, padded = (int(x) for x in self.replicas.sum([float(tokens), float(padded)]))
        if not math.isfinite(step_loss):
            raise NonFiniteLossError(
                f"domain {self.domain}: the loss became {step_loss} at step {st.step + 1}; nothing after step "
                f"{st.step} was saved. Lower train.learning_rate (now {h.learning_rate}) or "
                "train.max_grad_norm, or use model.compute_dtype float32/bfloat16.")
        if self.scaler:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, h.max_grad_norm)
        if not torch.isfinite(gnorm) and self.scaler is None:
            raise NonFiniteLossError(f"domain {self.domain}: the gradient norm became {float(gnorm)} at step "
                                     f"{st.step + 1}. Lower train.learning_rate or train.max_grad_norm.")
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.budget:
            self.budget.after_step(widest)
        step_time = time.time() - t0
        st.step += 1
        st.tokens += tokens
        st.train_time += step_time
        st.history["train"].append({"step": st.step, "loss": step_loss / n_targets, "lr": self.sched.get_last_lr()[0],
                                    "time": step_time, "tokens": tokens, "padded_tokens": padded})

    def after_step(self) -> None:
        """Log and report (every log_every), evaluate (every eval_every), checkpoint (every checkpoint_every,
        and when an evaluation lowered the val loss)."""
        st, t, h = self.state, self.cfg.train, self.hyper
        last = st.history["train"][-1]
        metrics = self._metrics(train_loss=last["loss"], lr=last["lr"], tokens_per_s=st.tokens / max(st.train_time, 1e-9))
        if st.step % t.log_every == 0:
            done_here = st.step - (st.resumed_from or 0)
            eta = (time.time() - self.t_loop) / max(done_here, 1) * (h.max_steps - st.step)
            log.info("domain %s step %d/%d loss %.4f lr %.2e %.0f tok/s eta %s", self.domain, st.step, h.max_steps,
                     last["loss"], last["lr"], metrics["tokens_per_s"], _eta(eta))
        improved = False
        if st.step % t.eval_every == 0:
            improved = self.record_eval(*self._eval("val"))
            metrics.update(val_loss=st.history["val"][-1]["loss"], best_val_loss=st.best["val_loss"] if st.best else NAN)
        if (st.step % t.checkpoint_every == 0 or improved) and st.step < h.max_steps and st.stopped is None:
            # what Ray ranks kept checkpoints by: the val loss of these weights, or a finite "worst" when this
            # step was not evaluated (NaN does not survive Ray's checkpoint-manager snapshot, a JSON file)
            evaluated = st.step % t.eval_every == 0 and math.isfinite(metrics["val_loss"])
            self.save_checkpoint({**metrics, CHECKPOINT_SCORE: metrics["val_loss"] if evaluated else UNSCORED})
        elif st.step % t.eval_every == 0 or st.step % t.log_every == 0:
            self.session.report(metrics)

    def _metrics(self, **values: float) -> dict:
        """What reaches Tune: the same keys in every report (Tune's CSV logger takes its columns from the first)."""
        st = self.state
        # timesteps_total: the x-axis Tune's TensorBoard and MLflow loggers plot against (else Tune's report count)
        m = {"step": st.step, "timesteps_total": st.step, "domain": self.domain, "progress": st.step / self.hyper.max_steps}
        m.update({k: NAN for k in METRIC_KEYS})
        m.update(values)
        return m

    def record_eval(self, val_loss: float, n_targets: int) -> bool:
        """Add an evaluation to the history; keep the best weights; early stopping. True if it is the new best."""
        st, patience = self.state, self.cfg.train.early_stopping_patience
        st.history["val"].append({"step": st.step, "loss": val_loss})
        self.last_eval = (st.step, val_loss, n_targets)
        if not math.isfinite(val_loss):  # no val examples (or a diverged model: save() refuses to export it)
            return False
        if st.best is None or val_loss < st.best["val_loss"]:
            st.best, st.evals_since_best = {"step": st.step, "val_loss": val_loss}, 0
            self.best_weights = self._lora_weights()
            return True
        st.evals_since_best += 1
        if patience is not None and st.evals_since_best >= patience:
            st.stopped = (f"early stopping: {st.evals_since_best} evaluations without a lower val loss than "
                          f"{st.best['val_loss']:.4f} (step {st.best['step']}); train.early_stopping_patience is {patience}")
            log.info("domain %s: %s", self.domain, st.stopped)
        return False

    def save_checkpoint(self, metrics: dict) -> None:
        import torch
        from peft import get_peft_model_state_dict
        if self.replicas.rank != 0:
            self.session.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
            torch.save(get_peft_model_state_dict(self.model), os.path.join(d, "adapter.pt"))
            torch.save(self.opt.state_dict(), os.path.join(d, "optimizer.pt"))
            torch.save(self.sched.state_dict(), os.path.join(d, "scheduler.pt"))
            with open(os.path.join(d, "rng.json"), "w") as f:
                json.dump(_rng_state(), f)
            with open(os.path.join(d, layout.CHECKPOINT_STATE), "w") as f:
                json.dump({**asdict(self.state), "compat": self.compat, "domain": self.domain,
                           "config_fingerprint": self.fingerprint}, f)
            self.session.report(metrics, d)

    # -- save -----------------------------------------------------------------------------------------
    def save(self) -> dict:
        """Export the adapter with the lowest val loss (the final weights take part) and its report."""
        st, t, h, cfg = self.state, self.cfg.train, self.hyper, self.cfg
        if self.last_eval is None or self.last_eval[0] != st.step:
            self.record_eval(*self._eval("val"))
        if st.best is None:
            reason = f"the last step ({st.step}): no finite val loss to choose by"
        elif st.best["step"] != st.step:
            reason = (f"lowest val loss {st.best['val_loss']:.4f} at step {st.best['step']}, of "
                      f"{len(st.history['val'])} evaluations (the last, step {st.step}: {st.history['val'][-1]['loss']:.4f})")
        else:
            reason = f"lowest val loss {st.best['val_loss']:.4f}, at the last step ({st.step})"
        if st.best is not None and st.best["step"] != st.step:
            self._load_lora(self.best_weights)
            val_loss, n_val = self._eval("val")
        else:
            _, val_loss, n_val = self.last_eval
        test_loss, n_test = self._eval("test")
        if not all(math.isfinite(x) for x in (val_loss, test_loss)):
            raise NonFiniteLossError(f"domain {self.domain}: final val/test loss is not finite ({val_loss}, {test_loss}); "
                                     "no adapter was exported")
        tail = [x["loss"] for x in st.history["train"][-max(1, t.log_every):]]
        report = {
            "domain": self.domain, "status": "finished", "run_name": cfg.run_name,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "train_loss": sum(tail) / len(tail) if tail else None,
            "val_loss": val_loss, "test_loss": test_loss, "val_ppl": ppl(val_loss), "test_ppl": ppl(test_loss),
            "base_val_loss": st.base["val"], "base_val_ppl": ppl(st.base["val"]),
            "exported_step": st.best["step"] if st.best else st.step, "export_reason": reason, "stopped_early": st.stopped,
            "tokens_per_s": st.tokens / max(st.train_time, 1e-9), "tokens": st.tokens,
            "peak_memory_gb": peak_memory_gb(self.device, self.mem), "wall_time_s": time.time() - self.t_start,
            # this attempt's optimizer steps over its wall time from the trial's start (the recipe's, off Ray)
            # to here: what start-up, evaluations and checkpoints leave of the device's time to training
            "busy_share": (st.train_time - self.restored_train_time) / max(time.time() - self.marks.get("trial", self.t_start), 1e-9),
            "peak_reserved_gb": self.mem.overall()[1] / 2**30 if self.mem else None,
            "checkpointing": kernels.checkpointing_record(self.model, t.gradient_checkpointing, self.budget),
            "train_time_s": st.train_time, "startup": self.startup, "steps": st.step, "epochs": st.epoch + st.batch / max(1, len(self.plan)),
            "n_examples": {s: len(self.data[s]) for s in ("train", "val", "test")},
            # examples of the SFT shards left out: no response token fits in max_seq_length (data.collect)
            "n_without_target": {s: getattr(self.data, "without_target", {}).get(s, 0) for s in ("train", "val", "test")},
            "n_target_tokens": {"val": n_val, "test": n_test},
            "history": st.history, "resumed_from_step": st.resumed_from,
            "config_fingerprint": self.fingerprint, "compat": self.compat,
            "base_model": cfg.model.base, "lora": h.lora.model_dump(), "hyper": h.model_dump(exclude={"lora"}),
            "workers": self.replicas.size, "device": self.device, "attn_implementation": attn_implementation(cfg, self.device),
            "fused_loss": self.fused_loss, "fused_lora_layers": self.fused_lora, "fused_swiglu_down_mlps": self.fused_mlps,
            "micro_batch": {"rows": self.rows, "seq_len": self.seq_len, "grad_accum": h.grad_accum, "packing": t.packing},
        }
        if self.replicas.rank == 0:
            report["adapter_uri"] = export.export_adapter(self.model, self.tok, self.store, self.domain, report, cfg)
        self.session.report(self._metrics(**{k: v for k, v in report.items()
                                             if k != "domain" and isinstance(v, (int, float)) and v is not None}))
        return report


def train_domain(cfg, domain: str, data: "dict | Future", session, recipe_cls: type = DomainRecipe,
                 fingerprint: Optional[str] = None, marks: Optional[dict] = None) -> dict:
    """Train one domain's adapter on `data` ({split: [Example]}, or a Future of it that setup waits for
    after loading the model) and return its training report."""
    recipe = recipe_cls(cfg, domain, data, session, fingerprint)
    recipe.marks = dict(marks or {})
    recipe.setup()
    recipe.restore()
    recipe.model.train()
    while not recipe.done():
        recipe.train_step()
        recipe.after_step()
    recipe.evaluate_base()
    return recipe.save()


# ---- a training worker's entry ------------------------------------------------------------------------

def worker_marks(trial_started: Optional[float]) -> dict:
    """The start-up marks a worker adds to its report's timeline (bench/startup.py)."""
    import psutil
    marks = {"worker_fn": time.time()}
    if trial_started is not None:
        # a worker process that Ray had started before this trial (a pooled one) counts as ready at its start
        marks.update(trial=trial_started, worker_process=max(psutil.Process().create_time(), trial_started))
    return marks


def run_worker(cfg, domain: str, examples: Callable[[], dict], session, faults=None, fingerprint: Optional[str] = None,
               marks: Optional[dict] = None) -> None:
    """One training worker of a domain: gets the tokenized examples (``examples()``: {split: [Example]}; every
    worker holds all of them and takes its rows of each micro-batch) while the model loads, then trains. A
    cause that retrying cannot help is recorded as the domain's fatal error and this attempt ends cleanly;
    any other error is raised (the trial retries from the latest checkpoint)."""
    # the examples are read and tokenized in other processes (the trial's tokenization task, or Ray Data for
    # Ray Train's workers) while this one loads the model: start-up takes the longer of the two, not their sum
    with ThreadPoolExecutor(1, thread_name_prefix="collect") as pool:
        data = pool.submit(examples)
        try:
            train_domain(cfg, domain, data, session, with_faults(DomainRecipe, faults), fingerprint, marks)
        except (NonFiniteLossError, IncompatibleCheckpointError, UnsafeCheckpointError, CudaUnavailableError) as e:
            log.error("%s: %s", type(e).__name__, e)
            write_fatal(open_store(cfg), cfg.run_name, domain, f"{type(e).__name__}: {e}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry (resources.workers_per_trial > 1). config: {"cfg": Config, "domain": str, "faults":
    FaultPlan | None, "fingerprint": str, "trial_started": float}."""
    import ray.train
    cfg, domain = config["cfg"], config["domain"]
    shard = ray.train.get_dataset_shard("sft")
    run_worker(cfg, domain, lambda: collect(shard.iter_batches(batch_size=256, batch_format="numpy"), domain=domain),
               RaySession(open_store(cfg), cfg.run_name, domain), config.get("faults"), config.get("fingerprint"),
               worker_marks(config.get("trial_started")))
