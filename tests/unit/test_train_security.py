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
    from pipeline.lm.model import load_model
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


def test_custom_model_type_never_runs(tmp_path):
    """`adapters doctor --load` on a directory whose config names a custom model_type and ships its code,
    with 'y' typed on stdin: transformers must never ask (every from_pretrained gets trust_remote_code from
    the config) and nothing of the directory's code runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    d, marker = _evil_model(tmp_path, "evil")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--config", str(root / "configs/demo.yaml"),
                        "--set", f"model.base={d}", "--set", "model.quantization=none",
                        "--output", str(tmp_path / "out"), "--load"],
                       input="y\ny\ny\n", capture_output=True, text=True, timeout=300, cwd=root, env=env)
    out = r.stdout + r.stderr
    assert "Do you wish to run the custom code" not in out
    assert not marker.exists(), "the model directory's own code was executed"
    load_rows = [line for line in out.splitlines() if line.lstrip().startswith("load")]
    assert load_rows and "FAIL" in load_rows[0] and "trust_remote_code" in out, out[-3000:]
    # the tokenizer loader on its own: the library's own class, or a refusal naming the setting; never the code
    from pipeline.lm.model import ModelLoadError, load_tokenizer
    cfg = load_config(None, sets=[f"model.base={d}", "resources.device=cpu", f"output={tmp_path / 'o2'}"], environ={})
    try:
        tok = load_tokenizer(str(d), cfg)
    except ModelLoadError as e:
        assert "trust_remote_code" in str(e)
    else:
        assert type(tok).__module__.startswith("transformers.")
    assert not marker.exists()
