"""Base model resolution and loading: 'tiny' / Hugging Face id / local directory / s3:// URI.

    resolve_base(cfg)              -> a local directory or a Hugging Face id that from_pretrained takes
    load_tokenizer(path, cfg)      -> the tokenizer (pad token set; a chat template, see below)
    load_model(path, cfg, device)  -> the causal LM: 4-bit NF4 (double quant) when model.quantization
                                      is nf4 (quantized once per node, then read from model.cache_dir),
                                      else plain weights in the compute dtype
    add_lora(model, lora, cfg)     -> the PEFT model with only the LoRA weights trainable (lora: config.LoraSettings)
    encode_conversation(tok, messages) -> [(input_ids, trained)]: the tokens and which of them carry loss

Prompt format: always the tokenizer's chat template, applied the way a server applies it (vLLM, Ray
Serve, transformers pipelines, OpenAI-style clients): turn by turn, the system message in its own
slot. A tokenizer without one (or train.chat_template: simple) gets DEFAULT_CHAT_TEMPLATE, which
load_tokenizer sets on it, so it is saved with every adapter's tokenizer files and served the same:

    <bos>### System:\n{system}\n\n### Question:\n{user}\n\n### Answer:\n{assistant}<eos>\n\n...

Loss covers each assistant turn's content and its end-of-turn token (the template's tokens up to and
including the tokenizer's EOS), nothing else, as TRL's ``assistant_only_loss`` does.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

from pipeline import layout
from pipeline.fingerprint import fingerprint
from pipeline.lm.kernels import prepare_for_kbit, set_sequence_multiple
from pipeline.storage import open_store, Store

log = logging.getLogger(__name__)

# The chat template of a tokenizer that has none (or train.chat_template: simple). Each assistant turn
# opens with the same "### Answer:\n" that the generation prompt ends with, so a prompt is a prefix of
# its answered conversation.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '### System:\\n' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Question:\\n' + m['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Answer:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Answer:\\n' }}{% endif %}")


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded; the message says what to set."""


# ---- where the base model is -----------------------------------------------------------------

def resolve_base(cfg, store=None) -> str:
    """A path or id that from_pretrained accepts for cfg.model.base.

    'tiny' -> <output>/base_model/ (built by pipeline.lm.tiny.ensure_tiny; an s3:// output is
    synced to the local cache); s3://... -> synced once per node into model.cache_dir; a local
    directory -> itself; anything else is taken as a Hugging Face id (revision = model.revision).
    """
    base = cfg.model.base
    if base == "tiny":
        store = store or open_store(cfg)
        if not store.is_file(layout.TINY_META):
            raise ModelLoadError(f"the tiny base model is not built yet under {store.uri_of(layout.TINY_BASE)}: "
                                 "run `adapters train` (it builds it first) or call pipeline.lm.tiny.ensure_tiny(cfg)")
        if not store.is_s3:
            return str(store.local_path(layout.TINY_BASE))
        return _sync_s3_dir(store.sub(layout.TINY_BASE), cfg)
    if base.startswith("s3://"):
        return _sync_s3_dir(Store(base, cfg.storage), cfg)
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"base model directory {p} has no config.json: set model.base to a directory "
                                 "written by save_pretrained, a Hugging Face id or an s3:// URI")
        return str(p)
    if base.startswith((".", "/", "~")) or os.sep in base and base.count("/") != 1:
        raise ModelLoadError(f"base model not found at {base}: set model.base to a Hugging Face id "
                             "(owner/name), a local directory or an s3:// URI")
    return base  # a Hugging Face id


def cache_root(cfg) -> Path:
    """This node's cache: s3:// base models and 4-bit weights."""
    return Path(cfg.model.cache_dir or Path.home() / ".cache" / "domain-adapters").expanduser()


