"""The 4-bit weights are quantized once per node and then read from model.cache_dir (pipeline.lm.model,
issue 27 item 4): the cached load gives the same weights and logits as quantizing again, changing the base's
files or the quantization settings makes a new entry, and the cache can be turned off. bitsandbytes 4-bit
runs on the CPU, so this is the real path."""
import logging
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import load_config
from pipeline.lm.model import CACHE_COMPLETE, load_model, quantized_cache


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    return d


def _cfg(base, cache, *sets):
    return load_config(None, sets=[f"model.base={base}", f"model.cache_dir={cache}", "resources.device=cpu",
                                   "output=/tmp/unused-output", *sets], environ={})


def _entries(cache):
    return sorted(p.name for p in (cache / "nf4").iterdir()) if (cache / "nf4").is_dir() else []


def test_first_load_quantizes_and_caches_later_loads_read_the_same_weights(base_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = _cfg(base_dir, cache)
    x = torch.randint(0, 512, (2, 24))
    with caplog.at_level(logging.INFO, logger="pipeline.lm.model"):
        first = load_model(str(base_dir), cfg, "cpu")
        [entry] = _entries(cache)
        assert (cache / "nf4" / entry / CACHE_COMPLETE).is_file()
        assert "4-bit weights cached in" in caplog.text and "read from this node's cache" not in caplog.text
        caplog.clear()
        again = load_model(str(base_dir), cfg, "cpu")
        assert "read from this node's cache" in caplog.text
    assert type(again.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert again.config._name_or_path == str(base_dir)          # the base's name, not the cache's
    a, b = first.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(first(x).logits, again(x).logits)
    assert _entries(cache) == [entry]                             # nothing new written on the second load


def test_the_entry_follows_the_base_files_and_the_quantization(base_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(base_dir, cache)
    key = quantized_cache(str(base_dir), cfg, torch.float32)
    assert key == quantized_cache(str(base_dir), cfg, torch.float32)
    assert key != quantized_cache(str(base_dir), _cfg(base_dir, cache, "model.double_quant=false"), torch.float32)
    assert key != quantized_cache(str(base_dir), cfg, torch.bfloat16)
    weights = next(base_dir.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # the base's weights replaced
    try:
        assert key != quantized_cache(str(base_dir), cfg, torch.float32)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_no_cache_when_off_for_remote_code_or_the_tiny_base(base_dir, tmp_path):
    cache = tmp_path / "cache"
    assert quantized_cache(str(base_dir), _cfg(base_dir, cache, "model.cache_quantized=false"), torch.float32) is None
    assert quantized_cache(str(base_dir), _cfg(base_dir, cache, "model.trust_remote_code=true"), torch.float32) is None
    assert quantized_cache(str(base_dir), _cfg("tiny", cache), torch.float32) is None
    load_model(str(base_dir), _cfg(base_dir, cache, "model.cache_quantized=false"), "cpu")
    assert _entries(cache) == []
