"""`adapters <stage>`; `python -m pipeline <stage>` does the same.

    adapters download|prepare|train|report|run --config FILE [--raw-dir DIR] [--output URI]
                                               [--set key=value ...] [--domains a,b]
    adapters doctor --config FILE [--load]
    adapters status --output URI
    adapters generate --output URI --domain D [--base] "prompt" ...   (pipeline/eval/generate.py)
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional

from pipeline.config import ConfigError, load_config
from pipeline.errors import UserFacingError

log = logging.getLogger("pipeline")

STAGES = ("download", "prepare", "train", "report", "run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapters", description="Train one QLoRA adapter per subject domain on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def common(sp: argparse.ArgumentParser, config_required: bool = True) -> None:
        sp.add_argument("--config", required=config_required, help="YAML config, e.g. configs/demo.yaml")
        sp.add_argument("--raw-dir", help="raw data directory (overrides data.raw_dir)")
        sp.add_argument("--output", help="local directory or s3://bucket/prefix (overrides output)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
        sp.add_argument("--domains", help="comma-separated subset of the config's domains, e.g. debate,medicine")

    helps = {"download": "fetch raw sources, with checksums and completion markers",
             "prepare": "Ray Data: raw files -> corpus and SFT Parquet shards + manifest",
             "train": "one QLoRA trial per domain (Ray Tune + Ray Train)",
             "report": "summary.json / .md / .html and plots",
             "run": "download, prepare, train and report"}
    for name in STAGES:
        common(sub.add_parser(name, help=helps[name]))
    d = sub.add_parser("doctor", help="pre-flight checks: packages, CUDA, Ray, output, base model, memory")
    common(d)
    d.add_argument("--load", action="store_true", help="also load the base model in 4-bit and generate once")
    s = sub.add_parser("status", help="each domain's state from what is in the output tree")
    common(s, config_required=False)
    g = sub.add_parser("generate", help="answers to prompts from the base model and domain adapters (pipeline/eval/generate.py)")
    g.add_argument("prompt", nargs="*", help="prompt text(s)")
    g.add_argument("--output", help="the run's output (local or s3://); its adapters and settings are used")
    g.add_argument("--config", help="the run's YAML (default: the settings recorded with the adapters)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    g.add_argument("--domain", action="append", default=[], help="a domain whose adapter answers (repeatable, or a,b)")
    g.add_argument("--base", action="store_true", help="the base model answers too")
    g.add_argument("--prompts", help="a JSONL file with one {\"prompt\": ...} per line")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--out-file", help="also write the answers as JSONL here")
    return p


def _domains(arg: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in arg.split(",") if x.strip()] if arg else None


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        if args.command == "generate":
            from pipeline.eval.generate import main_generate
            return main_generate(args)
        if args.command == "status":
            from pipeline.status import run_status
            return run_status(config_path=args.config, output=args.output, sets=args.set, domains=_domains(args.domains))
        cfg = load_config(args.config, sets=args.set, raw_dir=args.raw_dir, output=args.output)
        if args.domains:
            wanted = _domains(args.domains)
            unknown = [d for d in wanted if d not in cfg.domains]
            if unknown:
                raise ConfigError(f"--domains names {unknown}, which the config does not list (domains: {cfg.domains})")
            cfg.domains = wanted
        if args.command == "doctor":
            from pipeline.doctor import run_doctor
            return run_doctor(cfg, load=args.load)
        return run_stages(cfg, args.command)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_stages(cfg, command: str) -> int:
    from pipeline.storage import StorageError, open_store
    stages = STAGES[:-1] if command == "run" else (command,)
    try:
        open_store(cfg).check_writable()
    except StorageError as e:
        raise UserFacingError(str(e)) from None
    for stage in stages:
        t0 = time.time()
        log.info("stage %s: starting (output %s)", stage, cfg.output)
        if stage == "download":
            from pipeline.download import run_download
            run_download(cfg)
        elif stage == "prepare":
            from pipeline.prepare import run_prepare
            run_prepare(cfg)
        elif stage == "train":
            from pipeline.doctor import preflight
            preflight(cfg)  # the checks that cost nothing: fail now, not at step 5,000
            from pipeline.train import run_train
            results = run_train(cfg)
            failed = [d for d, r in results.items() if r.get("status") != "finished"]
            if failed:
                log.error("domains failed: %s (see the report)", failed)
        elif stage == "report":
            from pipeline.report import run_report
            paths = run_report(cfg)
            log.info("report written: %s", paths.get("html") or paths)
        log.info("stage %s: done in %.1fs", stage, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
