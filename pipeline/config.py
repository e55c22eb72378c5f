"""One typed config, loaded once, validated, passed down.

Order of precedence (later wins): the YAML file, then ``--set key=value`` overrides, then the
seed's environment variables (MAX_DOCS_PER_SOURCE, MAX_SFT_PER_DOMAIN, ALLOW_MISSING_DATA,
OFFLINE / HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, DOWNLOAD_ONLY, DOWNLOAD_SKIP, and the variables the
sources declare in their ``SourceSpec.settings``: DOWNLOAD_OPENCASLIST / DOWNLOAD_OPENCASELIST,
DDO_DEBATES_URL, DDO_USERS_URL, DDO_GDRIVE_FOLDER_URL), then the command line's ``--raw-dir`` / ``--output`` / ``--domains``.

Relative paths written in a YAML file are relative to that file; paths given on the command line
are relative to the current directory. Unknown keys and bad values fail at start with a message
naming the key and the fix.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from pipeline import uris
from pipeline.optimizers import OPTIMIZERS
from pipeline.redaction import redact_url

# the built-in sources and their domains, derived from the registry (pipeline/sources: no heavy imports)
from pipeline.sources import BUILTIN, DOMAINS, SETTINGS, SOURCES, SourceSetting  # noqa: E402

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and the fix."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses inf and nan (YAML's .inf / .nan, --set x=nan), which
    # otherwise passed gt=0 and failed minutes later as a NaN loss
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class _DownloadCommon(_Strict):
    """data.download's own keys; each source's settings are added from its SourceSpec (DownloadConfig below)."""
    only: list[str] = Field(default_factory=list, description="download only these sources (DOWNLOAD_ONLY)")
    skip: list[str] = Field(default_factory=list, description="skip these sources (DOWNLOAD_SKIP)")
    offline: bool = Field(False, description="no network call at all (OFFLINE=1, HF_HUB_OFFLINE=1)")
    hf_endpoint: Optional[str] = Field(None, description="Hugging Face endpoint (default: HF_ENDPOINT or the hub)")
    timeout_s: float = Field(60.0, gt=0, description="seconds one network read may wait")
    retries: int = Field(3, ge=0)
    max_file_mb: int = Field(10240, ge=1, description="an HTTP file larger than this is stopped and refused")
    max_time_s: float = Field(7200.0, gt=0, description="an HTTP file not downloaded after this long (all "
                              "attempts) is stopped and refused")

    @field_validator("only", "skip")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return [s.strip().lower() for s in v if s.strip()]  # known names: checked by DataConfig


def _setting_field(s: SourceSetting) -> tuple[Any, Any]:
    said = f"{s.description} ({' or '.join(s.env)})"
    return (bool, Field(False, description=said)) if s.kind == "opt_in" else (Optional[str], Field(None, description=said))


# data.download: the common keys, then every built-in source's settings (pipeline.sources.SETTINGS)
DownloadConfig = create_model("DownloadConfig", __base__=_DownloadCommon,
                              **{s.key: _setting_field(s) for s in SETTINGS})


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


FILE_TYPES = ("jsonl", "json", "csv", "parquet")
# record formats and the fields each reads: field -> the column names tried when not overridden
RECORD_FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    "openai": {"messages": ("messages",)},
    "sharegpt": {"conversations": ("conversations", "conversation", "messages")},
    "alpaca": {"instruction": ("instruction",), "input": ("input",), "output": ("output",),
               "system": ("system",), "history": ("history",)},
    "prompt_completion": {"prompt": ("prompt",), "response": ("completion", "response")},
    "text": {"text": ("text",)},
}
OPTIONAL_FIELDS = {"input", "system", "history"}   # alpaca: read when the record has them


class CustomSourceConfig(_Strict):
    """One of your own datasets (data.custom_sources): read, quarantined, capped, deduplicated, split
    and trained like a built-in source (pipeline/sources/custom.py). ``format`` names the record
    format (openai, sharegpt, alpaca, prompt_completion, text; detected from the first record when
    left out); the column keys override the column each field is read from."""
    name: str = Field(..., description="names the source in the manifest and directories (lowercase, digits, '_')")
    domain: str = Field(..., description="a built-in domain or a new one (then list it in domains)")
    path: str = Field(..., description="a local file or folder, s3://bucket/prefix, or a Hugging Face dataset id "
                                       "(hf://owner/name, or owner/name when no such local path exists)")
    format: Optional[Literal["openai", "sharegpt", "alpaca", "prompt_completion", "text"]] = Field(
        None, description="the record format; left out: detected (one line says which)")
    files: Optional[Literal["jsonl", "json", "csv", "parquet"]] = Field(
        None, description="the file type; left out: every jsonl, json, csv and parquet file, read by its suffix")
    prompt: Optional[str] = Field(None, description="prompt_completion: column of the prompt")
    response: Optional[str] = Field(None, description="prompt_completion: column of the answer (completion/response)")
    messages: Optional[str] = Field(None, description="openai: column of the chat [{role, content}, ...]")
    conversations: Optional[str] = Field(None, description="sharegpt: column of the chat [{from, value}, ...]")
    instruction: Optional[str] = Field(None, description="alpaca: column of the instruction")
    input: Optional[str] = Field(None, description="alpaca: column of the input (appended to the instruction)")
    output: Optional[str] = Field(None, description="alpaca: column of the answer")
    system: Optional[str] = Field(None, description="alpaca: column of a system message")
    history: Optional[str] = Field(None, description="alpaca: column of earlier [instruction, output] pairs")
    text: Optional[str] = Field(None, description="text: column of plain text (corpus only, no SFT examples)")
    subset: Optional[str] = Field(None, description="a dataset folder laid out as on the Hugging Face Hub: the "
                                  "subset (config) folder to read")
    split: Optional[str] = Field(None, description="only files of this split (train, test, ...: a folder or a "
                                 "file name starting with it)")
    data_files: list[str] = Field(default_factory=list, description="globs (relative to the dataset) of the files to read")
    revision: Optional[str] = Field(None, description="Hugging Face revision (branch, tag or commit)")
    license: str = Field("not stated (data.custom_sources)", description="shown in the data card")

    @field_validator("name", "domain")
    @classmethod
    def _name(cls, v: str, info) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{info.field_name} {v!r} is not a valid name (lowercase letters, digits, '_'); it names directories")
        if info.field_name == "name" and v in SOURCES:
            raise ValueError(f"{v!r} is a built-in source; give your source another name")
        return v

    @model_validator(mode="before")
    @classmethod
    def _locate(cls, d: Any) -> Any:
        """A local path becomes absolute (workers find it too); owner/name that is no local path and does
        not end in .<format> is a Hugging Face id."""
        if not isinstance(d, dict):
            return d
        if d.get("format") in FILE_TYPES and "files" not in d:  # the older spelling: format: jsonl
            d = {**d, "files": d["format"]}
            d.pop("format")
        if not isinstance(d.get("path"), str):
            return d
        v = d["path"].strip()
        if "://" in v and not v.startswith(("s3://", "hf://")):
            raise ValueError(f"path {v!r}: use a local path, s3://bucket/prefix or a Hugging Face dataset id (hf://owner/name)")
        if v.startswith("hf://") and not _HF_ID.match(v[len("hf://"):]):
            raise ValueError(f"path {v!r} is not a Hugging Face dataset id: use hf://owner/name")
        hf_like = _HF_ID.match(v) and not os.path.exists(v) and not v.endswith(tuple(f".{t}" for t in FILE_TYPES))
        if "://" not in v and not hf_like:
            v = os.path.abspath(os.path.expanduser(v))
        return {**d, "path": v}

    @model_validator(mode="after")
    def _mapping(self) -> "CustomSourceConfig":
        given = [f for f in ALL_FIELDS if getattr(self, f)]
        fits = [k for k, fields in RECORD_FORMATS.items() if set(given) <= set(fields)]
        if self.format is None and given:
            if not fits:
                raise ValueError(f"data.custom_sources {self.name!r}: map exactly one record shape: the columns "
                                 f"{given} belong to different formats ({_formats_doc()})")
            object.__setattr__(self, "format", fits[0])  # the columns name the format (no re-validation)
        elif self.format is not None and self.format not in fits:
            wrong = [f for f in given if f not in RECORD_FORMATS[self.format]]
            raise ValueError(f"data.custom_sources {self.name!r}: format {self.format} reads "
                             f"{', '.join(RECORD_FORMATS[self.format])}; {wrong} belong to another format "
                             f"(map exactly one record shape: {_formats_doc()})")
        return self

    def column(self, field: str, record: Optional[dict] = None) -> Optional[str]:
        """The column a field is read from: the override, else the first default the record has."""
        if getattr(self, field):
            return getattr(self, field)
        names = next(v[field] for v in RECORD_FORMATS.values() if field in v)
        if record is not None:
            return next((n for n in names if n in record), names[0])
        return names[0]

    @property
    def where(self) -> Literal["local", "s3", "hf"]:
        if self.path.startswith("s3://"):
            return "s3"
        return "hf" if self.path.startswith("hf://") or not os.path.isabs(self.path) else "local"

    @property
    def hf_id(self) -> str:
        return self.path[len("hf://"):] if self.path.startswith("hf://") else self.path

    @property
    def columns(self) -> tuple[str, ...]:
        """The overridden columns this mapping must read (a CSV header must have them)."""
        return tuple(getattr(self, f) for f in ALL_FIELDS if getattr(self, f) and f not in OPTIONAL_FIELDS)


ALL_FIELDS = tuple(dict.fromkeys(f for fields in RECORD_FORMATS.values() for f in fields))


def _formats_doc() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in RECORD_FORMATS.items())


class DataConfig(_Strict):
    raw_dir: str = Field("raw", description="directory holding the raw sources as download leaves them")
    sources: list[str] = Field(default_factory=lambda: list(SOURCES),
                               description="built-in sources to prepare (every custom source is prepared)")
    custom_sources: list[CustomSourceConfig] = Field(default_factory=list, description="your own datasets")
    max_docs_per_source: Optional[int] = Field(None, ge=1, description="cap per source (MAX_DOCS_PER_SOURCE)")
    max_sft_per_domain: Optional[int] = Field(None, ge=1, description="cap per domain (MAX_SFT_PER_DOMAIN)")
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    split_seed: int = 42
    near_duplicates: bool = Field(True, description="rows of a domain that share a word 13-gram (not a template's) go to "
                                  "one split (pipeline/neardup.py); false: only exact duplicates and groups are kept apart")
    allow_missing: bool = Field(False, description="record missing sources instead of failing (ALLOW_MISSING_DATA=1)")
    min_text_chars: int = Field(20, ge=1)
    max_response_chars: int = Field(4000, ge=100)
    system_messages: dict[str, str] = Field(default_factory=dict, description="per domain: a system message "
                                            "opening every SFT conversation of that domain that has none")
    min_kept_share: float = Field(0.5, ge=0.0, le=1.0, description="prepare fails when a source keeps fewer "
                                  "than this share of its records (the rest quarantined), or keeps none; 0 turns the check off")
    max_record_chars: int = Field(1_000_000, ge=1000, description="a record with more text than this is "
                                  "quarantined as too_large before anything is built from it")
    max_whole_file_mb: int = Field(2048, ge=1, description="files read whole (JSON documents, XML) larger than "
                                   "this are quarantined as file_too_large")
    txt_chunk_chars: int = Field(2000, ge=200, description="OpenStax TXT books are cut into chunks of about this size")
    rows_per_shard: int = Field(5000, ge=10)
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    @field_validator("split")
    @classmethod
    def _split(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "val", "test"}:
            raise ValueError("split needs exactly the keys train, val, test (for example {train: 0.8, val: 0.1, test: 0.1})")
        if any(x < 0 for x in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {v}")
        if v["train"] <= 0:
            raise ValueError("split.train must be > 0")
        return v

    @model_validator(mode="after")
    def _known_sources(self) -> "DataConfig":
        custom = [c.name for c in self.custom_sources]
        if len(set(custom)) != len(custom):
            raise ValueError(f"data.custom_sources names a source twice: {custom}")
        bad = [d for d in self.system_messages if d not in self.domains_known]
        if bad:
            raise ValueError(f"data.system_messages: unknown domain(s) {bad}; known domains: {', '.join(self.domains_known)}")
        known = list(SOURCES) + custom
        for key, names in (("data.sources", self.sources), ("data.download.only (DOWNLOAD_ONLY)", self.download.only),
                           ("data.download.skip (DOWNLOAD_SKIP)", self.download.skip)):
            bad = [s for s in names if s not in known]
            if bad:
                raise ValueError(f"{key}: unknown source(s) {bad}; known sources: {', '.join(known)}")
        return self

    @property
    def domains_known(self) -> list[str]:
        """The built-in domains and those of the custom sources (a new domain comes from a custom source)."""
        return list(dict.fromkeys(list(DOMAINS) + [c.domain for c in self.custom_sources]))


class TinyModelConfig(_Strict):
    """The demo's base model: a small Llama built from this config, tokenizer trained on the corpus."""
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(128, ge=64)
    intermediate_size: int = Field(256, ge=64)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(1024, ge=128)
    pretrain_steps: int = Field(0, ge=0, description="brief pre-training on the mixed corpus (0 = random weights)")
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.tiny.hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("model.tiny.num_attention_heads must be divisible by num_key_value_heads")
        return self