def _sync_s3_dir(src, cfg) -> str:
    """Copy an s3:// model directory once per node into the local cache (marker file = complete)."""
    dst = cache_root(cfg) / hashlib.sha256(src.uri.encode()).hexdigest()[:16]
    marker = dst / ".complete"
    if marker.is_file():
        return str(dst)
    files = src.list_files("")
    if not any(f.endswith("config.json") for f in files):
        raise ModelLoadError(f"no model found at {src.uri} (no config.json): set model.base to an s3:// "
                             "prefix holding a save_pretrained directory")
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    src.download_dir("", tmp)
    if dst.exists():  # another process on this node finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(dst)
    marker.write_text(src.uri)
    log.info("synced base model %s to %s", src.uri, dst)
    return str(dst)


# ---- dtype and attention ---------------------------------------------------------------------

def compute_dtype(cfg, device: str):
    """float32 on CPU; on CUDA bf16 where supported, else fp16 (the loop then uses a GradScaler)."""
    import torch
    name = cfg.model.compute_dtype
    if device == "cpu":
        return torch.float32
    if name == "auto":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.warning("this GPU has no bfloat16: computing in float16 with loss scaling")
        return torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def attn_implementation(cfg, device: str) -> str:
    """'auto': flex_attention on CUDA (a block mask that skips the blocks between packed examples;
    2.25x SDPA on an H100, bench/NOTES.md), sdpa on CPU. Every path keeps packed examples apart: the
    loop passes per-example position_ids and no attention mask, from which transformers builds the
    block-diagonal mask (sdpa/eager/flex) or the cu_seqlens (flash_attention_2)."""
    impl = cfg.model.attn_implementation
    if impl != "auto":
        return impl
    return "flex_attention" if device.startswith("cuda") else "sdpa"


# ---- loading ---------------------------------------------------------------------------------

def _refuse_remote_code(e: Exception, path: str, cfg) -> None:
    """transformers refused code shipped with the model (trust_remote_code false): say so, and what to do."""
    if not cfg.model.trust_remote_code and "custom code" in str(e):
        raise ModelLoadError(
            f"the model at {path} ships its own code (a custom model_type / auto_map) and model.trust_remote_code "
            "is false, so none of it was run. Read that code, then set model.trust_remote_code: true to allow it, "
            "or use a model whose architecture transformers supports itself") from None


def load_tokenizer(path: str, cfg):
    from transformers import AutoTokenizer
    try:
        # trust_remote_code is always passed (never None): with None transformers asks on the terminal
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision if path == cfg.model.base else None,
                                            trust_remote_code=bool(cfg.model.trust_remote_code))
    except Exception as e:
        _refuse_remote_code(e, path, cfg)
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}; set model.base to a model that ships one") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.train.chat_template == "simple" or not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with the adapter: served as trained
    return tok


