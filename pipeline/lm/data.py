"""Tokenization and batching that training and the evaluation share: one conversation -> token ids and
labels, examples packed into micro-batches, a micro-batch -> tensors. (Ray Data's read and tokenization of
the SFT shards, and the per-epoch plan, are the training's: pipeline.train.data.)

    tokenize_conversation(tok, messages, max_len, mask_prompt) -> [(input_ids, labels)]: each row's
        ``messages`` encoded with the tokenizer's chat template turn by turn (pipeline.lm.model.
        encode_conversation: the tokens a server's template gives), truncated to max_len (texts are cut
        by characters first, so a huge field costs little); labels are -100 (IGNORE) on everything but
        the assistant turns when mask_prompt
    plan_batches(lengths, order, rows, seq_len, packing) -> micro-batches of example indices: rows x
        seq_len tokens (first-fit packing of several examples per row, or one example per row)
    collate(examples, batch, pad_id) -> ``input_ids``, ``position_ids`` (restarting at 0 for every
        example), ``targets`` (next-token labels shifted *within* each example, so no example predicts
        its neighbour's first token) and ``seq_ids``. The model gets position_ids and no attention
        mask: transformers derives a block-diagonal causal mask from them (sdpa/eager/flex) or
        cu_seqlens (flash_attention_2), so packed examples never attend to each other.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from pipeline import layout
from pipeline.lm.model import encode_conversation

IGNORE = -100


# ---- texts -> tokens ----------------------------------------------------------------------------

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
    """[(input_ids, labels)] for one conversation (usually one sequence: pipeline.lm.model.
    encode_conversation); labels are -100 outside the assistant turns when mask_prompt. A sequence
    over max_len keeps the end of what precedes the first answer (at most half) and what follows from
    its start."""
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


# ---- examples -> micro-batches -------------------------------------------------------------------

class Example:
    """One tokenized conversation. Its arrays are its own and writable, also when it comes out of Ray's object
    store (whose arrays are read-only views: torch.from_numpy warns on them)."""
    __slots__ = ("input_ids", "labels")

    def __init__(self, input_ids, labels):
        self.input_ids = np.array(input_ids, dtype=np.int64)
        self.labels = np.array(labels, dtype=np.int64)

    def __reduce__(self):
        return Example, (self.input_ids, self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())


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


# ---- micro-batch -> tensors ----------------------------------------------------------------------------------

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
