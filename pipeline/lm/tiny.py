"""The demo base model: a small Llama built from cfg.model.tiny with a byte-level BPE tokenizer
trained (with `tokenizers`) on the prepared text, cached under <output>/base_model/. No network.

    ensure_tiny(cfg, store=None) -> str   the output URI of base_model/ (built once; rebuilt when
                                          model.tiny or the seed changes)

With model.tiny.pretrain_steps > 0 it is briefly pre-trained (plain causal LM, full weights, fp32)
on the mixed train-split text of every domain so that adapters have something real to specialise; the
tokenizer is trained on the same text. Nothing of the val or test splits is in it (``_texts``).
"""
from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path

from pipeline import layout
from pipeline.fingerprint import fingerprint
from pipeline.storage import open_store

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<s>", "</s>"]


def _text_files(store) -> dict[str, list[str]]:
    """The Parquet files the tiny model's text is chosen from, per domain: its corpus and its SFT splits
    (the splits say which corpus documents are train-split). Every prepared domain, not only those a run
    selected: `--domains` must not rebuild (and change) the base model the other domains' adapters were
    trained on."""
    files: dict[str, list[str]] = {}
    for f in store.list_files(layout.CORPUS, ".parquet") + store.list_files(layout.SFT, ".parquet"):
        files.setdefault(f.split("/")[2], []).append(f)
    return {d: sorted(files[d]) for d in sorted(files)}


def tiny_fingerprint(cfg, store=None) -> str:
    """What the tiny model is built from: model.tiny, the text files (names and sizes), and which text of
    them it learns from (TEXT_RULE: a change of the rule rebuilds it)."""
    store = store or open_store(cfg)
    d = cfg.model.tiny.model_dump(mode="json")
    d["text"] = [(f, store.size(f)) for files in _text_files(store).values() for f in files]
    d["rule"] = TEXT_RULE
    return fingerprint(d, 16)


TEXT_RULE = "train split only"


def _split_doc_ids(store, domain: str) -> dict[str, set]:
    """The doc_ids of each SFT split of a domain."""
    out = {}
    for split in ("train", "val", "test"):
        rel = layout.sft(domain, split)
        out[split] = (set(store.read_table(rel, columns=["doc_id"]).column("doc_id").to_pylist())
                      if store.list_files(rel, ".parquet") else set())
    return out


def _texts(cfg, store) -> list[str]:
    """Train-split text of every prepared domain (see _text_files), so that the demo's val and test losses
    are on text the base model has not seen: the corpus documents whose SFT examples are all in the train
    split (a document with a val or test example, or with none, is left out), else, for a domain without
    such documents, its SFT train conversations."""
    texts: list[str] = []
    for domain, files in _text_files(store).items():
        ids = _split_doc_ids(store, domain)
        train_only = ids["train"] - ids["val"] - ids["test"]
        kept = []
        if any(f.startswith(layout.CORPUS + "/") for f in files):
            t = store.read_table(layout.corpus(domain), columns=["doc_id", "text"])
            kept = [x for i, x in zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist())
                    if x and i in train_only]
        if not kept and ids["train"]:
            t = store.read_table(layout.sft(domain, "train"), columns=["messages"]).column("messages").to_pylist()
            kept = ["\n".join(m["content"] for m in msgs) for msgs in t]
        texts.extend(kept)
    if not texts:
        raise RuntimeError(f"no train-split text to build the tiny model from under {store.uri_of(layout.DATA)}: "
                           "run `adapters prepare` first")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 20)


def build_model(cfg, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    t = cfg.model.tiny
    torch.manual_seed(t.seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                     num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                     num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=False)
    return LlamaForCausalLM(mc)


def pretrain(model, tok, texts: list[str], steps: int, seed: int, seq_len: int = 256, batch: int = 8,
             lr: float = 3e-3) -> list[float]:
    """A few hundred steps of causal-LM training on the concatenated, shuffled corpus."""
    import torch
    rng = random.Random(seed)
    texts = texts[:]
    rng.shuffle(texts)
    ids: list[int] = []
    for x in texts:
        ids.extend(tok.encode(x, add_special_tokens=False) + [tok.eos_token_id])
    n = len(ids) // seq_len
    if n == 0:
        return []
    data = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def ensure_tiny(cfg, store=None) -> str:
    """Build (once) and cache the tiny base model under <output>/base_model/; returns its URI."""
    import torch
    store = store or open_store(cfg)
    fp = tiny_fingerprint(cfg, store)
    meta = store.read_json_or(layout.TINY_META)
    if meta and meta.get("fingerprint") == fp:
        return store.uri_of(layout.TINY_BASE)
    t0 = time.time()
    texts = _texts(cfg, store)
    tok = train_tokenizer(texts, cfg.model.tiny.vocab_size)
    model = build_model(cfg, tok)
    losses: list[float] = []
    if cfg.model.tiny.pretrain_steps:
        threads = torch.get_num_threads()
        losses = pretrain(model, tok, texts, cfg.model.tiny.pretrain_steps, cfg.model.tiny.seed)
        torch.set_num_threads(threads)
    # only what an earlier build wrote is deleted (a folder this project did not make, used with --force,
    # keeps its own files); a build recorded before "files" existed wrote the whole folder
    if meta and isinstance(meta.get("files"), list):
        for f in meta["files"] + ["tiny_meta.json"]:
            if store.is_file(f"{layout.TINY_BASE}/{f}"):
                store.delete(f"{layout.TINY_BASE}/{f}")
    elif meta and store.exists(layout.TINY_BASE):
        store.delete(layout.TINY_BASE)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        files = sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())
        store.upload_dir(d, layout.TINY_BASE)
    n_params = sum(p.numel() for p in model.parameters())
    store.write_json(layout.TINY_META, {  # written last: the completion marker
        "fingerprint": fp, "tiny": cfg.model.tiny.model_dump(mode="json"), "parameters": n_params, "files": files,
        "texts": len(texts), "pretrain_loss_first": losses[0] if losses else None,
        "pretrain_loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "build_s": round(time.time() - t0, 1)})
    log.info("built tiny base model (%d parameters, pretrain loss %s) in %.1fs at %s", n_params,
             f"{losses[0]:.2f}->{losses[-1]:.2f}" if losses else "n/a", time.time() - t0, store.uri_of(layout.TINY_BASE))
    return store.uri_of(layout.TINY_BASE)