def load_model(path: str, cfg, device: str, quantize: Optional[bool] = None, dtype=None):
    """The base causal LM on `device`, 4-bit NF4 with double quantization unless model.quantization is none;
    in the compute dtype unless `dtype` says otherwise (the merged export asks for bfloat16). 4-bit weights
    come from this node's cache when an earlier load put them there (model.cache_quantized)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantize = (cfg.model.quantization == "nf4") if quantize is None else quantize
    dtype = dtype or compute_dtype(cfg, device)
    kw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=bool(cfg.model.trust_remote_code),
                              attn_implementation=attn_implementation(cfg, device))
    if path == cfg.model.base and cfg.model.revision:
        kw["revision"] = cfg.model.revision
    cached = quantized_cache(path, cfg, dtype) if quantize else None
    if quantize:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.model.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        kw["device_map"] = {"": device}
    try:
        if cached and (cached / CACHE_COMPLETE).is_file():
            # a checkpoint of 4-bit weights: its config.json holds the quantization config, nothing is quantized
            model = AutoModelForCausalLM.from_pretrained(
                cached, **{k: v for k, v in kw.items() if k not in ("quantization_config", "revision")})
            model.config._name_or_path = path   # the base's name in messages and saved configs, not the cache's
            log.info("4-bit weights of %s read from this node's cache %s", path, cached)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            if cached:
                cache_quantized_weights(model, cached)
    except OSError as e:
        raise ModelLoadError(f"base model not found at {path}: {e}. Set model.base to a Hugging Face id, "
                             "a local directory or an s3:// URI") from None
    except ValueError as e:
        _refuse_remote_code(e, path, cfg)
        raise
    if not quantize:
        model.to(device)
    elif device == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPU inference the first time a
        # Linear4bit runs in eval mode, and keeps them so: later training forwards then go through
        # an op without autograd, and gradients stop at that layer (torch warns "gemv_4bit: an
        # autograd kernel was not registered"). We evaluate between training steps: keep the layout.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    if kw["attn_implementation"] == "flex_attention":
        set_sequence_multiple(model, 128)  # flex's decoding kernel (< 128 queries) cannot train
    return model


# ---- 4-bit weights, cached per node ------------------------------------------------------------
# bitsandbytes serializes 4-bit weights with their quantization state, and transformers loads such a
# checkpoint as it is; neither keeps one across runs. Kept here, a 7B base loads from ~4 GB of NF4 weights
# instead of reading ~14 GB and quantizing them again in every trial, evaluation and server replica.

CACHE_COMPLETE = ".complete"


def local_model_dir(path: str, cfg) -> Optional[Path]:
    """The local directory holding `path`'s config.json, weights and tokenizer files (a Hugging Face id: its
    downloaded snapshot, named by commit), or None where there is none yet."""
    if Path(path).is_dir():
        return Path(path)
    from transformers.utils import cached_file
    try:
        found = cached_file(path, "config.json", revision=cfg.model.revision, local_files_only=True,
                            _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - not downloaded (yet), or not a model id: nothing to key a cache on
        return None
    return Path(found).parent if found else None


def quantized_cache(path: str, cfg, dtype) -> Optional[Path]:
    """Where this node keeps `path`'s 4-bit weights: a directory named by what they are made from (the
    weight files as they are on disk, the quantization, the dtype of the other weights, the library
    versions), or None where they are not cached (model.cache_quantized off, a model with its own code,
    a Hugging Face id not downloaded yet, the demo's tiny base: quantized in milliseconds)."""
    if not cfg.model.cache_quantized or cfg.model.trust_remote_code or cfg.model.base == "tiny":
        return None
    src = local_model_dir(path, cfg)
    if src is None:
        return None
    import bitsandbytes
    import torch
    import transformers
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.iterdir()
                   if f.name == "config.json" or f.suffix in (".safetensors", ".bin"))
    made_from = {"weights": str(src.resolve()), "files": files, "dtype": str(dtype),
                 "quantization": ["nf4", cfg.model.double_quant, "uint8"],
                 "versions": [bitsandbytes.__version__, transformers.__version__, torch.__version__]}
    return cache_root(cfg) / "nf4" / fingerprint(made_from, 16)


def cache_quantized_weights(model, dst: Path) -> None:
    """Save a just-quantized model's 4-bit weights to `dst` (complete once its marker is there; a process
    that finds another one finished first drops its own copy). A failure costs only the cache."""
    import shutil
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        (tmp / CACHE_COMPLETE).write_text("")
        if dst.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(dst)
            log.info("4-bit weights cached in %s (later loads on this node read them)", dst)
    # a full disk (safetensors raises its own error type), or another process renamed its copy first
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / CACHE_COMPLETE).is_file():
            log.warning("4-bit weights not cached in %s: %s", dst, e)


def add_lora(model, lora, cfg, gradient_checkpointing: bool):
    """Wrap with LoRA (a config.LoraSettings: r, alpha, dropout, target modules); only the LoRA weights train."""
    from peft import LoraConfig, get_peft_model
    # frozen base, non-reentrant checkpointing, weights kept in their dtype (no fp32 upcast)
    model = prepare_for_kbit(model, gradient_checkpointing)
    pcfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none")
    with _peft_on_transformers5():
        return get_peft_model(model, pcfg)


