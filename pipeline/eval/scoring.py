"""Model-side scoring, run inside the evaluation's Ray task (and by `adapters generate`).

    TokenizedPlan(tok, plan, train, max_new_tokens)  a domain's items as token sequences, once per task:
        a loss sequence per item (its conversation as trained: pipeline.lm.data.tokenize_conversation),
        the sequences its kind scores (pipeline.eval.tasks: one per choice of a scored multiple-choice
        item), and the prompt of each item to generate from (messages[:-1] through the chat template,
        with its generation prompt)
    sequence_logprobs(model, examples, rows, seq_len, pad_id, device) -> (sum of target log-probs, target tokens)
        per sequence, packed several to a row (first-fit decreasing, per-example position ids: packed
        sequences never attend to each other, as in training); the LM head runs on target tokens only,
        in chunks, so the (tokens x vocabulary) logits are never held at once
    score_items(model, tok, tp, plan, device, ev, train, side_by_side) -> one result dict per item: the loss,
        then what the item's kind makes of its sequences' log-likelihoods and of its generation
        (generation itself: pipeline.lm.generation.generate_texts)
    BaseAndAdapters(model, store).use(name)                 the base model or an adapter on it (PEFT switching)
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from pipeline import layout
from pipeline.errors import UsageError
from pipeline.eval.tasks import SCORERS, scorer_of
from pipeline.lm.data import Example, collate, plan_batches, tokenize_conversation
from pipeline.lm.generation import generate_texts, inner_model, prompt_ids
from pipeline.lm.kernels import head_logits, pad_batch
from pipeline.lm.model import load_adapter_onto

log = logging.getLogger(__name__)

HEAD_CHUNK_TOKENS = 2048     # LM-head rows computed at once when scoring


# ---- models ------------------------------------------------------------------------------------

class AdapterMismatchError(UsageError):
    """An adapter whose weights do not fit the base model loaded (trained on another base)."""


class BaseAndAdapters:
    """The base model loaded once and the output's adapters on top of it, switched with PEFT
    (load_adapter / set_adapter; the base model itself through disable_adapter())."""

    def __init__(self, model, store):
        self.model, self.store, self.peft = model, store, None

    def _mismatch(self, name: str, error: str) -> str:
        """One line: which adapter, the first mismatching weight, the base it says it was trained on."""
        first = next((ln.strip() for ln in error.splitlines() if "size mismatch" in ln), "size mismatch")
        rel = layout.training_report(name)
        try:
            rep = self.store.read_json(rel) if self.store.is_file(rel) else {}
        except Exception:  # noqa: BLE001 - only for the message
            rep = {}
        trained_on = (rep.get("compat") or {}).get("model.base") or rep.get("base_model") if isinstance(rep, dict) else None
        here = getattr(getattr(self.model, "config", None), "_name_or_path", "") or "the base model loaded"
        return (f"the {name} adapter ({self.store.uri_of(layout.adapter(name))}) was trained on another base model"
                + (f" ({trained_on})" if trained_on else "") + f" than {here}: {first[:200]}; use the base it was "
                "trained on (--config with that run's YAML, or --set model.base=...)")

    @contextlib.contextmanager
    def use(self, name: str):
        """`with models.use("base" | domain) as m:` the model to run."""
        if name == "base":
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        if self.peft is None or name not in self.peft.peft_config:
            try:
                with self.store.local_copy(layout.adapter(name)) as path:
                    if self.peft is None:
                        self.peft = load_adapter_onto(self.model, path, adapter_name=name)
                    else:
                        self.peft.load_adapter(path, adapter_name=name)
            except RuntimeError as e:
                if "size mismatch" not in str(e):
                    raise
                raise AdapterMismatchError(self._mismatch(name, str(e))) from None
        self.peft.set_adapter(name)
        yield self.peft


# ---- tokenization -------------------------------------------------------------------------------

class TokenizedPlan:
    """A DatasetPlan's token sequences (built once per task: the tokenizer is the same for every model)."""

    def __init__(self, tok, plan, train, max_new_tokens: int):
        self.examples: list = []
        self.loss_of: dict[int, int] = {}             # item index -> its loss sequence
        self.sequences_of: dict[int, list[int]] = {}   # item index -> the sequences its kind scores (choices ...)
        self.prompts: dict[int, list[int]] = {}        # item index -> prompt ids to generate from
        L = train.max_seq_length
        for i, it in enumerate(plan.items):
            # the loss of the row as trained: the last sequence holds the reference answer
            ids, labels = tokenize_conversation(tok, it.conversation, L, train.mask_prompt)[-1]
            ex = Example(ids, labels)
            if len(ex) >= 2 and ex.n_target_tokens > 0:
                self.loss_of[i] = self._add(ex)
            seqs = scorer_of(it.kind).sequences(tok, it, L)
            if seqs:
                self.sequences_of[i] = [self._add(e) for e in seqs]
            if it.generate or it.side_by_side:
                self.prompts[i] = prompt_ids(tok, it.prompt_messages, max(16, L - max_new_tokens))

    def _add(self, ex) -> int:
        self.examples.append(ex)
        return len(self.examples) - 1


