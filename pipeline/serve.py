"""`adapters serve`: every domain's adapter from one base model, behind an OpenAI-compatible HTTP API on
Ray Serve.

    adapters serve --output OUT [--config FILE] [--domains a,b] [--host H] [--port P]
                   [--max-batch-size N] [--batch-wait-ms MS] [--max-tokens N]

    GET  /v1/models             the base model ("base") and one entry per domain adapter
    POST /v1/chat/completions   {"model": "<domain>" | "base", "messages": [...], "max_tokens", "temperature"}

One Ray Serve replica loads the base model once (4-bit as trained, on the GPU when the run trained on
one) and every finished adapter under OUT/adapters/ (local or s3://) onto the same PeftModel, each under
its domain's name. Requests that arrive together are batched (serve.batch) and generated in one
`generate(..., adapter_names=[...])` call: PEFT's mixed-adapter batches run each row through its own
adapter ("__base__": none). The messages go through the tokenizer's chat template with the generation
prompt (the template saved with the adapters: the one training used), exactly as training encoded the
turns before each answer and as `adapters generate` builds prompts: with greedy decoding (temperature 0)
both give the same answer. A domain's system message (data.system_messages) is the client's to send.

For production serving of many adapters with paged attention and continuous batching, vLLM's multi-LoRA
(directly or through Ray Serve LLM) loads the same adapter folders: docs/SERVING.md.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Optional

from pipeline import layout
from pipeline.errors import UsageError
from pipeline.lm.device import worker_device
from pipeline.lm.generation import eos_ids, generation_attention, prompt_ids
from pipeline.lm.model import load_adapter_onto, load_model, load_tokenizer, resolve_base
from pipeline.raycluster import ensure_ray
from pipeline.storage import open_store

log = logging.getLogger(__name__)

BASE = "base"
PEFT_BASE = "__base__"      # peft's adapter_names entry for "no adapter"
DEFAULT_PORT = 8000


def served_domains(store, domains: Optional[list[str]]) -> list[str]:
    """`domains` (default: every domain with a finished adapter under adapters/), each checked to have one."""
    have = sorted({f.split("/")[1] for f in store.list_files(layout.ADAPTERS, layout.TRAINING_REPORT)
                   if (store.read_json_or(f) or {}).get("status") == "finished"})
    chosen = list(domains) if domains else have
    missing = [d for d in chosen if d not in have]
    if missing or not chosen:
        raise UsageError(f"no finished adapter for {missing or 'any domain'} under {store.uri_of(layout.ADAPTERS)} "
                         f"(finished: {', '.join(have) or 'none'}): train first, or pick from those with --domains")
    return chosen


def chat_prompt_ids(tok, messages: list[dict], max_len: int) -> list[int]:
    """The prompt tokens for a chat request: the tokenizer's chat template over its turns with the
    generation prompt, exactly as training encoded the turns before each answer (tokens trained are
    tokens served; pipeline.lm.model.encode_conversation); its end kept when too long."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise ValueError("messages must be a non-empty list of {role, content} objects with text content")
    return prompt_ids(tok, [{"role": m.get("role", "user"), "content": m["content"]} for m in messages], max_len)


