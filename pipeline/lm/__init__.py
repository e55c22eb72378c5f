"""The model floor that training (pipeline.train), the evaluation (pipeline.eval), `adapters doctor` and
`adapters serve` stand on; it imports none of them (tests/unit/test_layers.py checks the layers).

Modules: model (base model resolution and loading, 4-bit, LoRA, the chat template and prompt format),
tiny (the demo base model), data (tokenization, packing, micro-batch tensors), generation (prompts,
end-of-sequence ids, batched generation: the evaluation, `adapters generate` and `adapters serve`), kernels (fused kernels,
the LM head's logits and loss, activation memory), lora_fused / lora_triton (the fused LoRA layers),
device (the worker's CUDA check and probe), compat (what a checkpoint and the evaluation's fingerprint
agree on), serving (what vLLM's multi-LoRA serving refuses of an adapter).

Importing any of them is cheap: torch, transformers, peft, bitsandbytes and triton are imported inside
the functions that use them, so a driver without them (a CPU head node) still imports this package.
"""
