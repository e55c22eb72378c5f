"""SFT Parquet shards -> tokenized examples (Ray Data) -> packed micro-batches (in the worker).

One batch, from a shard to the optimizer:

1. ``tokenized_dataset(store, domain, cfg)`` has Ray Data read ``data/sft/<domain>/<split>/*.parquet``
   (all three splits; each row carries its ``split``) straight from the store, and
2. ``Tokenize`` (its ``map_batches`` step, a callable class that loads the tokenizer once per Ray Data
   worker) encodes each row's ``messages`` with the tokenizer's chat template turn by turn
   (pipeline.train.model.encode_conversation: the tokens a server's template gives), truncates to
   max_seq_length (texts are cut by characters first, so a huge field costs little) and writes
   ``input_ids`` and ``labels`` (-100 on everything but the assistant turns when train.mask_prompt)
   plus ``key``.
3. The worker collects its shard once (``collect``: int32 arrays, sorted by key so the order never
   depends on Ray Data's block order) and, each epoch, shuffles with a seeded permutation and packs
   examples into micro-batches of ``rows x max_seq_length`` tokens (``plan_batches``; rows =
   tokens_per_micro_batch // max_seq_length). The data position is therefore (epoch, batch index).
4. ``collate`` builds ``input_ids``, ``position_ids`` (restarting at 0 for every example),
   ``targets`` (next-token labels shifted *within* each example, so no example predicts its
   neighbour's first token) and ``seq_ids``. The model gets position_ids and no attention mask:
   transformers derives a block-diagonal causal mask from them (sdpa/eager/flex) or cu_seqlens
   (flash_attention_2), so packed examples never attend to each other.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterable, Optional

import numpy as np

from pipeline import layout

IGNORE = -100


# ---- 1-2: Ray Data -----------------------------------------------------------------------------

SFT_COLUMNS = ["messages", "doc_id", "split"]
# Texts are cut to this many characters per token of max_seq_length before tokenizing: no tokenizer
# makes tokens that long, so nothing that could be kept is lost, and a hostile 60 MB field costs no
# more to tokenize than a long document.
CHARS_PER_TOKEN_BOUND = 32


def read_split(store, domain: str, split: str, columns=("messages", "doc_id")):
    """One split's SFT rows as a pyarrow Table, read in this process (evaluation, the bench)."""
    return store.read_table(layout.sft(domain, split), columns=list(columns))


def cut_prompt_response(p: list, r: list, max_len: int) -> tuple[list, list]:
    """Keep at most half the length for the prompt (its end), the response fills the rest (its start)."""
    if len(p) + len(r) <= max_len:
        return p, r
    keep_p = min(len(p), max(max_len // 2, max_len - len(r)))
    p = p[len(p) - keep_p:]
    return p, r[: max_len - len(p)]


def row_messages(messages) -> list[dict]:
    """A Parquet ``messages`` cell (a list of {role, content}; numpy arrays out of Ray Data) as plain dicts."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def cut_texts(messages: list[dict], limit: int) -> list[dict]:
    """Each turn cut to limit characters before tokenizing: an answer keeps its start, any other turn its end."""
    return [{"role": m["role"], "content": m["content"][:limit] if m["role"] == "assistant" else m["content"][-limit:]}
            for m in messages]


def tokenize_conversation(tok, messages: list[dict], max_len: int, mask_prompt: bool) -> list[tuple[list[int], list[int]]]:
    """[(input_ids, labels)] for one conversation (usually one sequence: pipeline.train.model.
    encode_conversation); labels are -100 outside the assistant turns when mask_prompt. A sequence
    over max_len keeps the end of what precedes the first answer (at most half) and what follows from
    its start."""
    from pipeline.train.model import encode_conversation
    out = []
    for ids, trained in encode_conversation(tok, cut_texts(messages, CHARS_PER_TOKEN_BOUND * max_len)):
        s0 = trained.index(True) if True in trained else len(ids)
        p, r = cut_prompt_response(list(zip(ids[:s0], trained[:s0])), list(zip(ids[s0:], trained[s0:])), max_len)
        ids = [i for i, _ in p + r]
        labels = [i if (t or not mask_prompt) else IGNORE for i, t in p + r]
        out.append((ids, labels))
    return out


def example_key(doc_id: str, messages: list[dict]) -> str:
    """A row's stable key (the order of the collected examples; the evaluation's row order)."""
    return hashlib.sha1("\x00".join([doc_id] + [f"{m['role']}\x01{m['content']}" for m in messages]).encode()).hexdigest()


class Tokenize:
    """Ray Data map_batches callable: messages -> input_ids, labels, key (split kept). The tokenizer is
    loaded once per Ray Data worker, when the class is constructed there."""

    def __init__(self, cfg):
        from pipeline.train.model import load_tokenizer, resolve_base
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


# ---- 3: examples in the worker -------------------------------------------------------------------

class Example:
    __slots__ = ("input_ids", "labels")

    def __init__(self, input_ids, labels):
        self.input_ids = np.asarray(input_ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())


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


def plan_batches(lengths: list[int], order: list[int], rows: int, seq_len: int, packing: bool = True) -> list[list[list[int]]]:
    """Group example indices (taken in `order`) into micro-batches of `rows` rows of at most
    `seq_len` tokens. packing: first-fit of several examples per row; else one example per row."""
    batches: list[list[list[int]]] = []
    cur: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = min(lengths[i], seq_len)
        if not packing:
            cur.append([i])
            if len(cur) == rows:
                batches.append(cur)
                cur = []
            continue
        for r, used in enumerate(fill):
            if used + n <= seq_len:
                cur[r].append(i)
                fill[r] += n
                break
        else:
            if len(cur) == rows:
                batches.append(cur)
                cur, fill = [], []
            cur.append([i])
            fill.append(n)
    if cur:
        batches.append(cur)
    return batches


def epoch_plan(examples: list[Example], epoch: int, seed: int, rows: int, seq_len: int, packing: bool,
               shuffle: bool = True) -> list[list[list[int]]]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return plan_batches([len(e) for e in examples], order, rows, seq_len, packing)


# ---- 4: tensors ----------------------------------------------------------------------------------

def collate(examples: list[Example], batch: list[list[int]], pad_id: int, seq_len: Optional[int] = None) -> dict:
    """Tensors for one micro-batch. Rows are padded to the longest row (or seq_len); padding has its
    own position ids (a dummy trailing sequence) and targets -100."""
    import torch
    lens = [sum(len(examples[i]) for i in row) for row in batch]
    width = seq_len or max(lens)
    B = len(batch)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    tgt = torch.full((B, width), IGNORE, dtype=torch.long)
    sid = torch.zeros((B, width), dtype=torch.long)
    for r, row in enumerate(batch):
        o = 0
        for k, i in enumerate(row):
            e = examples[i]
            n = len(e)
            ids[r, o:o + n] = torch.from_numpy(e.input_ids)
            pos[r, o:o + n] = torch.arange(n)
            tgt[r, o:o + n - 1] = torch.from_numpy(e.labels[1:])
            sid[r, o:o + n] = k + 1
            o += n
        if o < width:
            pos[r, o:] = torch.arange(width - o)
    return {"input_ids": ids, "position_ids": pos, "targets": tgt, "seq_ids": sid,
            "n_tokens": int(sum(lens)), "n_targets": int((tgt != IGNORE).sum())}
