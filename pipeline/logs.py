"""The console and the run's log file: what a person sees, and where everything else goes.

    console = setup_console(verbose)   first thing in the CLI: log format, warnings, sys.stdout / sys.stderr
    console.open_file(path)            once the output and run are known; lines printed before are kept
    console.close()                    restores sys.stdout / sys.stderr; closes the file
    log_file_for(cfg, command)         runs/<run_name>/logs/<command>-<UTC time>.log under a local output
                                       (under an s3:// output: a local file, uploaded there by ``close``)
    setup_worker()                     Ray's worker_process_setup_hook (pipeline.raycluster passes it to ray.init)

Everything the driver prints goes through one router: the pipeline's log lines, Ray's own lines, and
the lines of every Ray worker, which Ray forwards to the driver's sys.stdout / sys.stderr
(``log_to_driver``). Every line goes to the log file. On the console, lines matching ``NOISE`` (Ray
Data executor chatter, Ray Train's per-report dicts, Tune's experiment box and its Tuner.restore hint,
library warnings, ...) and INFO records of loggers other than ``pipeline.*`` are left out, unless
``--verbose``. Lines of the pipeline's own loggers at WARNING or above are never left out.

Hand-written because nothing in Ray does it: Ray has per-library levels (Train's LoggingConfig, Tune's
verbose) but forwards a worker's output to the driver as plain text lines, and offers no way to send
some of them to a file of ours and the rest to the console.

Python warnings are printed as one line, in the driver and (through ``setup_worker``) in every Ray
worker: ``warning: ...`` when raised from the pipeline's own code (shown: fix the cause),
``library warning: ...`` otherwise (log file only).
"""
from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, TextIO

from pipeline import layout
from pipeline.redaction import scrub
from pipeline.storage import open_store

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PACKAGE_DIR = str(Path(__file__).resolve().parent)
LIBRARY_WARNING = "library warning:"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RAY_PREFIX = re.compile(r"^\([^()]*\) ")   # "(RayTrainWorker pid=12) " on a line Ray forwards from a worker
# a log record of the pipeline's own loggers (FORMAT): it names its domain or stage itself, so on the console
# Ray's worker prefix is left out of it (the log file keeps it); other worker lines (tracebacks) keep theirs
PIPELINE_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ pipeline[.:]")

# Lines that go to the log file only (unless --verbose). Each names one known message; matched
# anywhere in the line, so Ray's "(RayTrainWorker pid=..)" prefixes and "[repeated 3x]" suffixes do not matter.
NOISE = tuple(re.compile(p) for p in (
    # Ray core, in the driver and the raylet
    r"Token authentication is enabled for this Ray cluster",
    r"Generated new authentication token and saved to",
    r"Started a local Ray instance",                     # the pipeline logs its own line with the dashboard URL
    r"PYTHON worker processes have been started on node",
    r"Ray deduplicates logs by default",
    # Ray Data's streaming executor
    r"streaming_executor\.py:\d+ -- ",
    r"(Starting execution of|Execution plan of) Dataset ",
    r"Dataset \S+ execution finished in",
    r"Progress bars disabled\. To enable",
    r"Estimated parquet (encoding ratio|reader batch size)",
    # Ray Train V2: controller, workers, placement-group cleaner
    r"Reporting training result \d+: TrainingReport\(",
    r"Checkpoint successfully created at: ",
    r"Requesting resources: \{",
    r"(Attempting to start|Started) training worker group of size",
    r"world_rank=\d+, local_rank=\d+, node_rank=\d+",
    r"Setting up process group for: ",
    r"Failed to query Ray Train Controller actor state",
    r"Actor with class name: '[^']+' and ID: '\w+' has constructor arguments in the object store",
    # Ray Tune (the pipeline prints its own summary and the `adapters` command that resumes)
    r"^[╭├╰│]",
    r"View detailed results here: ",
    r"To visualize your results with TensorBoard",
    r"Wrote the latest version of all result files",
    r"Experiment has been interrupted, but the most recent state was saved",
    r"Stop signal received \(e\.g\. via SIGINT/Ctrl\+C\), ending Ray Tune run",
    r"Resume (experiment|training) with: ",
    # libraries
    LIBRARY_WARNING,
    r"Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes then uses its built-in CPU path
    r"(Loading weights|Writing model shards):\s+\d+%",              # transformers' progress bars
))
# The pipeline's own records at WARNING and above, as FORMAT writes them: always on the console.
ALWAYS = re.compile(r" (WARNING|ERROR|CRITICAL) pipeline[.:]")


def is_noise(line: str) -> bool:
    plain = ANSI.sub("", line)
    return not ALWAYS.search(plain) and any(p.search(plain) for p in NOISE)


