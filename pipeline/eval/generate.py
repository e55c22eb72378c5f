"""`adapters generate`: answers to your prompts from the base model and the domains' adapters.

    adapters generate --output OUT --domain medicine "question" ["question" ...]
                      [--prompts file.jsonl] [--base] [--max-new-tokens N] [--temperature T]
                      [--config FILE] [--set key=value] [--out-file answers.jsonl]

Runs in this process (no Ray): the base model is loaded once (4-bit as configured; with
resources.device cuda, CUDA must work here), each prompt is put in the training prompt format
(the chat template or the simple template), and the adapters are switched with PEFT's
load_adapter / set_adapter; prompts are generated in batches. Output (local or s3://) is read
through the Store. Without --config the settings come from the adapters' training reports (base
model, quantization, prompt format, device). Prints every answer; --out-file writes JSONL, one
{"model", "prompt", "output"} object per answer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from pipeline import layout
from pipeline.config import apply_sets, Config, ConfigError, load_config
from pipeline.errors import UsageError, UserFacingError
from pipeline.eval.scoring import BaseAndAdapters
from pipeline.lm.device import worker_device
from pipeline.lm.generation import generate_texts, prompt_ids
from pipeline.lm.model import load_model, load_tokenizer, resolve_base
from pipeline.storage import open_store, Store
from pipeline.uris import scheme_of

log = logging.getLogger(__name__)
# --max-new-tokens above this is refused before anything loads (an answer, not a book); a model's own
# context may allow fewer (checked once it is loaded)
MAX_NEW_TOKENS = 4096


def read_prompts(path: str) -> list[str]:
    """A JSONL file: one {"prompt": "..."} object (or a JSON string) per line; blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserFacingError(f"--prompts {path}: no such file; give a JSONL file with one {{\"prompt\": ...}} per line")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserFacingError(f"--prompts {path} line {n}: not JSON ({e.msg}); write one {{\"prompt\": ...}} per line") from None
        v = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(v, str) or not v.strip():
            raise UserFacingError(f"--prompts {path} line {n}: no \"prompt\" text; write one {{\"prompt\": ...}} per line")
        out.append(v)
    return out


def config_from_output(output: str, domains: list[str], sets: Optional[list[str]] = None):
    """A Config for generating from a finished output without its YAML: what the adapters were trained
    with, from adapters/<domain>/training_report.json (the first finished one when only --base)."""
    store = Store(output)
    names = list(domains) + sorted({layout.adapter_domain(f) for f in store.list_files(layout.ADAPTERS, layout.TRAINING_REPORT)} - {None})
    rep = next((store.read_json(layout.training_report(d)) for d in names
                if store.is_file(layout.training_report(d))), None)
    if rep is None:
        raise UserFacingError(f"no finished adapter under {store.uri_of(layout.ADAPTERS)}: train first (adapters train), or pass "
                              "--config with the run's YAML to generate with the base model alone")
    c = rep.get("compat") or {}
    d = {"output": output, "model": {"base": c.get("model.base") or rep["base_model"], "revision": c.get("model.revision"),
                                     "quantization": c.get("model.quantization", "nf4")},
         "train": {"max_seq_length": c.get("train.max_seq_length", 2048), "chat_template": c.get("train.chat_template", "auto")},
         "resources": {"device": "cuda" if str(rep.get("device", "cpu")).startswith("cuda") else "cpu"}}
    apply_sets(d, sets)
    try:
        return Config.model_validate(d)
    except Exception as e:
        raise ConfigError(f"cannot rebuild the settings from {store.uri_of(layout.ADAPTERS)}: {e}; pass --config") from None


def check_request(prompts: list[str], domains: list[str], include_base: bool, max_new_tokens: int) -> None:
    """What can be refused before a model loads: no prompt or an empty one, no model, --max-new-tokens out of range."""
    if not prompts:
        raise UsageError("no prompt: give one or more prompts as arguments or --prompts FILE.jsonl")
    empty = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if empty:
        raise UsageError(f"prompt {empty[0]} is empty: give the text of the question")
    if not domains and not include_base:
        raise UsageError("say which model answers: --domain NAME (repeatable) and/or --base")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: give a number from 1 to {MAX_NEW_TOKENS}")


def run_generate(cfg, prompts: list[str], domains: list[str], include_base: bool, max_new_tokens: int,
                 temperature: float = 0.0) -> list[dict]:
    """Every prompt through the base model (include_base) and each domain's adapter; one dict per answer."""
    import torch
    check_request(prompts, domains, include_base, max_new_tokens)
    store = open_store(cfg)
    missing = [d for d in domains if not store.is_file(layout.training_report(d))]
    if missing:
        have = sorted({layout.adapter_domain(f) for f in store.list_files(layout.ADAPTERS, layout.TRAINING_REPORT)} - {None})
        raise UserFacingError(f"no finished adapter for {missing} under {store.uri_of(layout.ADAPTERS)} (finished: "
                              f"{', '.join(have) or 'none'}): train it first, or pick one of those with --domain")
    device = worker_device(cfg, allow_fake_gpu=False)
    if device == "cpu":
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    base = resolve_base(cfg, store)
    tok = load_tokenizer(base, cfg)
    model = load_model(base, cfg, device)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and max_new_tokens > context - 16:   # 16: room for the prompt's last tokens
        raise UsageError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens: "
                         f"use at most {context - 16}")
    t = cfg.train
    batch_tokens = cfg.eval.tokens_per_batch or 4 * t.tokens_per_micro_batch

    def answers(m, name: str) -> list[dict]:
        # each prompt as a user turn, after the domain's system message (data.system_messages) as in its
        # training rows, through the chat template the adapters were trained with
        system = cfg.data.system_messages.get(name, "")
        ids = [prompt_ids(tok, ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}],
                          max(16, t.max_seq_length - max_new_tokens)) for p in prompts]
        texts = generate_texts(m, tok, ids, max_new_tokens, device, batch_tokens, temperature, cfg.seed)
        log.info("generate: %s answered %d prompt(s)", name, len(texts))
        return [{"model": name, "prompt": p, "output": o} for p, o in zip(prompts, texts)]

    models = BaseAndAdapters(model, store)
    out = []
    for name in (["base"] if include_base else []) + domains:
        with models.use(name) as m:
            out += answers(m, name)
    return out


def main_generate(args) -> int:
    """The `adapters generate` command (arguments parsed by pipeline.cli)."""
    domains = [d.strip() for arg in args.domain for d in arg.split(",") if d.strip()]
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    check_request(prompts, domains, args.base, args.max_new_tokens)   # before any model or output is read
    if args.config:
        cfg = load_config(args.config, sets=args.set, output=args.output)
    elif args.output:
        out = args.output if scheme_of(args.output) else str(Path(args.output).expanduser().resolve())
        cfg = config_from_output(out, domains, args.set)
    else:
        raise UserFacingError("generate needs --output URI (the run's output) or --config FILE")
    rows = run_generate(cfg, prompts, domains, args.base, args.max_new_tokens, args.temperature)
    for r in rows:
        print(f"=== {r['model'] if r['model'] == 'base' else r['model'] + ' adapter'} ===\n"
              f"prompt: {r['prompt']}\n{r['output']}\n", flush=True)
    if args.out_file:
        Path(args.out_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} answer(s) to {args.out_file}")
    return 0
