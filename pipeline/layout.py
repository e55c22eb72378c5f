"""Every path of the output tree, relative to the output root (the Store in pipeline/storage.py takes
these). Stages, status, the report and the docs' output-tree table take their paths from here; nothing
else spells one out.

    tree_table()   the Markdown table of the output tree in docs/ARCHITECTURE.md (a test checks it)

Placeholders: a function called with "<domain>" (or "<run_name>", ...) gives the pattern the docs show.
Importing this module is free (no pyarrow, no Ray): the CLI, status and the workers all use it.
"""
from __future__ import annotations

from typing import Optional

# ---- the root ----------------------------------------------------------------------------------------
OUTPUT_MARKER = ".domain-adapters-output.json"   # the output folder is the project's (pipeline/ownership.py)
LOCK_FILE = ".domain-adapters-lock.json"          # one run at a time per output

# ---- data/: download and prepare ------------------------------------------------------------------
DATA = "data"
MANIFEST = "data/manifest.json"
DOWNLOAD_MANIFEST = "data/download_manifest.json"
PREPARED = "data/_SUCCESS"   # prepare's completion marker, written last: {"fingerprint"}
WORK = "data/_work"          # prepare's resumable intermediate state
CORPUS = "data/corpus"
SFT = "data/sft"
QUARANTINE = "data/quarantine"


def corpus(domain: str) -> str:
    return f"{CORPUS}/{domain}"


def sft(domain: Optional[str] = None, split: Optional[str] = None) -> str:
    """data/sft, data/sft/<domain> or data/sft/<domain>/<split> (a folder of Parquet shards)."""
    if domain is None:
        return SFT
    return f"{SFT}/{domain}" if split is None else f"{SFT}/{domain}/{split}"


def sft_shard(domain: str, split: str, n: int = 0) -> str:
    """The n-th Parquet shard of a split (prepare's _ShardWriter names them part-00000.parquet, ...)."""
    return f"{sft(domain, split)}/part-{n:05d}.parquet"


TOKENS = "data/tokens"


def tokens(domain: str, key: str) -> str:
    """The domain's tokenized examples (all splits), by what they were made from (pipeline.train.data)."""
    return f"{TOKENS}/{domain}/{key}.parquet"


def quarantine(source: str) -> str:
    return f"{QUARANTINE}/{source}"


def staged_sft(domain: str, source: str) -> str:
    """A source's SFT rows before the domain's split (prepare)."""
    return f"{WORK}/sft/{domain}/{source}"


def source_marker(source: str) -> str:
    """prepare's record of a finished source: {"fingerprint", "manifest"}."""
    return f"{WORK}/sources/{source}.json"


def domain_marker(domain: str) -> str:
    """prepare's record of a finished domain: {"fingerprint" (of its inputs and settings), "manifest"}."""
    return f"{WORK}/domains/{domain}.json"


# ---- base_model/: the demo's tiny base model -----------------------------------------------------------
TINY_BASE = "base_model"
TINY_META = "base_model/tiny_meta.json"   # written last: the tiny base's completion marker


# ---- adapters/: one folder per domain, shared by every run_name -------------------------------------------
ADAPTERS = "adapters"
TRAINING_REPORT = "training_report.json"


def adapter(domain: str) -> str:
    return f"{ADAPTERS}/{domain}"


def training_report(domain: str) -> str:
    """A finished adapter's metrics and history; present only for a finished adapter."""
    return f"{adapter(domain)}/{TRAINING_REPORT}"


def merged(domain: str) -> str:
    return f"{adapter(domain)}/merged"


def adapter_domain(rel: str) -> Optional[str]:
    """The domain of adapters/<domain>/training_report.json (a path a listing of ADAPTERS gave), else None."""
    parts = rel.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == ADAPTERS and parts[2] == TRAINING_REPORT else None


# ---- runs/<run_name>/: one run's Ray storage, records and logs -------------------------------------------------
RUNS = "runs"


def run(run_name: str) -> str:
    return f"{RUNS}/{run_name}"


def run_config(run_name: str) -> str:
    """The settings of the run's last stage (redacted), for `adapters report` without --config."""
    return f"{run(run_name)}/config.json"


RECORD_KINDS = ("domains", "stages", "fatal")   # runs/<run>/<kind>/<name>.json


def record(run_name: str, kind: str, name: str) -> str:
    return f"{run(run_name)}/{kind}/{name}.json"


def parse_record(rel: str) -> Optional[tuple[str, str, str]]:
    """(run, kind, name) of runs/<run>/<kind>/<name>.json (a path a listing of RUNS gave), else None."""
    parts = rel.split("/")
    if len(parts) == 4 and parts[0] == RUNS and parts[3].endswith(".json"):
        return parts[1], parts[2], parts[3][:-5]
    return None


def domain_state(run_name: str, domain: str) -> str:
    """The domain's outcome in this run (pipeline/outcome.py)."""
    return record(run_name, "domains", domain)


def fatal(run_name: str, domain: str) -> str:
    """A worker's non-retryable error (pipeline/outcome.py: written by the worker, not the driver)."""
    return record(run_name, "fatal", domain)


def stage_state(run_name: str, stage: str) -> str:
    return record(run_name, "stages", stage)


