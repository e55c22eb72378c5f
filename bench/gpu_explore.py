"""Exploration (kept for the record in bench/NOTES.md): which levers move QLoRA throughput on a
7B NF4 model. Standalone on purpose: it isolates kernels and memory from the pipeline.
Usage on the GPU machine: python bench/gpu_explore.py DATA_DIR BASE_MODEL_DIR"""
import gc, glob, json, os, random, sys, time, xml.etree.ElementTree as ET
import torch

DATA, BASE = sys.argv[1], sys.argv[2]
VARIANTS = os.environ.get("VARIANTS", "sdpa_ckpt,flex_ckpt,flex_ckpt_liger,flex_ckpt_liger_16k").split(",")
TARGET_SETS = os.environ.get("TARGET_SETS", "qv,all").split(",")
STEPS = int(os.environ.get("STEPS", "6"))


def examples():
    out = []
    pq = json.load(open(f"{DATA}/pubmed_qa/data/ori_pqal.json"))
    for v in pq.values():
        out.append((f"Answer the question based on the context.\nQuestion: {v['QUESTION']}\nContext: {' '.join(v['CONTEXTS'])[:1200]}", v["LONG_ANSWER"]))
    for line in open(f"{DATA}/climate_fever/dataset/climate-fever.jsonl"):
        r = json.loads(line)
        out.append((f"Is this claim supported?\nClaim: {r['claim']}\nContext: {' '.join(e['evidence'] for e in r['evidences'])[:1200]}", r["claim_label"]))
    for f in glob.glob(f"{DATA}/MedQuAD/*/*.xml"):
        for qa in ET.parse(f).getroot().iter("QAPair"):
            q, a = qa.findtext("Question") or "", (qa.findtext("Answer") or "").strip()
            if a:
                out.append((q, a[:1200]))
    for line in open(f"{DATA}/IAM/stance/train.txt", encoding="utf-8"):
        p = line.rstrip("\n").split("\t")
        if len(p) >= 5:
            out.append((f"Write a debate turn on: {p[1]}", p[2]))
    random.Random(42).shuffle(out)
    return out


def main():
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    import peft
    t0 = time.time()
    ex = examples()
    tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p + r for p, r in ex], trainers.BpeTrainer(vocab_size=32000, special_tokens=["<pad>", "<s>", "</s>"]))
    enc = []
    for p, r in ex:
        a = tok.encode("<|user|>\n" + p + "\n<|assistant|>\n").ids; b = tok.encode(r).ids + [2]
        ids = ([1] + a + b)[:2048]; lab = ([-100] * (1 + len(a)) + b)[:2048]
        enc.append((ids, lab))
    print(f"examples={len(enc)} mean_tokens={sum(len(i) for i, _ in enc)/len(enc):.0f} prep_s={time.time()-t0:.1f}", flush=True)

    def batches(T):
        i = 0
        while True:
            ids, lab, pos = [], [], []
            while True:
                x, y = enc[i % len(enc)]
                if len(ids) + len(x) > T:
                    break
                ids += x; lab += y; pos += list(range(len(x))); i += 1
            yield (torch.tensor([ids], device="cuda"), torch.tensor([lab], device="cuda"), torch.tensor([pos], device="cuda"))

    if not os.path.exists(BASE):
        from transformers import AutoConfig
        cfg = AutoConfig.for_model("mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(BASE); del m; torch.cuda.empty_cache()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=q, device_map={"": 0}, dtype=torch.bfloat16)
    base.config.use_cache = False
    print(f"loaded s={time.time()-t0:.1f} mem={torch.cuda.memory_allocated()/2**30:.2f}GB", flush=True)
    liger_applied = False
    results = []
    for targets in TARGET_SETS:
        tm = ["q_proj", "v_proj"] if targets == "qv" else "all-linear"
        for var in VARIANTS:
            if "liger" in var and not liger_applied:
                from liger_kernel.transformers import apply_liger_kernel_to_mistral
                apply_liger_kernel_to_mistral(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, cross_entropy=False, model=base)
                liger_applied = True
            if "liger" not in var and liger_applied:
                continue
            base.set_attn_implementation("flex_attention" if "flex" in var else "sdpa")
            model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=tm, task_type="CAUSAL_LM"))
            model.train()
            if "ckpt" in var or "pck" in var:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            if "pck" in var:  # checkpoint all but the last N layers
                n = int(var.split("pck")[1].split("_")[0])
                layers = model.base_model.model.model.layers
                for layer in list(layers)[len(layers) - n:]:
                    layer.gradient_checkpointing = False
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
            T = 16384 if "16k" in var else (4096 if "4k" in var else 8192)
            it = batches(T)
            inner = model.base_model.model
            lm = inner.lm_head
            fused_ce = None
            if "liger" in var:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
                fused_ce = LigerFusedLinearCrossEntropyLoss()
            times, losses, toks = [], [], []
            torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
            try:
                for s in range(STEPS + 2):
                    ids, lab, pos = next(it)
                    torch.cuda.synchronize(); ts = time.time()
                    h = inner.model(input_ids=ids, position_ids=pos).last_hidden_state
                    hs = h[:, :-1].reshape(-1, h.shape[-1]); y = lab[:, 1:].reshape(-1)
                    if fused_ce is not None:
                        loss = fused_ce(lm.weight, hs, y)
                    else:
                        loss = torch.nn.functional.cross_entropy(lm(hs).float(), y, ignore_index=-100)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step(); opt.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    if s >= 2:
                        times.append(time.time() - ts); toks.append(ids.numel()); losses.append(loss.item())
                r = dict(targets=targets, variant=var, tokens_per_step=T, tok_s=round(sum(toks) / sum(times)),
                         step_s=round(sum(times) / len(times), 3), loss=round(sum(losses) / len(losses), 3),
                         peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                         peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2))
            except Exception as e:
                r = dict(targets=targets, variant=var, error=repr(e)[:300])
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
            del opt, params
            base = model.unload(); del model
            gc.collect(); torch.cuda.empty_cache()
    print("ALL " + json.dumps(results))


if __name__ == "__main__":
    main()
