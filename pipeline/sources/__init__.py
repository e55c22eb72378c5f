"""The registry of sources: the built-in ones (one module each, its ``SOURCE``) and the config's own.

    BUILTIN              name -> SourceSpec, in the canonical order (prepare, download and reports use it)
    SOURCES, DOMAINS     the built-in names and domains, derived from BUILTIN (config validates against them)
    SETTINGS             every built-in source's own settings (data.download.<key>, environment variables):
                         config's fields, environment overrides and redaction, download and job submission use them
    registry(data_cfg)   BUILTIN plus a SourceSpec per data.custom_sources entry
    selected_sources(cfg)  the sources a run prepares and downloads: built-ins named in data.sources and
                         every custom source, whose domain is in cfg.domains
    sources_table()      the Markdown table of the built-in sources in docs/ARCHITECTURE.md

Importing this package is cheap (no pyarrow, no Ray): config.py uses it to validate names.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from . import climate_fever, ddo, debatesum, iam, medical_meadow, medmcqa, medquad, openstax, opencaselist, pubmed_qa
from .base import DownloadPart, EvalTask, Opts, Quarantine, Raw, Reject, SourceSetting, SourceSpec, finalize_sft, norm_key, text_hash
from .custom import TEXT_ONLY_NOTE, custom_spec

BUILTIN: dict[str, SourceSpec] = {m.SOURCE.name: m.SOURCE for m in (
    debatesum, opencaselist, iam, ddo, medmcqa, pubmed_qa, medquad, medical_meadow, openstax, climate_fever)}
SOURCES: tuple[str, ...] = tuple(BUILTIN)
DOMAINS: tuple[str, ...] = tuple(dict.fromkeys(s.domain for s in BUILTIN.values()))


def _settings() -> tuple[SourceSetting, ...]:
    out = tuple(x for s in BUILTIN.values() for x in s.settings)
    names = Counter([x.key for x in out] + [e for x in out for e in x.env])
    twice = sorted(k for k, n in names.items() if n > 1)
    if twice:  # two sources would share one data.download key or one environment variable
        raise ValueError(f"source settings declared twice: {twice}")
    return out


SETTINGS: tuple[SourceSetting, ...] = _settings()


def registry(data_cfg: Any = None) -> dict[str, SourceSpec]:
    """Every source a config knows: the built-ins, then its data.custom_sources in their order."""
    out = dict(BUILTIN)
    for c in getattr(data_cfg, "custom_sources", None) or []:
        out[c.name] = custom_spec(c)
    return out


def selected_sources(cfg: Any) -> list[SourceSpec]:
    """The sources a run uses, in registry order: the built-ins listed in data.sources and every custom
    source, whose domain is one of cfg.domains."""
    custom = {c.name for c in cfg.data.custom_sources}
    return [s for n, s in registry(cfg.data).items()
            if (n in cfg.data.sources or n in custom) and s.domain in cfg.domains]


def sources_table() -> str:
    """The built-in sources as a Markdown table (docs/ARCHITECTURE.md holds this text; a test checks)."""
    rows = ["| source | domain | raw folder | files read | licence | fetched by `adapters download` from |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in BUILTIN.values():
        fetched = ", ".join(f"{p.kind} `{p.repo}`" if p.repo else f"{p.kind} ({', '.join(s.setting(k).env[0] for _, k in p.files)})"
                            for p in s.parts)
        rows.append(f"| {s.name} | {s.domain} | `{s.raw_dir}/` | {', '.join(f'`{p}`' for p in s.patterns)} | "
                    f"{s.license} | {fetched}{' (opt-in)' if s.opt_in else ''} |")
    return "\n".join(rows)


__all__ = ["BUILTIN", "SOURCES", "DOMAINS", "SETTINGS", "SourceSetting", "registry", "selected_sources", "sources_table", "SourceSpec",
           "DownloadPart", "EvalTask", "Raw", "Quarantine", "Reject", "Opts", "finalize_sft", "norm_key", "text_hash",
           "TEXT_ONLY_NOTE"]
