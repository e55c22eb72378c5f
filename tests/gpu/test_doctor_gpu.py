"""doctor on a GPU machine: CUDA rows, bitsandbytes' CUDA library, and --load (4-bit + one generation)
on a small random Llama saved to a local directory. Skipped without CUDA."""
from __future__ import annotations

import pytest

from pipeline import doctor
from pipeline.config import Config

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def small_model_dir(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "the", "heart", "pumps", "blood", "and"] + [f"w{i}" for i in range(248)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    d = tmp_path / "model"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    return d


def test_doctor_gpu_table_and_load(tmp_path, capsys):
    d = small_model_dir(tmp_path)
    cfg = Config.model_validate({"output": str(tmp_path / "out"), "model": {"base": str(d)},
                                 "resources": {"device": "cuda"}, "data": {"download": {"offline": True}}})
    code = doctor.run_doctor(cfg, load=True)
    out = capsys.readouterr().out
    print("\n" + out)
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "PASS" in rows["cuda"] and "GPU(s)" in rows["cuda"]
    assert "PASS" in rows["gpu"]
    assert "PASS" in rows["torch"] and "built for CUDA" in rows["torch"], rows["torch"]   # the driver runs this torch
    assert "PASS" in rows["bitsandbytes"], rows["bitsandbytes"]
    assert "PASS" in rows["load"] and "cuda" in rows["load"], rows["load"]
    assert "PASS" in rows["memory"]
    # on the GPU image some pins differ (torch 2.11 there): only the package rows may complain
    assert all("FAIL" not in ln for name, ln in rows.items() if name != "packages")
    if "FAIL" not in rows["packages"]:
        doctor.preflight(cfg)
        assert code == 0
