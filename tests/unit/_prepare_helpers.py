"""Helpers shared by the prepare/source tests (not a test module)."""
from __future__ import annotations

import pytest

import glob
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.prepare import file_events
from pipeline.sources import BUILTIN, Opts

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "fixtures" / "raw"
DAMAGED = ROOT / "fixtures" / "damaged"


def make_cfg(raw, out, *sets: str, domains=None):
    """A Config for prepare tests, independent of configs/*.yaml and of the caller's environment."""
    base = ["model.base=tiny", "resources.device=cpu", "resources.num_cpus=2"]
    return load_config(None, sets=base + list(sets), raw_dir=str(raw), output=str(out), domains=domains, environ={})


def events(source: str, raw: Path = RAW, opts: Opts | None = None):
    """All events of a built-in source's files under raw, in canonical order (no Ray)."""
    src = BUILTIN[source]
    out = []
    for p, rel in src.listing(raw).read:
        out.extend(file_events(src, str(p), rel, opts or Opts()))
    return out


def records(source, raw=RAW):
    return [e for k, e in events(source, raw) if k == "r"]


def quarantined(source, raw=RAW):
    return [e for k, e in events(source, raw) if k == "q"]


def read_rows(out: Path, pattern: str) -> list[dict]:
    rows = []
    for f in sorted(glob.glob(str(out / pattern), recursive=True)):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def all_rows(out: Path) -> dict[str, list[dict]]:
    """Every output row (corpus, SFT, quarantine), by kind, for comparing two runs."""
    return {"corpus": read_rows(out, "data/corpus/*/*.parquet"),
            "sft": read_rows(out, "data/sft/*/*/*.parquet"),
            "quarantine": read_rows(out, "data/quarantine/*/*.parquet")}


# one local Ray per test module that uses it (shared by the prepare tests)
@pytest.fixture(scope="module")
def ray_local():
    import ray
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()
