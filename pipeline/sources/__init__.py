"""The registry of source families: name -> Source (see base.py for what each declares)."""
from __future__ import annotations

from . import climate_fever, ddo, debatesum, iam, medical_meadow, medmcqa, medquad, openstax, opencaselist, pubmed_qa
from .base import Opts, Quarantine, Raw, Reject, Source, finalize_sft, norm_key, text_hash

REGISTRY: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in (
    debatesum, opencaselist, iam, ddo, medmcqa, pubmed_qa, medquad, medical_meadow, openstax, climate_fever)}


def get_source(name: str) -> Source:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "get_source", "Source", "Raw", "Quarantine", "Reject", "Opts", "finalize_sft", "norm_key", "text_hash"]