class Console:
    """Routes lines to the console and the log file. One per CLI invocation."""

    def __init__(self, verbose: bool, stdout: TextIO, stderr: TextIO):
        self.verbose = verbose
        self.lock = threading.RLock()
        self.real = {"stdout": stdout, "stderr": stderr}
        self.file: Optional[TextIO] = None
        self.path: Optional[Path] = None
        self.upload: Optional[tuple] = None   # (store, rel) to copy the file to at close
        self._early: list[str] = []           # lines before the file is open
        self._held_blank = 0        # blank lines seen since the last line: shown only between two shown lines
        self._last_shown = False
        self._ignored: dict[str, list] = {}   # "Exception ignored in" blocks being read, by Ray's line prefix
        self.last_worker_line = 0.0           # time.monotonic() of the last line Ray forwarded from a worker

    # -- lines ----------------------------------------------------------------------------------
    def to_file(self, line: str) -> None:
        with self.lock:
            text = ANSI.sub("", line).rstrip("\r")
            if "\r" in text:   # a progress bar: its last state, with the worker's prefix
                m = RAY_PREFIX.match(text)
                text = (m.group(0) if m else "") + text.rsplit("\r", 1)[-1]
            if self.file is not None:
                try:
                    self.file.write(text + "\n")
                    self.file.flush()
                except OSError as e:   # a full disk: the console goes on without the file, said once
                    self._drop_file(e)
            elif self.path is None and len(self._early) < 10_000:
                self._early.append(text)

    def line(self, line: str, real: TextIO, drawn: int = 0, console: bool = True) -> None:
        """One complete line (without its newline); ``drawn``: characters of it already on the console.
        Every line is scrubbed of secrets (pipeline.redaction) before it reaches the console or the file."""
        line = scrub(line)
        with self.lock:
            if RAY_PREFIX.match(ANSI.sub("", line)):
                self.last_worker_line = time.monotonic()
            self.to_file(line)
            if self.verbose or not self._in_ignored_exception(line, real, drawn, console):
                self._show(line, real, drawn, console)

    def _show(self, line: str, real: TextIO, drawn: int, console: bool) -> None:
        if not line.strip():
            if console and self.verbose:
                real.write(line + "\n")
            else:
                self._held_blank += 1
            return
        show = console and (self.verbose or not is_noise(line))
        held, self._held_blank = self._held_blank, 0
        if show:
            if held and self._last_shown:
                real.write("\n" * held)
            if not drawn and not self.verbose:
                plain = ANSI.sub("", line)
                m = RAY_PREFIX.match(plain)
                if m and PIPELINE_RECORD.match(plain[m.end():]):
                    line = plain[m.end():]
            real.write(line[drawn:] + "\n")
            real.flush()
        elif drawn:
            real.write("\n")
        self._last_shown = show

    def _in_ignored_exception(self, line: str, real: TextIO, drawn: int, console: bool) -> bool:
        """Hold an "Exception ignored in: ..." block (Python prints it when an exception escapes a weakref
        callback or __del__) until its last line; drop it from the console when it is Ray's SIGTERM handler
        stopping a worker (SystemExit raised wherever the worker was: harmless, nothing to switch off);
        show it otherwise. True when the line was taken."""
        plain = ANSI.sub("", line)
        m = RAY_PREFIX.match(plain)
        prefix = m.group(0) if m else ""
        body = plain[len(prefix):]
        block = self._ignored.get(prefix)
        if block is None:
            if not body.startswith("Exception ignored in: "):
                return False
            self._ignored[prefix] = [(line, real, drawn, console)]
            return True
        block.append((line, real, drawn, console))
        if not body or body[0].isspace() or body.startswith("Traceback"):
            return True   # the traceback goes on
        del self._ignored[prefix]
        if body.startswith("SystemExit") and any("in sigterm_handler" in b[0] for b in block):
            self._last_shown = False
        else:
            for args in block:
                self._show(*args)
        return True

    def settle_workers(self, quiet_s: float = 1.0, limit_s: float = 5.0) -> None:
        """Wait, at most ``limit_s``, until no worker line has arrived for ``quiet_s``. Ray forwards a worker's
        output to the driver asynchronously: a failed worker's traceback can arrive after its trial has
        ended, and would land under a summary meant to be the last thing printed."""
        start = time.monotonic()
        while time.monotonic() - start < limit_s:
            if time.monotonic() - max(self.last_worker_line, start) >= quiet_s:
                return
            time.sleep(0.05)

    def draw(self, text: str, real: TextIO) -> bool:
        """Part of a line that redraws itself with '\\r' (a progress bar): to the console now, unless noise."""
        text = scrub(text)
        with self.lock:
            if self.verbose or not is_noise(text.rsplit("\r", 1)[-1]):
                real.write(text)
                real.flush()
                return True
            return False

    def _drop_file(self, e: OSError) -> None:
        f, self.file = self.file, None
        try:
            f.close()
        except OSError:
            pass
        try:
            self.real["stderr"].write(f"warning: the log file {self.path} can no longer be written ({e}); "
                                      f"the rest of this run is on the console only\n")
        except (OSError, ValueError):
            pass

    # -- the file -------------------------------------------------------------------------------
    def open_file(self, path: Path, upload: Optional[tuple] = None) -> None:
        with self.lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8", errors="replace")
            self.path, self.upload = path, upload
            for text in self._early:
                self.file.write(text + "\n")
            self._early.clear()
            self.file.flush()

    def close(self) -> None:
        """Flush what is pending, put sys.stdout / sys.stderr back, close (and upload) the log file."""
        for name in ("stdout", "stderr"):
            cur = getattr(sys, name)
            if isinstance(cur, RoutedStream) and cur.console is self:
                cur.flush_pending()
                setattr(sys, name, self.real[name])
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, RecordHandler) and h.console is self:
                root.removeHandler(h)
        with self.lock:
            for block in self._ignored.values():   # never finished: show what there is
                for args in block:
                    self._show(*args)
            self._ignored.clear()
            if self.file is not None:
                self.file.close()
                self.file = None
        if self.upload is not None and self.path is not None:
            store, rel = self.upload
            try:
                store.upload_file(self.path, rel)
            except Exception as e:  # noqa: BLE001 - the run's result does not depend on its log's copy
                print(f"warning: could not copy the log file to {store.uri_of(rel)}: {e}; it is at {self.path}",
                      file=self.real["stderr"])


