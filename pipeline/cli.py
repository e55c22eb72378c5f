"""`adapters <command>`; `python -m pipeline <command>` does the same.

    adapters download|prepare|train|eval|report|run --config FILE [--raw-dir DIR] [--output URI]
                                                    [--set key=value ...] [--domains a,b] [--verbose]
    adapters doctor --config FILE [--load]
    adapters status --output URI
    adapters generate --output URI --domain D [--base] "prompt" ...   (pipeline/eval/generate.py)
    adapters serve --output URI [--port 8000]                        (pipeline/serve.py)

The CLI owns what a person sees of a run: the console and its log file (pipeline.logs), one line per
user error, the failed domains listed last, one line on Ctrl-C with the command that resumes, the exit
status (EXIT_STATUS, printed by ``adapters --help``), a record of each stage while it runs
(pipeline.status.StageRecord), and a local Ray stopped on every way out (pipeline.raycluster).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from typing import Optional

from pipeline import layout
from pipeline.config import ConfigError, load_config
from pipeline.doctor import preflight, run_doctor
from pipeline.download import run_download
from pipeline.errors import UsageError, UserFacingError, no_space_message
from pipeline.eval import run_eval_stage
from pipeline.eval.generate import config_from_output, main_generate
from pipeline.eval.harness import check_tasks
from pipeline.logs import log_file_for, setup_console
from pipeline.ownership import claim_output, OutputLock, refuse_forbidden
from pipeline.prepare import run_prepare
from pipeline.raycluster import normalize_ray_address, shutdown_ray
from pipeline.redaction import mask_process_title, redact_args
from pipeline.report import run_report
from pipeline.serve import run_serve
from pipeline.status import cause_line, prepare_state, run_status, StageRecord
from pipeline.storage import open_store, StorageError, Store
from pipeline.train import run_train
from pipeline.train.preview import show_examples

log = logging.getLogger("pipeline")

STAGES = ("download", "prepare", "train", "eval", "report", "run")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# 128 + the signal's number, as a shell reports a process the signal ended
EXIT_BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
EXIT_STATUS = """exit status:
  0    done: for train and run, every selected domain finished (now or in an earlier run)
  1    a domain failed or had nothing to train, or a stage failed (in run: a failed evaluation, after the
       report); the causes are printed last
  2    usage or config error, nothing ran: no prepared data yet, prepare produced no SFT data, no finished
       adapter to evaluate (eval), a domain no source provides, an unknown key or bad value; the message
       names the fix
  130  interrupted by Ctrl-C (143: by SIGTERM, 129: by SIGHUP, a closed terminal): trials stopped, state
       files say interrupted, the local Ray stopped; the command that resumes is printed"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapters", description="Train one QLoRA adapter per subject domain on Ray.",
                                epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def common(sp: argparse.ArgumentParser, config_required: bool = True, raw_dir: bool = True,
               domains: bool = True) -> None:
        sp.add_argument("--config", required=config_required, help="YAML config, e.g. configs/demo.yaml")
        if raw_dir:
            sp.add_argument("--raw-dir", help="raw data directory (overrides data.raw_dir)")
        sp.add_argument("--output", help="local directory or s3://bucket/prefix (overrides output)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
        if domains:
            sp.add_argument("--domains", help="comma-separated subset of the config's domains, e.g. debate,medicine")
        sp.add_argument("--verbose", action="store_true",
                        help="also show Ray's and the libraries' own lines on the console (always in the log file "
                             "under runs/<run_name>/logs/)")
        sp.add_argument("--force", action="store_true",
                        help="use an output folder that is not empty and was not made by this project (nothing of "
                             "yours in it is deleted; files the project writes there are replaced)")

    def command(name: str, text: str, **kw) -> argparse.ArgumentParser:
        """A subcommand whose --help starts with what it does (argparse shows `help` only in the list)."""
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog=EXIT_STATUS,
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    helps = {"download": "fetch raw sources, with checksums and completion markers",
             "prepare": "Ray Data: raw files -> corpus and SFT Parquet shards + manifest",
             "train": "one QLoRA trial per domain (Ray Tune + Ray Train); no evaluation (that is eval)",
             "eval": "base model and every finished adapter on every domain's test split -> eval/matrix.json "
                     "(kept when the adapters, data and eval settings are unchanged)",
             "report": "summary.json / .md / .html and plots (without --config: the settings the run stored)",
             "run": "download, prepare, train, eval and report"}
    for name in STAGES:
        sp = command(name, helps[name])
        common(sp, config_required=name != "report", raw_dir=name in ("download", "prepare", "run"),
               domains=name != "download")
        if name in ("prepare", "run"):
            sp.add_argument("--show-examples", type=int, default=0, metavar="N",
                            help="after prepare, print N train rows per domain as training encodes them, the "
                                 "trained tokens between ⟦ ⟧")
        if name in ("eval", "run"):
            sp.add_argument("--harness", metavar="TASKS",
                            help="also run these lm-evaluation-harness tasks on the base and every adapter, e.g. "
                                 "medmcqa,pubmedqa (the same as --set eval.harness_tasks=...; needs the [harness] extra)")
    d = command("doctor", "pre-flight checks: packages, CUDA, Ray, output, base model, memory, serving")
    common(d)
    d.add_argument("--load", action="store_true", help="also load the base model in 4-bit and generate once")
    s = command("status", "each stage's and domain's state from what is in the output tree")
    common(s, config_required=False, raw_dir=False)
    g = command("generate", "answers to prompts from the base model and domain adapters (pipeline/eval/generate.py)")
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
    g.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' own lines too")
    v = command("serve", "an OpenAI-compatible endpoint on Ray Serve: the base model once, every domain's adapter "
                "selected by the request's model (pipeline/serve.py, docs/SERVING.md)")
    v.add_argument("--output", help="the run's output (local or s3://); its adapters and settings are used")
    v.add_argument("--config", help="the run's YAML (default: the settings recorded with the adapters)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    v.add_argument("--domains", help="serve only these domains' adapters (default: every finished one), e.g. debate,medicine")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch-size", type=int, default=8, help="requests generated together (any mix of adapters)")
    v.add_argument("--batch-wait-ms", type=float, default=50.0, help="how long a batch waits to fill")
    v.add_argument("--max-tokens", type=int, default=256, help="the most tokens one answer may have")
    v.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' own lines too")
    return p


def _domains(arg: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in arg.split(",") if x.strip()] if arg else None


class _Signals:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so all three unwind through the same
    clean-up (state files `interrupted`, the local Ray stopped); once that has begun, a second signal
    exits at once (the watchdog of pipeline.raycluster stops a local Ray). pipeline.raycluster puts these
    handlers back after ray.init, which replaces the SIGTERM one."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

    def __init__(self):
        self.received = signal.SIGINT
        self._old = {s: signal.getsignal(s) for s in self.CAUGHT}
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._interrupt)

    def _interrupt(self, signum, frame):
        self.received = signal.Signals(signum)
        raise KeyboardInterrupt

    def cleaning_up(self) -> None:
        def now(signum, frame):
            try:
                sys.__stderr__.write("interrupted again: exiting without clean-up\n")
            except (OSError, ValueError):
                pass
            os._exit(EXIT_BY_SIGNAL.get(signum, EXIT_BY_SIGNAL[signal.SIGINT]))
        for s in self._old:
            signal.signal(s, now)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _say(line: str) -> None:
    """A last line to stderr; after SIGHUP the terminal may be gone (EIO), which must not end the clean-up."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    console = setup_console(verbose=args.verbose)
    signals = _Signals()
    mask_process_title()   # a token in a --set URL: not in `ps` for every user of the machine
    # shown on Ctrl-C and stored in runs/<run>/stages/*.json (in the bucket on S3): never with a secret in it
    args.resume = f"adapters {shlex.join(redact_args(argv))}"
    try:
        return _dispatch(args, console)
    except KeyboardInterrupt:
        signals.cleaning_up()
        shutdown_ray()
        _say(f"interrupted ({_Signals.NAMES[signals.received]}); finished work is kept. Resume with: {args.resume}")
        return EXIT_BY_SIGNAL[signals.received]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a bug: its traceback goes to the console and the log file
        full = no_space_message(e, args.output or ".")
        if full:
            _say(f"error: {full}")
            return EXIT_FAILED
        log.exception("unexpected error (a bug: please report it with the log file named above)")
        return EXIT_FAILED
    finally:
        signals.cleaning_up()
        try:
            shutdown_ray()
        finally:
            console.close()
            signals.restore()


def _settings_of_output(args, domains: list[str]):
    """The config of --config, else the one the run at --output recorded (its adapters' training reports)."""
    if args.config:
        return load_config(args.config, sets=args.set, output=args.output)
    if not args.output:
        raise UsageError(f"{args.command} needs --output URI (the run's output) or --config FILE")
    return config_from_output(args.output if "://" in args.output else os.path.abspath(args.output), domains, args.set)


def stored_config(args):
    """`adapters report --output X` without --config: the config the run's stages stored (one run name)."""
    import json
    import tempfile
    if not args.output:
        raise UsageError("report needs --output URI (the run's output) or --config FILE")
    out = args.output if "://" in args.output else os.path.abspath(args.output)
    store = Store(out)
    found = sorted(store.list_files(layout.RUNS, "config.json"))
    found = [f for f in found if f == layout.run_config(f.split("/")[1])]
    if len(found) != 1:
        raise UsageError(f"{'no run' if not found else 'several runs'} under {store.uri_of(layout.RUNS)} "
                         f"{'stored its settings' if not found else '(' + ', '.join(f.split('/')[1] for f in found) + ')'}: "
                         "pass --config with the run's YAML")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(store.read_json(found[0]), f)   # JSON is YAML
    return load_config(f.name, sets=args.set, output=out, domains=_domains(args.domains))


def _dispatch(args, console) -> int:
    if args.command == "generate":
        return main_generate(args)
    if args.command == "serve":
        cfg = _settings_of_output(args, _domains(args.domains) or [])
        normalize_ray_address(cfg)
        return run_serve(cfg, _domains(args.domains), args.host, args.port, args.max_batch_size,
                         args.batch_wait_ms / 1000.0, args.max_tokens)
    if args.command == "status":
        return run_status(config_path=args.config, output=args.output, sets=args.set, domains=_domains(args.domains))
    if args.command == "report" and not args.config:
        cfg = stored_config(args)
    else:
        sets = args.set + ([f"eval.harness_tasks={args.harness}"] if getattr(args, "harness", None) else [])
        cfg = load_config(args.config, sets=sets, raw_dir=getattr(args, "raw_dir", None), output=args.output,
                          domains=_domains(getattr(args, "domains", None)))
    normalize_ray_address(cfg)
    if args.command == "doctor":
        return run_doctor(cfg, load=args.load)
    return run_stages(cfg, args, console)


def _command(stage: str, args, cfg) -> str:
    """The `adapters` command line for ``stage`` with this invocation's config and output."""
    parts = ["adapters", stage]
    if args.config:
        parts += ["--config", args.config]
    parts += ["--output", cfg.output]
    return shlex.join(parts)


def check_prepared(cfg, store, args) -> None:
    """Before training: prepare finished and produced SFT data for at least one selected domain."""
    st = prepare_state(store, None)   # data/ is shared by every run name: any run's prepare counts
    data = store.uri_of(layout.DATA)
    if st.state == "not started":
        raise UsageError(f"no prepared data under {data}: run `{_command('prepare', args, cfg)}` first")
    if st.state == "running":
        raise UsageError(f"prepare is still running on {data} ({st.detail}): wait for it to finish")
    if st.state != "finished":
        raise UsageError(f"prepare did not finish ({st.state}): run `{_command('prepare', args, cfg)}` again; it resumes")
    if any(store.list_files(layout.sft(d, "train"), ".parquet") and store.list_files(layout.sft(d, "val"), ".parquet")
           for d in cfg.domains):
        return
    manifest = store.read_json_or(layout.MANIFEST) or {}
    why = "; ".join(f"{d}: {((manifest.get('domains') or {}).get(d) or {}).get('reason') or 'no train/val split'}"
                    for d in cfg.domains)
    raise UsageError(f"prepare produced no SFT data for {', '.join(cfg.domains)} ({why}): check the raw data "
                     f"(`adapters download`, --raw-dir) and data.sources, then run `{_command('prepare', args, cfg)}` again")


def run_stages(cfg, args, console) -> int:
    stages = STAGES[:-1] if args.command == "run" else (args.command,)
    if "eval" in stages and cfg.eval.enabled and cfg.eval.harness_tasks:
        check_tasks(cfg)   # an unknown lm-eval task (or lm-eval missing) fails now, not after training
    try:
        store = open_store(cfg)
        refuse_forbidden(cfg, store)   # before the write probe: never a file in `/` or the raw dir
        store.check_writable()
        claim_output(cfg, store, force=getattr(args, "force", False))
    except StorageError as e:
        raise UserFacingError(str(e)) from None
    with OutputLock(store, args.resume):   # one run per output: a second fails now, naming this one
        return _run_locked(cfg, args, console, store, stages)


def _run_locked(cfg, args, console, store, stages) -> int:
    command = args.command
    results: Optional[dict] = None   # train's, per domain
    eval_error: Optional[str] = None
    store.write_json(layout.run_config(cfg.run_name), cfg.redacted())
    path, upload = log_file_for(cfg, command)
    console.open_file(path, upload)
    log.info("log file: %s%s", upload[0].uri_of(upload[1]) if upload else path,
             "" if console.verbose else " (--verbose shows all of it here)")
    for stage in stages:
        try:
            out = _run_stage(stage, cfg, args, store)
        except (UserFacingError, KeyboardInterrupt):
            raise
        except Exception as e:
            if stage != "eval":
                raise
            # the adapters stand: in `run` the report is still made (without the evaluation); exit 1, cause last
            eval_error = no_space_message(e, cfg.output) or f"{type(e).__name__}: {e}"
            log.error("stage eval failed: %s%s", cause_line(eval_error, 400),
                      "; the report is made without it" if "report" in stages else "")
            log.debug("the evaluation's traceback", exc_info=True)
            continue
        if stage == "train":
            results = out
    return _verdict(results, cfg, args, console, eval_error)


def _run_stage(stage: str, cfg, args, store) -> Optional[dict]:
    """One stage under its record (runs/<run>/stages/<stage>.json); train returns its per-domain results."""
    results = None
    with StageRecord(store, cfg.run_name, stage, args.resume):
        t0 = time.time()
        log.info("stage %s: starting (output %s)", stage, cfg.output)
        if stage == "download":
            run_download(cfg)
        elif stage == "prepare":
            run_prepare(cfg)
            if getattr(args, "show_examples", 0):
                show_examples(cfg, store, args.show_examples)
        elif stage == "train":
            check_prepared(cfg, store, args)
            preflight(cfg)  # the checks that cost nothing: fail now, not at step 5,000
            results = run_train(cfg)
        elif stage == "eval":
            # alone, no finished adapter is a usage error; in `run`, train has said why already
            run_eval_stage(cfg, _command("train", args, cfg) if args.command == "eval" else None)
        elif stage == "report":
            run_report(cfg)   # it logs where the report is
        log.info("stage %s: done in %.1fs", stage, time.time() - t0)
    return results


def _verdict(results: Optional[dict], cfg, args, console, eval_error: Optional[str] = None) -> int:
    """0 when every trained domain finished and the evaluation (if it ran) did not fail; else the domains
    that did not finish, with their causes, and the evaluation's cause, last."""
    bad = {d: r for d, r in (results or {}).items() if r.get("status") != "finished"}
    if not bad and not eval_error:
        return EXIT_OK
    console.settle_workers()   # the failed workers' last lines first,
    shutdown_ray()             # and none after the summary
    lines = []
    if bad:
        lines.append(f"error: {len(bad)} of {len(results)} domain(s) did not finish:")
        width = max(len(d) for d in bad)
        for d, r in bad.items():
            lines.append(f"  {d.ljust(width)}  {r.get('status')}: {cause_line(r.get('error') or 'no cause recorded', 400)}")
    if eval_error:
        lines.append(f"error: the evaluation failed: {cause_line(eval_error, 400)}")
    if bad:
        lines.append(f"  details: `adapters status --output {cfg.output}` and the report; after fixing the cause, "
                     f"the same command trains only what is not finished")
    else:
        lines.append(f"  details: the log file named above; `{_command('eval', args, cfg)}` runs the evaluation again")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
