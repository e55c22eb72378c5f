"""Issue 7 item 10: a base model that ships its own code is never executed unless the config sets
model.trust_remote_code."""
import json

import pytest

from pipeline.config import load_config

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('remote code ran')\n" \
       "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"


def _evil_model(tmp_path, model_type):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    d = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(d)
    marker = tmp_path / "ran.txt"
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = model_type
    c["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(c))
    return d, marker


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_remote_code_in_a_model_directory_never_runs_by_default(tmp_path, model_type):
    from pipeline.train.model import load_model
    d, marker = _evil_model(tmp_path, model_type)
    cfg = load_config(None, sets=[f"model.base={d}", "model.quantization=none", "resources.device=cpu",
                                  f"output={tmp_path / 'out'}"], environ={})
    assert cfg.model.trust_remote_code is False
    try:
        model = load_model(str(d), cfg, "cpu")
    except Exception as e:  # an unknown architecture without its code: refused, naming the setting
        assert model_type == "evil" and "trust_remote_code" in str(e)
    else:
        assert model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"  # the library's own class
    assert not marker.exists(), "the model directory's own code was executed"
