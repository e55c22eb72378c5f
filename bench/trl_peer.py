"""The peer a user would run instead: TRL's SFTTrainer with Liger kernels and padding-free
best-fit-decreasing packing, on the same base, the same token ids and the same memory cap as
bench/train_throughput.py's run of the project's trainer. Run by that bench in a child process (its
own CUDA context, so its peak memory is its own); not a test, it prints one RESULT line.

    python bench/trl_peer.py --base DIR --rows ROWS.jsonl --targets all|qv --attn sdpa|flex_attention
                             [--steps 10] [--memory-cap-gb 24]

ROWS.jsonl holds one pre-tokenized example per line, `{"input_ids": [...], "completion_mask": [...]}`,
exactly the ids the project's trainer trains on (each row's conversation through the chat template
turn by turn; `completion_mask` marks every assistant turn, multi-turn rows included), so both
trainers see the same tokens and the same loss positions; TRL takes pre-tokenized rows as they are (a dataset with `input_ids`
is not tokenized again) and with `completion_only_loss` trains on the completion tokens only.

The settings are the ones a user would pick from TRL's documentation for QLoRA on one GPU
(TRL 1.16): `packing=True` (BFD, padding-free), `max_length=2048`, 4 sequences per micro-batch x
accumulation 2, gradient checkpointing, bf16, `use_liger_kernel=True`, NF4 double quantization,
LoRA r16 / alpha 32 / dropout 0.05 on the same target modules, the project's learning rate.
Throughput counts every token the collator hands to the model (padding-free: all are real) over
the steady steps (after step 3), timed at optimizer-step ends with the GPU synchronized.
"""
from __future__ import annotations

import argparse
import json
import time

TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class CountingCollator:
    """Wraps TRL's collator and counts the real (non-padding) tokens it hands to the model."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--targets", default="all", choices=sorted(TARGETS))
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--memory-cap-gb", type=float)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if a.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 2 ** 30 / total))
    rows = [json.loads(line) for line in open(a.rows)]
    data = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(
        a.base, dtype=torch.bfloat16, attn_implementation=a.attn,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    args = SFTConfig(
        output_dir="/tmp/trl-peer", max_steps=a.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=a.lr, warmup_steps=1, lr_scheduler_type="cosine",
        packing=True, max_length=2048, completion_only_loss=True, gradient_checkpointing=True,
        bf16=True, use_liger_kernel=True, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS[a.targets],
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append((time.perf_counter(), counter.tokens))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    trainer.add_callback(Marks())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = marks[2], marks[-1]
    print("RESULT " + json.dumps(dict(
        who="trl", variant=f"trl-{a.attn}", targets=a.targets, real_tok_s=(n1 - n0) / (t1 - t0),
        padded_tok_s=(n1 - n0) / (t1 - t0), losses=losses, loss=sum(losses[-5:]) / max(1, len(losses[-5:])),
        peak_alloc_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
        peak_reserved_gb=torch.cuda.max_memory_reserved() / 2 ** 30, steps=len(marks))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
