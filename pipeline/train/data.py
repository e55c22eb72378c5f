"""SFT Parquet shards -> tokenized examples (Ray Data) -> packed micro-batches (in the worker).

One batch, from a shard to the optimizer:

1. ``tokenized_dataset(store, domain, cfg)`` has Ray Data read ``data/sft/<domain>/<split>/*.parquet``
   (all three splits; each row carries its ``split``) straight from the store, and
2. ``Tokenize`` (its ``map_batches`` step, a callable class that loads the tokenizer once per Ray Data
   worker) encodes each row's ``messages`` with the tokenizer's chat template turn by turn
   (pipeline.lm.model.encode_conversation: the tokens a server's template gives), truncates to
   max_seq_length (texts are cut by characters first, so a huge field costs little) and writes
   ``input_ids`` and ``labels`` (-100 on everything but the assistant turns when train.mask_prompt)
   plus ``key``.
   A one-worker trial (pipeline.train.worker) reads and tokenizes in a task of its own instead
   (``tokenized_examples``, the same ``Tokenize``), which keeps the result in ``data/tokens/<domain>/<key>.parquet`` (``token_cache_key``: the tokenizer's
   files, the chat template setting, the truncation settings, the SFT shards and this tokenization code)
   and reads it back on later runs instead of tokenizing again.
3. The worker collects its shard once (``collect``: int32 arrays, sorted by key so the order never
   depends on Ray Data's block order) and, each epoch, shuffles with a seeded permutation and packs
   examples into micro-batches of ``rows x max_seq_length`` tokens (``plan_batches``; rows =
   tokens_per_micro_batch // max_seq_length). The data position is therefore (epoch, batch index).
4. ``collate`` (pipeline.lm.data, shared with the evaluation) builds ``input_ids``, ``position_ids``
   (restarting at 0 for every example), ``targets`` (next-token labels shifted *within* each example, so no example predicts its
   neighbour's first token) and ``seq_ids``. The model gets position_ids and no attention mask:
   transformers derives a block-diagonal causal mask from them (sdpa/eager/flex) or cu_seqlens
   (flash_attention_2), so packed examples never attend to each other.
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import ray

from pipeline import layout
from pipeline.fingerprint import fingerprint
from pipeline.lm.data import Example, example_key, plan_batches, row_messages, tokenize_conversation
from pipeline.lm.model import load_tokenizer, local_model_dir, resolve_base
from pipeline.storage import StorageError, open_store

log = logging.getLogger(__name__)


# ---- 1-2: Ray Data -----------------------------------------------------------------------------

SFT_COLUMNS = ["messages", "doc_id", "split"]


class Tokenize:
    """Ray Data map_batches callable: messages -> input_ids, labels, key (split kept). The tokenizer is
    loaded once per Ray Data worker, when the class is constructed there."""

    def __init__(self, cfg):
        self.train = cfg.train
        self.tok = load_tokenizer(resolve_base(cfg), cfg)

    def __call__(self, batch: dict) -> dict:
        t = self.train
        ids_out, lab_out, keys, splits = [], [], [], []
        for messages, doc_id, split in zip(batch["messages"], batch["doc_id"], batch["split"]):
            msgs = row_messages(messages)
            key = example_key(str(doc_id), msgs)
            for n, (ids, labels) in enumerate(tokenize_conversation(self.tok, msgs, t.max_seq_length, t.mask_prompt)):
                ids_out.append(np.asarray(ids, dtype=np.int32))
                lab_out.append(np.asarray(labels, dtype=np.int32))
                keys.append(key if n == 0 else f"{key}:{n}")
                splits.append(split)
        return {"input_ids": ids_out, "labels": lab_out, "key": keys, "split": splits}


def sft_shards(store, domain: str):
    """(paths, filesystem) of the domain's SFT shards, all splits; FileNotFoundError without train shards."""
    paths, fs = store.parquet_paths(layout.sft(domain))
    if not any(f"/train/" in p for p in paths):
        raise FileNotFoundError(f"no SFT train shards for domain {domain!r} under {store.uri_of(layout.sft(domain))}")
    return paths, fs


def tokenized_dataset(store, domain: str, cfg):
    """One Ray Dataset over the domain's SFT shards (all splits; column `split`), read by Ray Data from
    the store and tokenized inside the pipeline."""
    import ray.data
    paths, fs = sft_shards(store, domain)
    # num_cpus=0: the domain's training workers hold the CPUs they asked for, and this light read and
    # tokenization runs beside them (a task asking for a CPU could wait for a free one forever). Ray
    # Data 2.60's default Parquet reader lists files in a task that always asks for one CPU, so the
    # classic reader (listing in this process, one read task per shard) is used here.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress is the training log's step line; bars here garble worker logs
    classic, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=SFT_COLUMNS, num_cpus=0)
    finally:
        ctx.use_datasource_v2 = classic
    return ds.map_batches(Tokenize, fn_constructor_kwargs={"cfg": cfg}, batch_size=256, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)


# ---- the token cache ------------------------------------------------------------------------------
# Tokenizing is a pure function of the tokenizer, the chat template setting, the truncation settings, the
# SFT shards and the code below; its result is kept beside the shards under that key, so that a re-run (a
# resume, another run name, a sweep) starts no tokenizer at all. No library keeps one across runs for us.

