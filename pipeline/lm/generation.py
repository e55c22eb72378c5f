"""Generating text with the loaded model: what the evaluation (pipeline.eval.scoring), `adapters generate`
and `adapters serve` share.

    inner_model(model) -> the causal LM under a PeftModel (the model itself otherwise)
    prompt_ids(tok, messages, max_len) -> what a server sends the model for these turns
    eos_ids(model, tok) -> every token id that ends a generation (the model's and the tokenizer's)
    generation_attention(model)  context: SDPA while generating when the model runs flex attention
    generate_texts(model, tok, prompts, max_new_tokens, device, batch_tokens, temperature, seed) -> texts
        batched (left-padded, longest first) greedy or sampled generation
"""
from __future__ import annotations

import contextlib

from pipeline.lm.data import CHARS_PER_TOKEN_BOUND, cut_texts
from pipeline.lm.model import prompt_tokens

MAX_GENERATION_BATCH = 64


def inner_model(model):
    """The causal LM under a PeftModel (its config, generation config and LM head live there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_ids(tok, messages: list[dict], max_len: int) -> list[int]:
    """What a server sends the model for these turns (the chat template with its generation prompt, as
    training encodes them); its end kept when too long."""
    return prompt_tokens(tok, cut_texts(messages, CHARS_PER_TOKEN_BOUND * max_len))[-max_len:]


@contextlib.contextmanager
def generation_attention(model):
    """SDPA while generating when the model runs flex attention (its decoding path is for >= 128 queries
    and is not used in training)."""
    lm = inner_model(model)
    impl = getattr(lm.config, "_attn_implementation", None)
    switched = impl == "flex_attention" and hasattr(lm, "set_attn_implementation")
    if switched:
        lm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switched:
            lm.set_attn_implementation(impl)


def eos_ids(model, tok) -> list[int]:
    """Every token id that ends a generation: the model's generation config's (one or several) and the tokenizer's."""
    ids = getattr(inner_model(model).generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    return sorted(set(ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))


def generate_texts(model, tok, prompts: list[list[int]], max_new_tokens: int, device, batch_tokens: int,
                   temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Generations for token-id prompts (in their order); greedy when temperature is 0."""
    import torch   # inside: importing pipeline.lm stays free of torch (a CPU head node)
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sample:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    i = 0
    with torch.no_grad(), generation_attention(model):
        while i < len(order):
            width = len(prompts[order[i]]) + max_new_tokens
            chunk = order[i:i + max(1, min(MAX_GENERATION_BATCH, batch_tokens // width))]
            L = max(len(prompts[j]) for j in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, j in enumerate(chunk):   # left padding: every prompt ends where generation starts
                ids[r, L - len(prompts[j]):] = torch.tensor(prompts[j])
                mask[r, L - len(prompts[j]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos_ids(model, tok), use_cache=True, **kw)
            for r, j in enumerate(chunk):
                out[j] = tok.decode(gen[r, L:], skip_special_tokens=True).strip()
            i += len(chunk)
    model.train(was_training)
    return out
