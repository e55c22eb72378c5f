"""Thin ``ray job submit`` entrypoints, one per stage plus ``run_pipeline`` (all stages).

Each is ``python -m jobs.<stage> --config FILE [--output URI] [--raw-dir DIR] [--set k=v ...]`` and
does nothing but call ``pipeline.cli.main`` with its stage, so a job runs exactly what
``adapters <stage>`` runs. ``python -m jobs.submit`` submits one of them to a Ray cluster
(see docs/CLUSTER.md).
"""
from __future__ import annotations

import sys
from typing import Optional


def run_stage(stage: str, argv: Optional[list[str]] = None) -> int:
    """``adapters <stage> <argv>``; returns its exit code."""
    # imported here: importing the package itself needs none of the pipeline's dependencies (the packaging
    # test checks an install without them maps both packages)
    from pipeline.cli import main
    return main([stage, *(sys.argv[1:] if argv is None else argv)])