_TOKENIZATION_CODE = [Path(__file__), Path(__file__).parents[1] / "lm" / "data.py",
                      Path(__file__).parents[1] / "lm" / "model.py"]
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def token_cache_key(store, domain: str, cfg, shards=None) -> Optional[str]:
    """What the domain's tokenized examples are made from, as a key; None where the tokenizer's files are not
    on this node (a Hugging Face id not downloaded yet): then nothing is cached. `shards`: sft_shards' answer,
    when the caller has it."""
    model_dir = local_model_dir(resolve_base(cfg, store), cfg)
    if model_dir is None:
        return None
    tokenizer = sorted((f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in model_dir.iterdir()
                       if f.is_file() and not f.name.endswith(_WEIGHTS))
    paths, fs = shards or sft_shards(store, domain)
    files = [(p.rsplit("/", 3)[-3:], i.size, i.mtime_ns) for p, i in zip(paths, fs.get_file_info(paths))]
    t = cfg.train
    return fingerprint({"tokenizer": tokenizer, "chat_template": t.chat_template, "max_seq_length": t.max_seq_length,
                        "mask_prompt": t.mask_prompt, "revision": cfg.model.revision, "shards": files,
                        "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in _TOKENIZATION_CODE]}, 24)


def _as_table(batches: list[dict]) -> pa.Table:
    ints = pa.list_(pa.int32())
    return pa.table({"input_ids": pa.array([a for b in batches for a in b["input_ids"]], type=ints),
                     "labels": pa.array([a for b in batches for a in b["labels"]], type=ints),
                     "key": pa.array([str(k) for b in batches for k in b["key"]], type=pa.string()),
                     "split": pa.array([str(x) for b in batches for x in b["split"]], type=pa.string())})


def _as_batches(table: pa.Table) -> list[dict]:
    return [{c: table.column(c).to_numpy(zero_copy_only=False) for c in ("input_ids", "labels", "key", "split")}]


# A task of its own (in pipeline.train.worker's one-worker trials), defined here so that its process imports
# only what tokenizing needs; num_cpus=0 as for Ray Data's read and tokenization above. It reads and tokenizes
# in its own process rather than through Ray Data: there is one consumer and one tokenizer either way, and
# Ray Data's read would start more processes and, for its Parquet sampling, a task that waits for a whole
# CPU, which the training workers started beside it may hold (the demo's 2-CPU run waited for good).
@ray.remote(num_cpus=0)
def tokenized_examples(cfg, domain: str) -> "Splits":
    """The domain's examples, {split: [Example]}: from the token cache when it holds them, else tokenized
    here (Tokenize, batches of 256 rows) and then cached."""
    store = open_store(cfg)
    key = token_cache_key(store, domain, cfg, sft_shards(store, domain))
    rel = layout.tokens(domain, key) if key else None
    if rel and store.is_file(rel):
        try:
            batches = _as_batches(store.read_table(rel))
            log.info("%s: tokenized examples read from %s", domain, store.uri_of(rel))
            return collect(batches, domain=domain)
        except (StorageError, pa.ArrowException) as e:   # damaged, or gone meanwhile: tokenize again, replace it
            log.warning("%s: token cache %s unreadable (%s); tokenizing again", domain, store.uri_of(rel), e)
    tokenize = Tokenize(cfg)
    rows = store.read_table(layout.sft(domain), columns=SFT_COLUMNS)   # the store's I/O retries
    batches = [tokenize(b.to_pydict()) for b in rows.to_batches(max_chunksize=256)]
    if rel:
        store.write_table(rel, _as_table(batches))
        for old in store.list_files(f"{layout.TOKENS}/{domain}", ".parquet"):   # made from other inputs
            if old != rel:
                store.delete(old)
    return collect(batches, domain=domain)


# ---- 3: examples in the worker -------------------------------------------------------------------

class Splits(dict):
    """{split: [Example]}, and in `without_target` how many of each split's examples were left out because no
    token of theirs is a target (a prompt that filled train.max_seq_length): the training report's
    `n_without_target`. A dict, so every consumer indexes it as before; pickles with its counts."""

    def __init__(self, examples: dict, without_target: Optional[dict] = None) -> None:
        super().__init__(examples)
        self.without_target = dict(without_target or {})


def collect(batches: Iterable[dict], splits=("train", "val", "test"), domain: str = "") -> Splits:
    """Materialize an iterator of tokenized batches into {split: examples}, each in a fixed order
    (by key); examples with no target token (a prompt that filled max_seq_length) are left out, counted
    per split and logged."""
    rows: dict[str, list] = {s: [] for s in splits}
    for b in batches:
        for ids, lab, key, split in zip(b["input_ids"], b["labels"], b["key"], b["split"]):
            rows.setdefault(str(split), []).append((str(key), ids, lab))
    out, left_out = {}, {}
    for s, r in rows.items():
        r.sort(key=lambda x: x[0])
        ex = [Example(ids, lab) for _, ids, lab in r]
        out[s] = [e for e in ex if len(e) >= 2 and e.n_target_tokens > 0]
        left_out[s] = len(ex) - len(out[s])
    if any(left_out.values()):
        log.warning("%s: %s examples left out: no response token within train.max_seq_length (the prompt "
                    "filled it); raise max_seq_length or shorten the prompts", domain or "examples",
                    ", ".join(f"{n} {s}" for s, n in left_out.items() if n))
    return Splits(out, left_out)


def epoch_plan(examples: list[Example], epoch: int, seed: int, rows: int, seq_len: int, packing: bool,
               shuffle: bool = True) -> list[list[list[int]]]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return plan_batches([len(e) for e in examples], order, rows, seq_len, packing)
