"""The per-worker training loop for one domain. Reads top to bottom: load config, build, restore,
loop, save.

    train_loop_per_worker(config)           Ray Train entry (TorchTrainer, one worker per domain)
    train_domain(config, data, session)     the loop itself; runs without Ray in unit tests
    compat_record(cfg, domain) / check_compat(saved, current)   resume compatibility

A checkpoint (every train.checkpoint_every steps) holds the LoRA weights, optimizer, scheduler,
step, RNG states, data position (epoch, batch index), history and the compatibility record. On a
retry (FailureConfig) or a re-run with the same output and run_name, Ray hands the latest one back
and the loop continues from it; a checkpoint made with another base model, LoRA shape or data
layout is refused with IncompatibleCheckpointError. A non-finite loss or gradient norm stops the
domain with NonFiniteLossError (nothing is checkpointed or exported after it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import tempfile
import time
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

FAULTS_ENV = "DOMAIN_ADAPTERS_FAULTS"   # "domain:kind[:step],...": kinds crash (os._exit once), oom (every attempt), raise, nan


class IncompatibleCheckpointError(RuntimeError):
    pass


class NonFiniteLossError(RuntimeError):
    pass


# ---- compatibility -------------------------------------------------------------------------------

def compat_record(cfg, domain: str) -> dict:
    """What a checkpoint must agree on to be resumed: base model, LoRA shape, data layout."""
    h = cfg.hyper_for(domain)
    t = cfg.train
    rec = {"model.base": cfg.model.base, "model.revision": cfg.model.revision,
           "model.quantization": cfg.model.quantization,
           "lora.r": h["lora"]["r"], "lora.alpha": h["lora"]["alpha"],
           "lora.target_modules": h["lora"]["target_modules"],
           "train.max_seq_length": t.max_seq_length, "train.tokens_per_micro_batch": h["tokens_per_micro_batch"],
           "train.grad_accum": h["grad_accum"], "train.packing": t.packing, "train.mask_prompt": t.mask_prompt,
           "train.chat_template": t.chat_template, "train.seed": t.seed}
    if cfg.model.base == "tiny":
        from pipeline.train.tiny import tiny_fingerprint
        rec["model.tiny"] = tiny_fingerprint(cfg)
    return rec


def check_compat(saved: dict, current: dict, where: str) -> None:
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise IncompatibleCheckpointError(
            f"cannot resume from the checkpoint at {where}: it was made with other settings ("
            + "; ".join(diffs) + "). Use a new run_name to start fresh, restore the old settings to resume, "
            "or delete that run directory.")


# ---- faults (tests inject them through DOMAIN_ADAPTERS_FAULTS) -------------------------------------

def parse_faults(spec: Optional[str], domain: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in (spec or "").split(","):
        parts = item.strip().split(":")
        if len(parts) >= 2 and parts[0] == domain:
            out[parts[1]] = int(parts[2]) if len(parts) > 2 else 0
    return out


# ---- sessions: Ray Train or local (unit tests) -------------------------------------------------------

class LocalSession:
    """Checkpoints as directories under `root` (the last one is resumed); reports kept in a list."""

    def __init__(self, root: str, resume: bool = True):
        self.root, self.resume, self.reports = root, resume, []

    def restore_dir(self) -> Optional[str]:
        if not self.resume or not os.path.isdir(self.root):
            return None
        cks = sorted(d for d in os.listdir(self.root) if d.startswith("checkpoint_"))
        return os.path.join(self.root, cks[-1]) if cks else None

    def report(self, metrics: dict, ckpt_dir: Optional[str] = None) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir:
            shutil.copytree(ckpt_dir, os.path.join(self.root, f"checkpoint_{metrics['step']:08d}"))


class RaySession:
    def __init__(self):
        import ray.train
        self._ckpt = ray.train.get_checkpoint()
        self._tmp: Optional[str] = None

    def restore_dir(self) -> Optional[str]:
        if self._ckpt is None:
            return None
        self._tmp = tempfile.mkdtemp(prefix="restore-")
        return self._ckpt.to_directory(self._tmp)

    def report(self, metrics: dict, ckpt_dir: Optional[str] = None) -> None:
        import ray.train
        ck = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ck)


# ---- loss ----------------------------------------------------------------------------------------

def loss_sum(model, batch: dict, device, fused: bool = False) -> Any:
    """Sum of token cross-entropies over the batch's target tokens (targets are pre-shifted); the LM
    head runs on target tokens only, fused with the cross-entropy when `fused` (pipeline.train.kernels)."""
    from pipeline.train import kernels
    return kernels.loss_sum(model, batch, device, fused)


def evaluate(model, examples, rows: int, seq_len: int, pad_id: int, device, max_batches: Optional[int] = None,
             packing: bool = True) -> tuple[float, int]:
    """(mean token loss, target tokens) over a split, in a fixed order."""
    import torch
    from pipeline.train.data import collate, epoch_plan
    if not examples:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i, b in enumerate(epoch_plan(examples, 0, 0, rows, seq_len, packing, shuffle=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = collate(examples, b, pad_id)
            tot += float(loss_sum(model, batch, device))
            n += batch["n_targets"]
    model.train(was_training)
    return (tot / n if n else float("nan")), n


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
    import torch
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import torch
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- the loop ---------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: the worker's dataset shards (tokenized by Ray Data) into train_domain."""
    import ray.train
    from pipeline.train.data import collect
    data = collect(ray.train.get_dataset_shard("sft").iter_batches(batch_size=256, batch_format="numpy"))
    try:
        train_domain(config, data, RaySession())
    except (NonFiniteLossError, IncompatibleCheckpointError) as e:
        # Retrying cannot help: record the cause for the scheduler and end this attempt cleanly.
        write_fatal(config, f"{type(e).__name__}: {e}")