def checkpoints(run_name: str, domain: Optional[str] = None) -> str:
    """Checkpoints: runs/<run>/train (Ray Train's storage_path), runs/<run>/train/<domain> (one domain's)."""
    return f"{run(run_name)}/train" if domain is None else f"{run(run_name)}/train/{domain}"


CHECKPOINT_STATE = "train_state.json"   # in every checkpoint: step, compat record, identity


def tune(run_name: str) -> str:
    """Ray Tune's storage: its TensorBoard / CSV / JSON loggers."""
    return f"{run(run_name)}/tune"


def log_file(run_name: str, command: str, stamp: str) -> str:
    return f"{run(run_name)}/logs/{command}-{stamp}.log"


# ---- eval/ and report/ ---------------------------------------------------------------------------------
EVAL = "eval"
EVAL_MATRIX = "eval/matrix.json"


def eval_scores(model: str, domain: Optional[str] = None) -> str:
    """eval/scores/<model>/<dataset>.parquet (one row per test item), or the model's folder."""
    return f"{EVAL}/scores/{model}" if domain is None else f"{EVAL}/scores/{model}/{domain}.parquet"


HARNESS_JSON = "eval/harness.json"   # lm-evaluation-harness's rows on base + every adapter (optional)


def harness_results(model: str) -> str:
    """lm-eval's own results of one model (task configs, versions, n-samples)."""
    return f"{EVAL}/harness/{model}.json"


REPORT = "report"


def report(name: str) -> str:
    return f"{REPORT}/{name}"


REPORT_JSON, REPORT_MD, REPORT_HTML = report("summary.json"), report("summary.md"), report("summary.html")


# ---- the docs' table -------------------------------------------------------------------------------------
D, S, R, M, SRC = "<domain>", "<split>", "<run_name>", "<model>", "<source>"

# (path, what it holds, written by): the output tree as the docs show it
TREE: tuple[tuple[str, str, str], ...] = (
    (OUTPUT_MARKER, "marks the folder as this project's output", "`pipeline/ownership.py`"),
    (LOCK_FILE, "the running command's host, pid and command (one run at a time)", "`pipeline/ownership.py`"),
    (DOWNLOAD_MANIFEST, "versions (revision / commit) and files of the downloaded sources", "`adapters download`"),
    (MANIFEST, "per source: files + sha256, read / kept / quarantined (by reason) / deduplicated / capped; "
               "per domain: corpus rows, SFT rows per split; contamination", "`adapters prepare`"),
    (PREPARED, "prepare's completion marker (the fingerprint of its inputs and settings), written last",
     "`adapters prepare`"),
    (corpus(D) + "/*.parquet", "normalized documents", "`adapters prepare`"),
    (sft(D, S) + "/*.parquet", "conversations, split train / val / test", "`adapters prepare`"),
    (quarantine(SRC) + "/*.parquet", "every rejected record or file, with the reason", "`adapters prepare`"),
    (tokens(D, "<key>"), "the domain's tokenized examples, named by the tokenizer, its chat template, the "
                         "truncation settings and the SFT shards they came from (a re-run does not tokenize again)",
     "`adapters train`"),
    (WORK + "/", "prepare's per-source and per-domain markers and staged rows (resuming)", "`adapters prepare`"),
    (TINY_BASE + "/", "the demo's tiny base model (`model.base: tiny`); `tiny_meta.json` written last",
     "`adapters train`"),
    (adapter(D) + "/", "PEFT adapter (adapter_config.json, adapter_model.safetensors), tokenizer files, "
                       "model card (README.md)", "`adapters train`"),
    (training_report(D), "a finished adapter's metrics, history and identity", "`adapters train`"),
    (merged(D) + "/", "the base model with the adapter merged (bf16), on request", "`export_merged`"),
    (run_config(R), "the settings of the run's last stage (redacted)", "`pipeline/cli.py`"),
    (domain_state(R, D), "the domain's outcome in this run (running / finished / failed / skipped / interrupted)",
     "`adapters train`"),
    (fatal(R, D), "a worker's error that retrying cannot help (part of the domain's outcome)", "`adapters train`"),
    (stage_state(R, "<stage>"), "a stage's state while it runs, then how it ended", "`pipeline/cli.py`"),
    (checkpoints(R, D) + "/", "the domain's checkpoints (the best by val loss and the latest)", "`adapters train`"),
    (tune(R) + "/", "Ray Tune storage: TensorBoard / CSV / JSON logs per trial", "`adapters train`"),
    (log_file(R, "<command>", "<time>"), "a command's full log (local outputs)", "`pipeline/logs.py`"),
    (EVAL_MATRIX, "base and every adapter on every domain's test set", "`pipeline/eval`"),
    (eval_scores(M, D), "one row per test item", "`pipeline/eval`"),
    (HARNESS_JSON, "lm-evaluation-harness's benchmarks on base and every adapter, with the commands that "
                   "reproduce them (`eval.harness_tasks`)", "`pipeline/eval/harness.py`"),
    (harness_results(M), "lm-eval's own results of one model", "`pipeline/eval/harness.py`"),
    (report("summary.json") + " .md .html *.png", "the report", "`adapters report`"),
)


def tree_table() -> str:
    """The output tree as a Markdown table (docs/ARCHITECTURE.md holds this text; a test checks)."""
    rows = ["| path under `--output` | what | written by |", "| --- | --- | --- |"]
    rows += [f"| `{p}` | {what} | {who} |" for p, what, who in TREE]
    return "\n".join(rows)