class ModelConfig(_Strict):
    base: str = Field(..., description="'tiny' (built locally), a Hugging Face id, a local directory or s3:// URI")
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4 = 4-bit QLoRA; none = plain LoRA")
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp16 (with loss scaling); fp32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="auto: flex_attention on CUDA (block-diagonal over packed examples), sdpa on CPU")
    cache_dir: Optional[str] = Field(None, description="local cache for s3:// models and 4-bit weights (default: ~/.cache/domain-adapters)")
    cache_quantized: bool = Field(True, description="keep the 4-bit weights per node in model.cache_dir after the first "
                                  "load (a 7B base: ~4 GB); later loads read them instead of quantizing again")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class LoraSettings(_Strict):
    """The LoRA shape (peft's LoraConfig is built from it in pipeline.lm.model.add_lora)."""
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# train.optimizer: a name of the optimizer table (pipeline/optimizers.py); a Literal, so that the per-domain
# overrides (built from TrainHyper's fields) validate it too and the error lists the names
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]


class TrainHyper(_Strict):
    """Hyperparameters that may be overridden per domain (train.per_domain.<domain>)."""
    max_steps: int = Field(100, ge=1)
    optimizer: OptimizerName = Field("adamw", description="; ".join(f"{k}: {o.description}" for k, o in OPTIMIZERS.items()))
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    tokens_per_micro_batch: int = Field(8192, ge=64, description="packed tokens per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs_cap: Optional[float] = Field(None, gt=0, description="stop early after this many passes over the data")


class DomainHyper(TrainHyper):
    """One domain's settings: train.* with train.per_domain.<domain> applied, and its LoRA shape."""
    lora: LoraSettings


# train.per_domain.<domain>: every TrainHyper field, optional (None = the train.* value), plus a LoRA shape.
PerDomainOverride = create_model(
    "PerDomainOverride", __base__=_Strict,
    lora=(Optional[LoraSettings], None),
    **{name: (Optional[f.annotation], FieldInfo.merge_field_infos(f, default=None))
       for name, f in TrainHyper.model_fields.items()})


class TrainConfig(TrainHyper):
    max_seq_length: int = Field(2048, ge=32)
    packing: bool = True
    mask_prompt: bool = Field(True, description="loss on response tokens only")
    gradient_checkpointing: bool = True
    checkpoint_keep_last: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = Field(
        "auto", description="with checkpointing: the last N decoder layers keep their activations (faster, ~1 GB "
        "each for a 7B model at 8192 tokens); auto: as many as memory_budget_gb leaves room for, measured on the GPU "
        "in the first steps (0 on the CPU)")
    memory_budget_gb: float = Field(20.0, gt=0, description="peak GPU memory (allocated) that checkpoint_keep_last "
                                    "auto stays under; 20 fits a 24 GB RTX 3090")
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger RMSNorm/SwiGLU/RoPE + fused linear cross-entropy on CUDA when installed ([gpu] extra)")
    fused_lora: Literal["auto", "on", "off"] = Field(
        "auto", description="the base matmul and the LoRA branch as one autograd step in the compute dtype "
        "(pipeline/lm/lora_fused.py); auto: every LoRA layer on a plain or 4-bit base")
    fused_swiglu_down: bool = Field(
        True, description="with fused LoRA layers: a SwiGLU MLP keeps gate and up only and makes silu(gate) * up "
        "again in the down projection's backward (~23% less memory per layer kept from recomputation)")
    eval_every: int = Field(50, ge=1)
    eval_max_batches: Optional[int] = Field(None, ge=1, description="cap on eval batches (None = whole split)")
    checkpoint_every: int = Field(50, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Ray FailureConfig retries per domain")
    log_every: int = Field(10, ge=1)
    chat_template: Literal["auto", "simple"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else the simple template")
    merge_export: bool = Field(False, description="also export merged full weights (refuses NaN/inf)")
    eval_matrix: bool = Field(True, description="evaluate base and every adapter on every domain's test set")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="stop a domain after this many evaluations without a lower val loss (None: off); "
        "the adapter exported is always the one with the lowest val loss")
    tensorboard: bool = Field(True, description="TensorBoard event files per domain under runs/<run_name>/tune/")
    seed: int = 42
    per_domain: dict[str, PerDomainOverride] = Field(default_factory=dict)

    @field_validator("per_domain")
    @classmethod
    def _domains(cls, v: dict[str, PerDomainOverride]) -> dict[str, PerDomainOverride]:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"train.per_domain key {name!r} is not a valid domain name")
        return v


class ResourcesConfig(_Strict):
    device: Literal["cpu", "cuda"] = Field(..., description="cuda: one GPU per trial; cpu: only when asked for")
    ray_address: Optional[str] = Field(None, description="None: start a local Ray; 'auto' or host:port: join a cluster")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per training worker")
    gpus_per_trial: float = Field(1.0, gt=0, description="GPUs per training worker (resources.device: cuda)")
    workers_per_trial: int = Field(1, ge=1, description="training workers per domain (data parallel over the LoRA "
                                   "weights, global batch unchanged); more than 1 when there are more GPUs than domains")
    ray_train_for_one_worker: bool = Field(False, description="run a one-worker trial through Ray Train's TorchTrainer, "
                                           "as trials of several workers are (default: the trial runs its one worker "
                                           "itself, ~15-20 s less start-up on a GPU node; docs/TRAINING.md)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="None: as many as resources allow")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs for a local Ray started by the pipeline")
    worker_start_timeout_s: float = Field(900, ge=1, description="how long a trial waits for its workers' resources "
                                          "(a GPU node the autoscaler starts: minutes on a cloud) before the domain "
                                          "fails naming the resource")


class EvalConfig(_Strict):
    """The evaluation after training (pipeline/eval, docs/EVALUATION.md): the base model and every adapter on
    every domain's test split. train.eval_matrix: false also turns it off."""
    enabled: bool = Field(True, description="evaluate after training (adapters train / run)")
    max_examples: Optional[int] = Field(None, ge=1, description="test rows per domain scored for loss and multiple "
                                        "choice (a seeded sample; None: all)")
    generation_samples: int = Field(64, ge=0, description="free-text test rows per domain generated (greedy) and "
                                    "scored with ROUGE-L and token F1 (a seeded sample)")
    side_by_side: int = Field(5, ge=0, description="test prompts per domain shown in the report with the base "
                              "model's and the domain adapter's answers")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per answer")
    tokens_per_batch: Optional[int] = Field(None, ge=64, description="packed tokens per scoring batch (None: 4 x "
                                            "train.tokens_per_micro_batch: no gradients are kept)")
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples of each bootstrap 95% interval")
    permutation_resamples: int = Field(10000, ge=100, description="sign patterns of a paired permutation test "
                                       "(exact when 2**n is fewer)")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of 'better' / 'worse'")
    seed: int = Field(1234, description="samples, bootstrap and permutations")
    workers: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        "auto", description="Ray tasks the models are spread over, each loading the base model once (auto: one per "
        "GPU on CUDA, one on the CPU)")
    # standard benchmarks through lm-evaluation-harness (pipeline/eval/harness.py; the [harness] extra)
    harness_tasks: list[str] = Field(default_factory=list, description="lm-eval task (or group) names run on the base "
                                     "model and every adapter, e.g. [medmcqa, pubmedqa] (a comma-separated string "
                                     "works too); empty: none")
    harness_include_path: Optional[str] = Field(None, description="a local folder of task YAMLs in lm-eval's own "
                                                "format (its files are shipped to the evaluating node); its tasks "
                                                "join lm-eval's own")
    harness_limit: Optional[int] = Field(None, ge=1, description="rows per task (None: all; a limit makes the "
                                         "numbers incomparable with published ones)")
    harness_batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        8, description="lm-eval's batch size (auto: the largest that fits, found by lm-eval)")

    @field_validator("harness_tasks", mode="before")
    @classmethod
    def _harness_task_list(cls, v: Any) -> Any:
        # --set eval.harness_tasks=medmcqa,pubmedqa arrives as one string
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("harness_tasks")
    @classmethod
    def _harness_task_names(cls, v: list[str]) -> list[str]:
        v = [x.strip() for x in v]
        bad = [x for x in v if not _TASK_RE.match(x)]
        if bad:
            raise ValueError(f"{bad}: an lm-eval task name holds letters, digits, '_', '-' and '.' only "
                             "(`lm-eval ls tasks` lists them)")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a task twice: {v}")
        return v

    @field_validator("harness_include_path")
    @classmethod
    def _harness_include(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if uris.scheme_of(v):
            raise ValueError("give a local folder of task YAMLs (it is shipped to the evaluating node from here)")
        # from --set: relative to the current directory; that it is a folder of tasks is checked where it is
        # used (pipeline/eval/harness.check_tasks), so a report of a run whose folder moved still loads
        return str(Path(v).expanduser().resolve())


class StorageConfig(_Strict):
    endpoint_url: Optional[str] = Field(None, description="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    region: Optional[str] = Field(None, description="S3 region (else AWS_REGION / AWS_DEFAULT_REGION)")
    # Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
    # or a profile; they are never written to a config, a report or a job's runtime_env.
    profile: Optional[str] = None
    retries: int = Field(5, ge=0)


class MlflowTracking(_Strict):
    tracking_uri: str = Field(..., description="where MLflow keeps runs: http(s)://server, sqlite:///path/mlflow.db, "
                              "databricks or file:///path (credentials only from the environment: MLFLOW_TRACKING_TOKEN, "
                              "MLFLOW_TRACKING_USERNAME / _PASSWORD)")
    experiment: str = Field("domain-adapters", description="the MLflow experiment; one run per domain in it")
    artifacts: bool = Field(True, description="attach each domain's Tune files (params, results) to its run")


class WandbTracking(_Strict):
    project: str = Field(..., description="the W&B project; one run per domain in it (WANDB_API_KEY from the environment)")
    entity: Optional[str] = None
    mode: Literal["online", "offline"] = Field("online", description="offline: files under the trial's directory, "
                                               "`wandb sync` uploads them later")


class TrackingConfig(_Strict):
    """Experiment tracking through Ray Tune's own callbacks (off unless a section is set); every metric is
    logged against the training step. Needs the [tracking] extra (mlflow-skinny, wandb)."""
    mlflow: Optional[MlflowTracking] = None
    wandb: Optional[WandbTracking] = None


class HubConfig(_Strict):
    """Upload each finished adapter folder (adapter, tokenizer, model card) to the Hugging Face Hub after
    training (pipeline/train/export.py, upload_to_hub); the token comes from HF_TOKEN or `hf auth login`."""
    repo_id: Optional[str] = Field(None, description="the model repo per domain, with {domain} in it, e.g. "
                                   "my-org/mistral-7b-{domain}-qlora; None: no upload")
    private: bool = Field(True, description="create the repos private")

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and ("{domain}" not in v or not _HF_ID.match(v.replace("{domain}", "d"))):
            raise ValueError(f"{v!r}: give owner/name with {{domain}} in it (one repo per domain), "
                             "e.g. my-org/mistral-7b-{domain}-qlora")
        return v


class Config(_Strict):
    run_name: str = Field("run", description="names the Ray run; same name + same output resumes")
    output: str = Field("output/run", description="local directory or s3://bucket/prefix")
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS))
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", v):
            raise ValueError("run_name may hold letters, digits, '.', '_' and '-' only (it names directories)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_domains(cls, d: Any) -> Any:
        """Without a domains list: the domains of the selected sources (data.sources, default all built-ins,
        and every custom source), in registry order."""
        if isinstance(d, dict) and "domains" not in d:
            data = d.get("data") if isinstance(d.get("data"), dict) else {}
            chosen = data.get("sources", list(SOURCES))
            builtin = [BUILTIN[s].domain for s in SOURCES if isinstance(chosen, list) and s in chosen]
            custom = [c["domain"] for c in data.get("custom_sources") or []
                      if isinstance(c, dict) and isinstance(c.get("domain"), str)]
            d = {**d, "domains": list(dict.fromkeys(builtin + custom)) or list(DOMAINS)}
        return d

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("domains is empty: list at least one of " + ", ".join(DOMAINS))
        for d in v:
            if not _NAME_RE.match(d):
                raise ValueError(f"domain {d!r} is not a valid name (lowercase letters, digits, '_'); it names directories")
        if len(set(v)) != len(v):
            raise ValueError(f"domains lists a domain twice: {v}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        known = self.data.domains_known
        unknown = [d for d in self.domains if d not in known]
        if unknown:
            raise ValueError(f"domains names {unknown}, which no source provides; known domains: {', '.join(known)} "
                             "(to bring your own data, add a data.custom_sources entry with that domain)")
        custom = {c.domain for c in self.data.custom_sources}
        for d in self.domains:
            own = [s for s, spec in BUILTIN.items() if spec.domain == d]
            if d not in custom and not any(s in self.data.sources for s in own):
                raise ValueError(f"domain {d!r} has none of its sources ({', '.join(own)}) in data.sources: add one "
                                 f"to data.sources or remove {d!r} from domains")
        unknown = [d for d in self.train.per_domain if d not in self.domains]
        if unknown:
            raise ValueError(f"train.per_domain names {unknown}, which are not in domains {self.domains} "
                             f"(known domains: {', '.join(known)})")
        if self.model.base == "tiny" and self.model.trust_remote_code:
            raise ValueError("model.trust_remote_code makes no sense with model.base: tiny")
        if self.resources.device == "cpu" and self.model.compute_dtype == "float16":
            raise ValueError("model.compute_dtype float16 is not supported on CPU: use auto or float32")
        return self

    # ---- derived helpers -------------------------------------------------------------------
    def hyper_for(self, domain: str) -> DomainHyper:
        """One domain's hyperparameters and LoRA shape, with its train.per_domain override applied."""
        base = DomainHyper(**{k: getattr(self.train, k) for k in TrainHyper.model_fields}, lora=self.lora)
        override = self.train.per_domain.get(domain)
        if override is None:
            return base
        # model_copy does not validate: keep the override's typed LoRA object (its dump would be a dict)
        update = {k: getattr(override, k) for k in override.model_fields_set if getattr(override, k) is not None}
        return base.model_copy(update=update)

    def redacted(self) -> dict[str, Any]:
        """The config as written to reports: no secrets (none are held here, but URLs may carry tokens)."""
        d = self.model_dump(mode="json")
        for c in d["data"]["custom_sources"]:
            c["path"] = redact_url(c["path"])
        for k in (x.key for x in SETTINGS if x.kind == "url"):   # a source's URL may carry a token
            if d["data"]["download"].get(k):
                d["data"]["download"][k] = redact_url(d["data"]["download"][k])
        if (d.get("tracking") or {}).get("mlflow"):
            d["tracking"]["mlflow"]["tracking_uri"] = redact_url(d["tracking"]["mlflow"]["tracking_uri"])
        if d["storage"].get("endpoint_url"):
            d["storage"]["endpoint_url"] = redact_url(d["storage"]["endpoint_url"])
        return d


# ---- loading ---------------------------------------------------------------------------------

class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false. PyYAML's 1.1 rules also read yes/no/on/off as
    booleans, which turned `fused_lora: off` into False; boolean fields still take on/off/yes/no
    (pydantic reads those strings as booleans)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


class YamlRefused(yaml.YAMLError):
    """A YAML construct the config refuses (aliases, duplicate keys); str() is one line with the line number."""

    def __init__(self, what: str, mark: Any):
        super().__init__(f"line {mark.line + 1}: {what}" if mark is not None else what)


def _compose_node(self, parent, index):
    # Aliases are refused before they are followed: a few nested aliases expand exponentially (a config
    # of a few lines took gigabytes and never finished), and a config has no need for them.
    if self.check_event(yaml.AliasEvent):
        ev = self.peek_event()
        raise YamlRefused(f"YAML alias *{ev.anchor} is not allowed in a config: write the value out", ev.start_mark)
    return yaml.composer.Composer.compose_node(self, parent, index)


def _construct_mapping(self, node, deep=False):
    # PyYAML keeps the last of two equal keys without a word; a repeated key is almost always a mistake
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor says so
                continue
            if first is not None:
                raise YamlRefused(f"duplicate key {key!r} (first on line {first}): keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(self, node, deep=deep)


_YamlLoader.compose_node = _compose_node
_YamlLoader.construct_mapping = _construct_mapping


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def parse_scalar(text: str) -> Any:
    """Parse a --set value as YAML (numbers, booleans, lists like [a,b]); a plain word stays a string."""
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_sets(d: dict, sets) -> None:
    """--set key=value overrides (values parsed as YAML scalars) applied to the raw settings dict d."""
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, for example --set train.max_steps=20")
        k, v = item.split("=", 1)
        set_key(d, k.strip(), parse_scalar(v), "--set")


def set_key(d: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {dotted!r}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def _truthy(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def _csv(v: str) -> list[str]:
    return [s.strip().lower() for s in v.split(",") if s.strip()]


def env_overrides(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The seed's environment variables as dotted config keys."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}

    def intvar(name: str, key: str) -> None:
        if env.get(name, "").strip():
            try:
                out[key] = int(env[name])
            except ValueError:
                raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer; set it to a whole number or unset it")

    intvar("MAX_DOCS_PER_SOURCE", "data.max_docs_per_source")
    intvar("MAX_SFT_PER_DOMAIN", "data.max_sft_per_domain")
    if env.get("ALLOW_MISSING_DATA", "").strip():
        out["data.allow_missing"] = _truthy(env["ALLOW_MISSING_DATA"])
    if any(_truthy(env.get(v, "")) for v in ("OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        out["data.download.offline"] = True
    if env.get("DOWNLOAD_ONLY", "").strip():
        out["data.download.only"] = _csv(env["DOWNLOAD_ONLY"])
    if env.get("DOWNLOAD_SKIP", "").strip():
        out["data.download.skip"] = _csv(env["DOWNLOAD_SKIP"])
    for s in SETTINGS:   # the sources' own variables (DDO_*_URL, DOWNLOAD_OPENCASELIST, ...): a later one wins
        for name in s.env:
            if env.get(name, "").strip():
                out[f"data.download.{s.key}"] = _truthy(env[name]) if s.kind == "opt_in" else env[name].strip()
    return out


def _format_validation_error(e: ValidationError, source: str) -> str:
    """One line per problem, naming the key and the fix (one problem: one line in all)."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in err["loc"][:-1])
            lines.append(f"{key}: unknown key; remove it or fix its spelling"
                         + (f" (see the keys of {parent!r} in configs/default.yaml)" if parent else ""))
        elif err["type"] == "missing":
            lines.append(f"{key}: required; add it to the config or pass --set {key}=...")
        elif not key:  # a rule across keys: its message names them
            lines.append(msg)
        else:
            lines.append(f"{key}: {msg} (got {err.get('input')!r})")
    if len(lines) == 1:
        return f"invalid config ({source}): {lines[0]}"
    return "\n".join([f"invalid config ({source}):"] + [f"  {x}" for x in lines])


def _path_slots(d: dict) -> Iterator[tuple[dict, str, str, tuple[str, ...]]]:
    """(section, key, dotted name, URI schemes it may hold) for every path-like value of a raw config: the
    one list that '~' expansion, relative-path resolution and the URI check go through."""
    yield d, "output", "output", ("s3",)
    data = d.get("data")
    if isinstance(data, dict):
        yield data, "raw_dir", "data.raw_dir", ()
        for i, c in enumerate(data.get("custom_sources") or []):
            if isinstance(c, dict):
                yield c, "path", f"data.custom_sources[{i}].path", ("s3", "hf")
    model = d.get("model")
    if isinstance(model, dict):
        yield model, "base", "model.base", ("s3",)
        yield model, "cache_dir", "model.cache_dir", ()
    ev = d.get("eval")
    if isinstance(ev, dict):
        yield ev, "harness_include_path", "eval.harness_include_path", ()


def _expand_home(d: dict) -> None:
    """'~' and '~user' at the start of a path mean the home directory, wherever the path was written
    (YAML, --set, the command line); before, a YAML '~/data' became a folder named '~'."""
    for section, key, _, _ in _path_slots(d):
        v = section.get(key)
        if isinstance(v, str) and v.startswith("~"):
            section[key] = os.path.expanduser(v)


def _resolve_paths(d: dict, base_dir: Path) -> None:
    """Make relative local paths in a YAML file relative to that file."""
    _expand_home(d)
    for section, key, _, _ in _path_slots(d):
        v = section.get(key)
        if isinstance(v, str) and v and uris.scheme_of(v) is None and v != "tiny" and not os.path.isabs(v):
            cand = (base_dir / v)
            # model.base and a custom source's path may also be a Hugging Face id (owner/name): only
            # rewrite when it names a path
            if key not in ("base", "path") or v.startswith(".") or cand.exists():
                section[key] = str(cand.resolve())


def _check_locations(d: dict, source: str) -> None:
    """Every URI-looking path is a well-formed URI of a scheme its key allows (one line, exit 2)."""
    for section, key, name, schemes in _path_slots(d):
        v = section.get(key)
        if isinstance(v, str):
            try:
                uris.check_location(v.strip(), name, schemes)
            except uris.BadUri as e:
                also = "; model.base may also be a Hugging Face model id (owner/name)" if name == "model.base" else ""
                raise ConfigError(f"invalid config ({source}): {e}{also}") from None


def load_config(path: Optional[str | Path] = None, sets: Optional[list[str]] = None,
                raw_dir: Optional[str] = None, output: Optional[str] = None,
                domains: Optional[list[str]] = None, environ: Optional[dict[str, str]] = None) -> Config:
    """Load the config once: YAML, then --set overrides, then the seed's env vars, then CLI paths."""
    d: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; pass --config with a YAML file such as configs/demo.yaml")
        try:
            d = _yaml_load(p.read_text()) or {}
        except YamlRefused as e:
            raise ConfigError(f"config file {p}, {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}")
        if not isinstance(d, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys at the top level")
        _resolve_paths(d, p.parent.resolve())
        source = str(p)
    apply_sets(d, sets)
    for k, v in env_overrides(environ).items():
        set_key(d, k, v, "environment")
    if raw_dir:
        set_key(d, "data.raw_dir", raw_dir if uris.scheme_of(raw_dir) else str(Path(raw_dir).expanduser().resolve()),
                 "--raw-dir")
    if output:
        set_key(d, "output", output if uris.scheme_of(output) else str(Path(output).expanduser().resolve()), "--output")
    if domains:  # --domains narrows the config's list (validated with it: a domain's sources must be selected)
        listed = d.get("domains")
        unknown = [x for x in domains if isinstance(listed, list) and x not in listed]
        if unknown:
            raise ConfigError(f"--domains names {unknown}, which the config does not list (domains: {listed})")
        set_key(d, "domains", list(domains), "--domains")
    _expand_home(d)
    _check_locations(d, source)
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
