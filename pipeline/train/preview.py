"""`adapters prepare --show-examples N`: what a prepared row becomes for training, before any training.

Each shown row is its conversation encoded as training encodes it (pipeline.lm.data.
tokenize_conversation, the base model's chat template turn by turn), decoded back to text with the
trained tokens between ⟦ and ⟧; so a user sees the exact prompt layout a server will use and which
part carries loss. The tiny demo model's tokenizer is trained from the prepared corpus by `adapters
train`: until it exists the rows are shown as conversations only.
"""
from __future__ import annotations

import logging

from pipeline.lm.data import IGNORE, read_split, row_messages, tokenize_conversation
from pipeline.lm.model import ModelLoadError, load_tokenizer, resolve_base

log = logging.getLogger(__name__)
OPEN, CLOSE = "⟦", "⟧"


def render(tok, ids: list[int], labels: list[int]) -> str:
    """The sequence as text, trained runs of tokens wrapped in ⟦ ⟧ (decoded run by run)."""
    out, run, on = [], [], False
    for i, lab in zip(ids, labels):
        if (lab != IGNORE) != on and run:
            out.append(tok.decode(run) if not on else OPEN + tok.decode(run) + CLOSE)
            run = []
        on = lab != IGNORE
        run.append(i)
    if run:
        out.append(tok.decode(run) if not on else OPEN + tok.decode(run) + CLOSE)
    return "".join(out)


def show_examples(cfg, store, n: int) -> list[str]:
    """The first n train rows of each prepared domain, rendered; also logged (the console shows them)."""
    try:
        tok = load_tokenizer(resolve_base(cfg, store), cfg)
    except ModelLoadError as e:
        tok = None
        log.info("show-examples: no tokenizer yet (%s); the rows as conversations", str(e).split(":")[0])
    shown = []
    for domain in cfg.domains:
        try:
            rows = read_split(store, domain, "train", columns=("messages", "source")).slice(0, n).to_pylist()
        except FileNotFoundError:
            continue
        for k, r in enumerate(rows):
            msgs = row_messages(r["messages"])
            if tok is None:
                text = "\n".join(f"[{m['role']}] {m['content']}" for m in msgs)
            else:
                seqs = tokenize_conversation(tok, msgs, cfg.train.max_seq_length, cfg.train.mask_prompt)
                text = "\n-- next sequence --\n".join(
                    f"{render(tok, ids, labels)}\n({len(ids)} tokens, {sum(x != -100 for x in labels)} trained)"
                    for ids, labels in seqs)
            shown.append(text)
            log.info("show-examples: %s row %d (%s); trained tokens between %s %s:\n%s", domain, k + 1, r["source"],
                     OPEN, CLOSE, text)
    return shown