def fatal_rel(run_name: str, domain: str) -> str:
    return f"runs/{run_name}/fatal/{domain}.json"


def write_fatal(config: dict, error: str) -> None:
    from pipeline.config import Config
    from pipeline.storage import open_store
    cfg = Config.model_validate(config["cfg"])
    log.error("%s", error)
    open_store(cfg).write_json(fatal_rel(cfg.run_name, config["domain"]), {"domain": config["domain"], "error": error})


def train_domain(config: dict, data: dict, session) -> dict:
    import torch
    from pipeline.config import Config
    from pipeline.storage import open_store
    from pipeline.train import export
    from pipeline.train.data import collate, epoch_plan
    from pipeline.train.model import (add_lora, attn_implementation, compute_dtype, load_model, load_tokenizer,
                                      resolve_base)

    # -- load config --------------------------------------------------------------------------------
    t_start = time.time()
    cfg = Config.model_validate(config["cfg"])
    domain = config["domain"]
    h = cfg.hyper_for(domain)
    t = cfg.train
    faults = parse_faults(config.get("faults"), domain)
    store = open_store(cfg)
    run = f"runs/{cfg.run_name}"
    if "raise" in faults:
        raise RuntimeError(f"injected failure for domain {domain} ({FAULTS_ENV})")
    device = config.get("device") or ("cuda" if torch.cuda.is_available() and cfg.resources.device == "cuda" else "cpu")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    seq_len = t.max_seq_length
    rows = max(1, h["tokens_per_micro_batch"] // seq_len)
    ev_kw = dict(rows=rows, seq_len=seq_len, device=device, max_batches=t.eval_max_batches, packing=t.packing)
    if not data["train"]:
        raise RuntimeError(f"domain {domain}: no training examples (every example was empty or all prompt)")

    # -- build ----------------------------------------------------------------------------------------
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    base_path = resolve_base(cfg, store)
    tok = load_tokenizer(base_path, cfg)
    from pipeline.train import kernels
    base_model = load_model(base_path, cfg, device)
    kernels.apply_fused_kernels(base_model, device, t.fused_kernels)   # Liger on CUDA when installed
    model = add_lora(base_model, h["lora"], cfg, t.gradient_checkpointing)
    from pipeline.train.lora_fused import fuse_lora
    fused_lora = fuse_lora(model, t.fused_lora)                        # one autograd step per LoRA layer
    mem = kernels.CudaMemory(device) if device.startswith("cuda") else None
    budget = kernels.plan_checkpointing(model, t, mem, max_tokens=rows * seq_len)   # None unless keep_last auto on CUDA
    fused = kernels.fused_loss_available(model, device, t.fused_kernels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=h["learning_rate"], weight_decay=h["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(h["lr_scheduler"], h["warmup_steps"], h["max_steps"]))
    # fp16 compute (GPUs without bf16) needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda") if compute_dtype(cfg, device) == torch.float16 else None
    compat = compat_record(cfg, domain)
    st: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "history": {"train": [], "val": []},
                          "tokens": 0, "train_time": 0.0, "base": None, "compat": compat, "resumed_from": None}

    # -- restore --------------------------------------------------------------------------------------
    ck = session.restore_dir()
    if ck:
        saved = json.loads(open(os.path.join(ck, "train_state.json")).read())
        check_compat(saved["compat"], compat, f"{store.uri_of(run)} ({domain}, step {saved['step']})")
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, torch.load(os.path.join(ck, "adapter.pt"), map_location=device))
        opt.load_state_dict(torch.load(os.path.join(ck, "optimizer.pt"), map_location=device))
        sched.load_state_dict(torch.load(os.path.join(ck, "scheduler.pt")))
        _set_rng_state(torch.load(os.path.join(ck, "rng.pt"), weights_only=False))
        st.update({k: saved[k] for k in ("step", "epoch", "batch", "history", "tokens", "train_time", "base")})
        st["resumed_from"] = saved["step"]
        log.info("domain %s: resumed from step %d", domain, saved["step"])
    if st["base"] is None:  # the base model on the same data with the same masking: adapter off
        with model.disable_adapter():
            bv, _ = evaluate(model, data["val"], pad_id=tok.pad_token_id, **ev_kw)
            bt, _ = evaluate(model, data["test"], pad_id=tok.pad_token_id, **ev_kw)
        st["base"] = {"val": bv, "test": bt}
        session.report({"step": 0, "domain": domain, "base_val_loss": bv, "base_test_loss": bt})

    def save_checkpoint(metrics: dict) -> None:
        from peft import get_peft_model_state_dict
        with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
            torch.save(get_peft_model_state_dict(model), os.path.join(d, "adapter.pt"))
            torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
            torch.save(sched.state_dict(), os.path.join(d, "scheduler.pt"))
            torch.save(_rng_state(), os.path.join(d, "rng.pt"))
            with open(os.path.join(d, "train_state.json"), "w") as f:
                json.dump({**st, "domain": domain, "config_fingerprint": config.get("fingerprint")}, f)
            session.report(metrics, d)

    # -- loop -----------------------------------------------------------------------------------------
    plan = epoch_plan(data["train"], st["epoch"], t.seed, rows, seq_len, t.packing)
    max_epochs = h["epochs_cap"]
    window: list[float] = []
    model.train()
    while st["step"] < h["max_steps"]:
        if max_epochs is not None and st["epoch"] + st["batch"] / len(plan) >= max_epochs:
            log.info("domain %s: epochs_cap %.2f reached at step %d", domain, max_epochs, st["step"])
            break
        if config.get("crash_at") == st["step"] + 1:  # in-process tests: die like a killed worker
            raise SystemExit(f"crash_at {config['crash_at']}")
        if faults.get("oom") == st["step"] + 1:  # every attempt: FailureConfig retries, then the domain fails
            store.write_text(f"{run}/faults/{domain}-oom-attempt-{os.getpid()}-{time.time_ns()}", "simulated OOM")
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {FAULTS_ENV} at step {st['step'] + 1}). "
                                         "Lower train.tokens_per_micro_batch or max_seq_length, or turn on "
                                         "train.gradient_checkpointing")
        if faults.get("crash") == st["step"] + 1:
            marker = f"{run}/faults/{domain}-crash-{st['step'] + 1}"
            if not store.exists(marker):
                store.write_text(marker, "crashed once")
                os._exit(1)
        t0 = time.time()
        micro = []
        for _ in range(h["grad_accum"]):
            micro.append(collate(data["train"], plan[st["batch"]], tok.pad_token_id))
            st["batch"] += 1
            if st["batch"] >= len(plan):
                st["epoch"], st["batch"] = st["epoch"] + 1, 0
                plan = epoch_plan(data["train"], st["epoch"], t.seed, rows, seq_len, t.packing)
        n_targets = sum(b["n_targets"] for b in micro)
        step_loss = 0.0
        if budget:
            budget.before_step()
        for b in micro:
            ls = loss_sum(model, b, device, fused)
            if budget:
                budget.after_forward(b["input_ids"].numel())
            if "nan" in faults and st["step"] + 1 >= faults["nan"]:
                ls = ls * float("nan")
            if not torch.isfinite(ls):
                raise NonFiniteLossError(
                    f"domain {domain}: the loss became {float(ls)} at step {st['step'] + 1}; nothing after step "
                    f"{st['step']} was saved. Lower train.learning_rate (now {h['learning_rate']}) or "
                    "train.max_grad_norm, or use model.compute_dtype float32/bfloat16.")
            loss = ls / n_targets
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(ls)
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, h["max_grad_norm"])
        if not torch.isfinite(gnorm) and scaler is None:
            raise NonFiniteLossError(f"domain {domain}: the gradient norm became {float(gnorm)} at step "
                                     f"{st['step'] + 1}. Lower train.learning_rate or train.max_grad_norm.")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if budget:
            budget.after_step(max(b["input_ids"].numel() for b in micro))
        st["step"] += 1
        step_tokens = sum(b["n_tokens"] for b in micro)
        step_time = time.time() - t0
        st["tokens"] += step_tokens
        st["train_time"] += step_time
        train_loss = step_loss / n_targets
        window.append(train_loss)
        lr = sched.get_last_lr()[0]
        st["history"]["train"].append({"step": st["step"], "loss": train_loss, "lr": lr, "time": step_time,
                                       "tokens": step_tokens, "padded_tokens": sum(b["input_ids"].numel() for b in micro)})
        if st["step"] % t.log_every == 0:
            log.info("domain %s step %d loss %.4f lr %.2e %.0f tok/s", domain, st["step"], train_loss, lr,
                     st["tokens"] / max(st["train_time"], 1e-9))
        do_eval = st["step"] % t.eval_every == 0
        do_ckpt = st["step"] % t.checkpoint_every == 0 and st["step"] < h["max_steps"]
        if do_eval or do_ckpt:
            metrics = {"step": st["step"], "domain": domain, "train_loss": train_loss, "lr": lr,
                       "tokens_per_s": st["tokens"] / max(st["train_time"], 1e-9)}
            if do_eval:
                vl, _ = evaluate(model, data["val"], pad_id=tok.pad_token_id, **ev_kw)
                st["history"]["val"].append({"step": st["step"], "loss": vl})
                metrics["val_loss"] = vl
            if do_ckpt:
                save_checkpoint(metrics)
            else:
                session.report(metrics)

    # -- save -----------------------------------------------------------------------------------------
    val_loss, n_val = evaluate(model, data["val"], pad_id=tok.pad_token_id, **ev_kw)
    test_loss, n_test = evaluate(model, data["test"], pad_id=tok.pad_token_id, **ev_kw)
    tail = [x["loss"] for x in st["history"]["train"][-max(1, t.log_every):]]
    report = {
        "domain": domain, "status": "finished",
        "train_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": val_loss, "test_loss": test_loss, "val_ppl": ppl(val_loss), "test_ppl": ppl(test_loss),
        "base_val_loss": st["base"]["val"], "base_test_loss": st["base"]["test"],
        "base_val_ppl": ppl(st["base"]["val"]), "base_test_ppl": ppl(st["base"]["test"]),
        "tokens_per_s": st["tokens"] / max(st["train_time"], 1e-9), "tokens": st["tokens"],
        "peak_memory_gb": peak_memory_gb(device, mem), "wall_time_s": time.time() - t_start,
        "peak_reserved_gb": mem.overall()[1] / 2**30 if mem else None,
        "checkpointing": kernels.checkpointing_record(model, t.gradient_checkpointing, budget),
        "train_time_s": st["train_time"], "steps": st["step"], "epochs": st["epoch"] + st["batch"] / max(1, len(plan)),
        "n_examples": {s: len(data[s]) for s in ("train", "val", "test")},
        "n_target_tokens": {"val": n_val, "test": n_test},
        "history": st["history"], "resumed_from_step": st["resumed_from"],
        "config_fingerprint": config.get("fingerprint"), "compat": compat,
        "base_model": cfg.model.base, "lora": h["lora"], "hyper": {k: v for k, v in h.items() if k != "lora"},
        "device": device, "attn_implementation": attn_implementation(cfg, device), "fused_loss": fused, "fused_lora_layers": fused_lora,
        "micro_batch": {"rows": rows, "seq_len": seq_len, "grad_accum": h["grad_accum"], "packing": t.packing},
    }
    if not all(math.isfinite(x) for x in (val_loss, test_loss) if x is not None):
        raise NonFiniteLossError(f"domain {domain}: final val/test loss is not finite ({val_loss}, {test_loss}); "
                                 "no adapter was exported")
    report["adapter_uri"] = export.export_adapter(model, tok, store, domain, report)
    session.report({k: v for k, v in report.items() if isinstance(v, (int, float, str)) and v is not None})
    return report