# ---- log-likelihoods ----------------------------------------------------------------------------

def _head_logprobs(lm, h, y):
    """log p(y | h) for hidden states h (N x H) and targets y (N), through the LM head in chunks."""
    import torch
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], HEAD_CHUNK_TOKENS):
        logits = head_logits(lm, h[s:s + HEAD_CHUNK_TOKENS])
        out[s:s + HEAD_CHUNK_TOKENS] = logits.float().log_softmax(-1).gather(1, y[s:s + HEAD_CHUNK_TOKENS, None])[:, 0]
    return out


def _owners(examples, batch, width: int):
    """(rows x width) example index of each target position (-1 elsewhere), laid out as collate does."""
    import torch
    own = torch.full((len(batch), width), -1, dtype=torch.long)
    for r, row in enumerate(batch):
        o = 0
        for i in row:
            n = len(examples[i])
            own[r, o:o + n - 1] = i
            o += n
    return own


def sequence_logprobs(model, examples, rows: int, seq_len: int, pad_id: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probs of each sequence's target tokens, its target tokens), packed and batched."""
    import torch
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.long)
    if not examples:
        return sums.numpy(), counts.numpy()
    lm = inner_model(model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))   # first-fit decreasing
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in plan_batches([len(e) for e in examples], order, rows, seq_len, packing=True):
            batch = pad_batch(collate(examples, b, pad_id), getattr(model, "_seq_multiple", 1))
            own = _owners(examples, b, batch["input_ids"].shape[1])
            ids, pos = batch["input_ids"].to(device), batch["position_ids"].to(device)
            tgt = batch["targets"]
            sel = tgt != -100
            if hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None:
                hidden = lm.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                lp = _head_logprobs(lm, hidden[sel.to(device)], tgt[sel].to(device))
            else:
                logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[sel.to(device)].float()
                lp = logits.log_softmax(-1).gather(1, tgt[sel].to(device)[:, None])[:, 0]
            who = own[sel]
            sums.index_add_(0, who, lp.double().cpu())
            counts.index_add_(0, who, torch.ones_like(who))
    model.train(was_training)
    return sums.numpy(), counts.numpy()


# ---- one model on one dataset -------------------------------------------------------------------

def score_items(model, tok, tp: TokenizedPlan, plan, device, ev, train, side_by_side: bool) -> list[dict]:
    """Per item: loss (sum, tokens), its kind's scores of its sequences' log-likelihoods (multiple choice:
    choice_ll, pred, pred_norm), generation and its kind's scores of it (free text: rouge_l, f1)."""
    rows = max(1, (ev.tokens_per_batch or 4 * train.tokens_per_micro_batch) // train.max_seq_length)
    sums, counts = sequence_logprobs(model, tp.examples, rows, train.max_seq_length, tok.pad_token_id, device)
    want = [i for i, it in enumerate(plan.items) if i in tp.prompts and (it.generate or side_by_side)]
    texts = generate_texts(model, tok, [tp.prompts[i] for i in want], ev.max_new_tokens, device,
                           rows * train.max_seq_length) if want else []
    generated = dict(zip(want, texts))
    results = []
    for i, it in enumerate(plan.items):
        r: dict = {"key": it.key}
        if i in tp.loss_of:
            j = tp.loss_of[i]
            r.update(loss_sum=float(-sums[j]), n_tokens=int(counts[j]))
        if i in tp.sequences_of:
            r.update(scorer_of(it.kind).score_likelihoods(it, [float(sums[j]) for j in tp.sequences_of[i]]))
        if i in generated:
            r["generation"] = generated[i]
            if it.generate:
                r.update(scorer_of(it.kind).score_generation(it, generated[i]))
        results.append(r)
    return results


def summary_line(plan, results: list[dict]) -> str:
    """Loss, accuracy and ROUGE-L of one model on one dataset, for the progress log."""
    tok = sum(r.get("n_tokens", 0) for r in results)
    parts = [f"loss {sum(r.get('loss_sum', 0.0) for r in results) / tok:.4f}" if tok else "loss n/a"]
    for kind, s in SCORERS.items():
        mine = [(it, r) for it, r in zip(plan.items, results) if it.kind == kind]
        parts += s.progress([it for it, _ in mine], [r for _, r in mine])
    return ", ".join(parts)