class RoutedStream(io.TextIOBase):
    """sys.stdout / sys.stderr of the driver: complete lines go through ``Console.line``."""

    def __init__(self, console: Console, real: TextIO):
        self.console, self.real = console, real
        self._buf = ""
        self._drawn = 0

    def write(self, s: str) -> int:
        with self.console.lock:
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self.console.line(line, self.real, drawn=self._drawn)
                self._drawn = 0
            if "\r" in self._buf[self._drawn:] and self.console.draw(self._buf[self._drawn:], self.real):
                self._drawn = len(self._buf)
        return len(s)

    def flush_pending(self) -> None:
        with self.console.lock:
            if self._buf:
                self.console.line(self._buf, self.real, drawn=self._drawn)
                self._buf, self._drawn = "", 0

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


class RecordHandler(logging.Handler):
    """Log records: the pipeline's (any level) and anyone's WARNING+ to the console; other INFO to the file."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)
            return
        own = record.name == "pipeline" or record.name.startswith("pipeline.")
        console = self.console.verbose or own or record.levelno >= logging.WARNING
        out = sys.stdout
        real = out.real if isinstance(out, RoutedStream) else out
        for ln in text.split("\n"):
            self.console.line(ln, real, console=console)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: one line; 'library warning:' unless raised from the pipeline's own code."""
    try:
        own = str(Path(filename).resolve()).startswith(PACKAGE_DIR)
    except (OSError, ValueError):
        own = False
    text = " ".join(str(message).split())
    where = filename if own else "/".join(Path(filename).parts[-2:])
    tag = "warning:" if own else LIBRARY_WARNING
    try:
        (file or sys.stderr).write(f"{tag} {category.__name__}: {text} ({where}:{lineno})\n")
    except (OSError, ValueError):
        pass


def setup_console(verbose: bool = False) -> Console:
    """Install the router on sys.stdout / sys.stderr, the log format, and one-line warnings."""
    console = Console(verbose, sys.stdout, sys.stderr)
    sys.stdout = RoutedStream(console, console.real["stdout"])
    sys.stderr = RoutedStream(console, console.real["stderr"])
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, RecordHandler):
            root.removeHandler(h)
    root.addHandler(RecordHandler(console))
    root.setLevel(logging.INFO)
    warnings.showwarning = show_warning
    return console


def log_file_for(cfg, command: str) -> tuple[Path, Optional[tuple]]:
    """(local path of the log file, (store, rel) to upload it to at close, or None)."""
    store = open_store(cfg)
    rel = layout.log_file(cfg.run_name, command, time.strftime('%Y%m%d-%H%M%S', time.gmtime()))
    if not store.is_s3:
        return store.local_path(rel), None
    import tempfile
    return Path(tempfile.gettempdir()) / "domain-adapters" / rel, (store, rel)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: runs once in every worker process of the run (local or submitted).
    Warnings become one line each, which the driver's router sorts like any other line; the pipeline's own
    log records are written in FORMAT, which the console recognises (and shows without Ray's worker prefix)."""
    warnings.showwarning = show_warning
    logger = logging.getLogger("pipeline")
    if not any(getattr(h, "pipeline_worker", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.pipeline_worker = True   # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False         # one line per record, whatever else configured the worker's root logger
