"""Rows of the local tasks in this folder, read by path relative to this file (lm-eval calls
custom_dataset with the task's metadata as keyword arguments)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_tiny_debate_mc(**_metadata):
    import datasets
    return datasets.load_dataset("json", data_files={"test": str(HERE / "tiny_debate_mc.jsonl")})