class AdapterModels:
    """The base model and every adapter on one PeftModel (no Ray, no HTTP: the deployment's engine)."""

    def __init__(self, cfg, domains: Optional[list[str]] = None):
        import torch
        self.cfg = cfg
        store = open_store(cfg)
        self.domains = served_domains(store, domains)
        self.device = worker_device(cfg, allow_fake_gpu=False)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
        base = resolve_base(cfg, store)
        self.tok = load_tokenizer(base, cfg)
        model = load_model(base, cfg, self.device)
        model.config.use_cache = True
        self.model = None
        for d in self.domains:
            with store.local_copy(layout.adapter(d)) as path:
                if self.model is None:
                    self.model = load_adapter_onto(model, path, adapter_name=d)
                else:
                    self.model.load_adapter(path, adapter_name=d)
        self.model.eval()
        self.base_id = cfg.model.base

    def names(self) -> list[str]:
        return [BASE] + self.domains

    def prompt(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        return chat_prompt_ids(self.tok, messages, max(16, self.cfg.train.max_seq_length - max_new_tokens))

    def generate(self, items: list[tuple[str, list[int], int]]) -> list[tuple[str, int, str]]:
        """items: (model name, prompt ids, max new tokens), greedy; one left-padded batch, each row through its
        own adapter. Returns (text, completion tokens, finish reason) per item."""
        import torch
        tok = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        L = max(len(p) for _, p, _ in items)
        ids = torch.full((len(items), L), pad, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        for r, (_, p, _) in enumerate(items):   # left padding: every prompt ends where generation starts
            ids[r, L - len(p):] = torch.tensor(p)
            mask[r, L - len(p):] = 1
        eos = eos_ids(self.model, tok)
        with torch.no_grad(), generation_attention(self.model):
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max(n for _, _, n in items), pad_token_id=pad, eos_token_id=eos,
                                      use_cache=True, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      adapter_names=[PEFT_BASE if m == BASE else m for m, _, _ in items])
        out = []
        for r, (_, _, n) in enumerate(items):
            row = gen[r, L:L + n].tolist()
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            reason = "stop" if cut is not None else "length"
            row = row[:cut] if cut is not None else row
            out.append((tok.decode(row, skip_special_tokens=True).strip(), len(row) + (cut is not None), reason))
        return out


def build_app(cfg, domains: Optional[list[str]], max_batch_size: int, batch_wait_s: float, max_tokens_cap: int,
              resources: dict):
    """The Ray Serve application: one deployment, a FastAPI ingress."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI(title="domain-adapters", description="OpenAI-compatible chat completions, one adapter per domain")

    @serve.deployment(name="adapters", num_replicas=1, ray_actor_options=resources,
                      max_ongoing_requests=max(8, 4 * max_batch_size))
    @serve.ingress(app)
    class AdapterServer:
        def __init__(self):
            self.engine = AdapterModels(cfg, domains)
            self.created = int(time.time())

        @app.get("/v1/models")
        async def models(self) -> dict:
            return {"object": "list", "data": [
                {"id": n, "object": "model", "created": self.created, "owned_by": "domain-adapters",
                 "root": self.engine.base_id, **({"parent": self.engine.base_id} if n != BASE else {})}
                for n in self.engine.names()]}

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def _batch(self, items: list[tuple[str, list[int], int]]) -> list[dict]:
            texts = await asyncio.to_thread(self.engine.generate, items)
            models = [m for m, _, _ in items]
            return [{"text": t, "tokens": n, "finish": f, "batch": models} for t, n, f in texts]

        @app.post("/v1/chat/completions")
        async def chat(self, body: dict) -> Any:
            def error(status: int, msg: str, param: str) -> JSONResponse:
                return JSONResponse(status_code=status, content={"error": {
                    "message": msg, "type": "invalid_request_error", "param": param, "code": None}})
            name = body.get("model")
            if name not in self.engine.names():
                return error(404, f"model {name!r} is not served here; choose one of {self.engine.names()}", "model")
            if body.get("stream"):
                return error(400, "stream: true is not supported by this server; leave it out", "stream")
            if (body.get("temperature") or 0) != 0 or body.get("n", 1) != 1:
                return error(400, "this server decodes greedily, one choice: leave temperature at 0 and n at 1", "temperature")
            max_new = body.get("max_completion_tokens") or body.get("max_tokens") or max_tokens_cap
            if not isinstance(max_new, int) or max_new < 1:
                return error(400, f"max_tokens must be a positive integer, got {max_new!r}", "max_tokens")
            max_new = min(max_new, max_tokens_cap)
            try:
                ids = self.engine.prompt(body.get("messages"), max_new)
            except ValueError as e:
                return error(400, str(e), "messages")
            r = await self._batch((name, ids, max_new))
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                                "finish_reason": r["finish"], "logprobs": None}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": r["tokens"],
                              "total_tokens": len(ids) + r["tokens"]},
                    # which models shared this request's generate() call (PEFT mixed-adapter batch)
                    "batch_models": r["batch"]}

    return AdapterServer.bind()


def run_serve(cfg, domains: Optional[list[str]], host: str, port: int, max_batch_size: int, batch_wait_s: float,
              max_tokens: int) -> int:
    """Start the application on the run's Ray (pipeline.raycluster) and serve until Ctrl-C / SIGTERM."""
    try:
        from ray import serve
    except ImportError:
        raise UsageError("Ray Serve is not installed: pip install 'ray[serve]' (the project's dependencies "
                         "include it: pip install -e .)") from None
    chosen = served_domains(open_store(cfg), domains)   # checked here: a usage error before Ray starts
    ensure_ray(cfg)
    cuda = cfg.resources.device == "cuda"
    resources = {"num_cpus": cfg.resources.cpus_per_trial, **({"num_gpus": cfg.resources.gpus_per_trial} if cuda else {})}
    serve.start(http_options={"host": host, "port": port})
    log.info("serve: loading %s and the adapters of %s", cfg.model.base, ", ".join(chosen))
    serve.run(build_app(cfg, chosen, max_batch_size, batch_wait_s, max_tokens, resources), name="adapters",
              route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    log.info("serving %s at %s (OpenAI API: /v1/models, /v1/chat/completions; model = base or a domain); "
             "Ctrl-C stops", ", ".join([BASE] + chosen), url)
    try:
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - the local Ray is stopped next anyway
            log.debug("serve.shutdown: %s", e)