def load_adapter_onto(model, path: str, adapter_name: str = "default"):
    """PeftModel.from_pretrained: the adapter saved at `path` on the base `model` (inference)."""
    from peft import PeftModel
    with _peft_on_transformers5():
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name)


@contextlib.contextmanager
def _peft_on_transformers5():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias, a FutureWarning per
    model wrapped; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---- prompt format ---------------------------------------------------------------------------

class TemplateError(ValueError):
    """The chat template does not render an answer as a continuation of its own generation prompt."""


def _ids(x) -> list[int]:
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    return list(x)


def prompt_tokens(tok, messages: list[dict]) -> list[int]:
    """What a server feeds the model for these turns: the template with the generation prompt."""
    return _ids(tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))


def _answer(tok, messages: list[dict], k: int, prompt: list[int]) -> tuple[list[int], int]:
    """(tokens after the generation prompt of messages[:k] up to the end of turn k, how many of them
    are trained: up to and including the first EOS, or all when the template emits none)."""
    full = _ids(tok.apply_chat_template(list(messages[:k + 1]), tokenize=True))
    if full[:len(prompt)] == prompt:
        ans = full[len(prompt):]
    else:  # a token merged across the boundary: the answer's text after the prompt's text, tokenized alone
        p_text = tok.apply_chat_template(list(messages[:k]), add_generation_prompt=True, tokenize=False)
        f_text = tok.apply_chat_template(list(messages[:k + 1]), tokenize=False)
        if f_text.startswith(p_text):
            a_text = f_text[len(p_text):]
        else:  # the template renders the turns before differently once answered (Mistral v0.3 moves the
            # system message to the last user turn): the answer as rendered, with the whitespace before
            # it that the generation prompt does not end in
            content = messages[k]["content"]
            i = f_text.rfind(content) if content else -1
            if i < 0:
                raise TemplateError("the chat template does not render the assistant's answer as given; set "
                                    "train.chat_template: simple to train with the documented default template")
            while i > 0 and f_text[i - 1].isspace() and not p_text.endswith(f_text[i - 1:i]):
                i -= 1
            a_text = f_text[i:]
        ans = tok.encode(a_text, add_special_tokens=False)
    eos = tok.eos_token_id
    n = ans.index(eos) + 1 if eos is not None and eos in ans else len(ans)
    return ans, n


def encode_conversation(tok, messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """The training sequence(s) of one conversation: [(input_ids, trained)], trained True on the tokens
    that carry loss (each assistant turn's answer and its end-of-turn token).

    Usually one sequence: for every assistant turn k the ids so far extend to exactly
    ``apply_chat_template(messages[:k], add_generation_prompt=True)`` (what a server sends), then the
    answer's tokens follow; so the sequence is the template over the whole conversation. A template
    that renders earlier turns differently once more follow (one that moves the system message into
    the last user turn, or drops earlier reasoning) cannot give one such sequence: then each assistant
    turn is its own sequence, its server prompt plus its answer."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]
    if not turns:
        return []
    ids: list[int] = []
    trained: list[bool] = []
    for k in turns:
        p = prompt_tokens(tok, messages[:k])
        if p[:len(ids)] != ids:
            break
        ans, n = _answer(tok, messages, k, p)
        trained += [False] * (len(p) - len(ids)) + [True] * n + [False] * (len(ans) - n)
        ids = p + ans
    else:
        return [(ids, trained)]
    out = []
    for k in turns:
        p = prompt_tokens(tok, messages[:k])
        ans, n = _answer(tok, messages, k, p)
        out.append((p + ans, [False] * len(p) + [True] * n + [False] * (len(ans) - n)))
    return out
