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

import random
from typing import Iterable

import numpy as np
import ray

from pipeline import layout
from pipeline.lm.data import Example, example_key, plan_batches, row_messages, tokenize_conversation
from pipeline.lm.model import load_tokenizer, resolve_base


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


def tokenized_dataset(store, domain: str, cfg):
    """One Ray Dataset over the domain's SFT shards (all splits; column `split`), read by Ray Data from
    the store and tokenized inside the pipeline."""
    import ray.data
    paths, fs = store.parquet_paths(layout.sft(domain))
    if not any(f"/train/" in p for p in paths):
        raise FileNotFoundError(f"no SFT train shards for domain {domain!r} under {store.uri_of(layout.sft(domain))}")
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


# a task of its own (in pipeline.train.worker's one-worker trials), defined here so that its process imports
# only what tokenizing needs; num_cpus=0 as for Ray Data's read and tokenization above
@ray.remote(num_cpus=0)
def tokenized_examples(dataset) -> dict:
    """The domain's examples, {split: [Example]}, from its tokenized Ray Dataset (tokenized_dataset)."""
    return collect(dataset.iter_batches(batch_size=256, batch_format="numpy"))


# ---- 3: examples in the worker -------------------------------------------------------------------

def collect(batches: Iterable[dict], splits=("train", "val", "test")) -> dict[str, list[Example]]:
    """Materialize an iterator of tokenized batches into {split: examples}, each in a fixed order
    (by key); examples with no target token (a prompt that filled max_seq_length) are dropped."""
    rows: dict[str, list] = {s: [] for s in splits}
    for b in batches:
        for ids, lab, key, split in zip(b["input_ids"], b["labels"], b["key"], b["split"]):
            rows.setdefault(str(split), []).append((str(key), ids, lab))
    out = {}
    for s, r in rows.items():
        r.sort(key=lambda x: x[0])
        ex = [Example(ids, lab) for _, ids, lab in r]
        out[s] = [e for e in ex if len(e) >= 2 and e.n_target_tokens > 0]
    return out


def epoch_plan(examples: list[Example], epoch: int, seed: int, rows: int, seq_len: int, packing: bool,
               shuffle: bool = True) -> list[list[list[int]]]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return plan_batches([len(e) for e in examples], order, rows, seq_len, packing)
