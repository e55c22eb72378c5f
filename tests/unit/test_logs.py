"""pipeline.logs: what reaches the console and what only the log file gets. The sample lines are copied
from a demo run's console before this filtering existed (Ray 2.60)."""
from __future__ import annotations

import io
import os
import logging
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.logs import ANSI, is_noise, setup_console, show_warning

pytestmark = pytest.mark.timeout(60)

NOISE_LINES = [
    "2026-12-01 09:58:15,277\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster.",
    "2026-12-01 09:58:17,641\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0357_0. Full logs are in /tmp/ray",
    "\x1b[36m(SplitCoordinator pid=3147)\x1b[0m Execution plan of Dataset sft_0357_0: InputDataBuffer[Input] -> TaskPoolMapOperator",
    "\x1b[36m(RayTrainWorker pid=2904)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 0}) from rank 0",
    "\x1b[36m(RayTrainWorker pid=2904)\x1b[0m Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
    "\x1b[36m(TrainController pid=2742)\x1b[0m Requesting resources: {'CPU': 0.99} * 1",
    "\x1b[36m(TrainController pid=2742)\x1b[0m - (ip=192.0.2.2, pid=2920) world_rank=0, local_rank=0, node_rank=0",
    "\x1b[36m(PlacementGroupCleaner pid=2805)\x1b[0m Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: ae0f with address: 192.0.2.2",
    "╭─────────────────────────────────────────────────────────╮",
    "│ Configuration for experiment     tune-20261201-095836   │",
    "View detailed results here: /tmp/demo_before/runs/demo/tune/tune-20261201-095836",
    "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)",
    "2026-12-01 09:58:21,816 WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward from kernels-community: No module",
    "\x1b[36m(RayTrainWorker pid=3681)\x1b[0m Loading weights:   0%|          | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|██| 21/21",
    "(RayTrainWorker pid=2904) library warning: FutureWarning: `is_gradient_checkpointing` is deprecated (transformers/modeling_utils.py:3312)",
]
SHOWN_LINES = [
    "2026-12-01 09:58:19,592 INFO pipeline.prepare: prepare: debatesum read=120 kept=120 quarantined=0",
    "\x1b[36m(RayTrainWorker pid=2904)\x1b[0m domain medicine step 5 loss 1.5558 lr 2.00e-03 12043 tok/s",
    "Traceback (most recent call last):",
    "\x1b[36m(RayTrainWorker pid=2904)\x1b[0m RuntimeError: CUDA error: no kernel image is available",
    # the pipeline's own warnings stay, even when they quote a noisy library message
    "2026-12-01 09:58:21,816 WARNING pipeline.train: Reporting training result 1: TrainingReport( was empty",
    "warning: UserWarning: something in our code (/work/pipeline/train/loop.py:353)",
]


@pytest.mark.parametrize("line", NOISE_LINES)
def test_known_noise_is_recognised(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", SHOWN_LINES)
def test_pipeline_lines_errors_and_tracebacks_are_not_noise(line):
    assert not is_noise(line)


@pytest.fixture
def routed(tmp_path):
    """A Console over two StringIO 'terminals'; restored after the test."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, warnings.showwarning, logging.getLogger().level

    def make(verbose: bool):
        sys.stdout, sys.stderr = out, err   # here, not in the fixture: pytest's capture swaps them in between
        console = setup_console(verbose)
        console.open_file(tmp_path / "run.log")
        return console, out, err, tmp_path / "run.log"
    yield make
    for h in list(logging.getLogger().handlers):
        if type(h).__name__ == "RecordHandler":
            logging.getLogger().removeHandler(h)
    sys.stdout, sys.stderr, warnings.showwarning = saved[0], saved[1], saved[2]
    logging.getLogger().setLevel(saved[3])


def _emit_sample(early: str = "") -> None:
    print("\n".join(NOISE_LINES))
    print("\n".join(SHOWN_LINES), file=sys.stderr)
    logging.getLogger("pipeline.cli").info("stage train: starting")
    logging.getLogger("somelib.data").info("a library's INFO record")   # not ray.*: Ray may have made "ray" not propagate (an earlier test's ray.init)
    logging.getLogger("somelib").warning("a library's WARNING record")
    # a progress bar written in pieces, the way tqdm does it
    sys.stdout.write("\rLoading weights:   0%| 0/2")
    sys.stdout.write("\rLoading weights: 100%| 2/2")
    sys.stdout.write("\n")
    sys.stdout.write("step bar 1/2\r")
    sys.stdout.write("step bar 2/2\n")


def test_console_quiet_file_complete(routed):
    console, out, err, path = routed(verbose=False)
    _emit_sample()
    console.close()
    shown = out.getvalue() + err.getvalue()
    for line in NOISE_LINES:
        assert line not in shown
    for line in SHOWN_LINES:
        assert line in shown
    assert "INFO pipeline.cli: stage train: starting" in shown
    assert "a library's WARNING record" in shown
    assert "a library's INFO record" not in shown
    assert "Loading weights" not in shown
    assert "step bar 2/2" in shown
    text = path.read_text()
    assert "\x1b[" not in text   # plain text in the file
    for needle in ("Reporting training result 1", "Configuration for experiment", "a library's INFO record",
                   "domain medicine step 5", "Traceback", "(RayTrainWorker pid=3681) Loading weights: 100%",
                   "stage train: starting", "step bar 2/2"):
        assert needle in text, needle
    assert sys.stdout is out and sys.stderr is err   # close() put the streams back


def test_verbose_shows_everything(routed):
    console, out, err, path = routed(verbose=True)
    _emit_sample()
    console.close()
    shown = out.getvalue() + err.getvalue()
    for line in NOISE_LINES[:5]:
        assert line in shown
    assert "a library's INFO record" in shown


def test_lines_before_the_file_opens_are_kept(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, warnings.showwarning
    sys.stdout, sys.stderr = out, err
    try:
        console = setup_console(False)
        print("early line")
        console.open_file(tmp_path / "x.log")
        print("later line")
        console.close()
    finally:
        sys.stdout, sys.stderr, warnings.showwarning = saved
    assert (tmp_path / "x.log").read_text().splitlines() == ["early line", "later line"]


def test_warnings_are_one_line_and_library_ones_file_only():
    buf = io.StringIO()
    show_warning(FutureWarning("`x` is deprecated\nuse y"), FutureWarning,
                 "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py", 3312, file=buf)
    import pipeline.logs as logs_mod
    show_warning(UserWarning("tensor to scalar"), UserWarning, logs_mod.__file__, 7, file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0] == ("library warning: FutureWarning: `x` is deprecated use y "
                        "(transformers/modeling_utils.py:3312)")
    assert lines[1].startswith("warning: UserWarning: tensor to scalar (") and lines[1].endswith("logs.py:7)")
    assert is_noise(lines[0]) and not is_noise(lines[1])


RAY_SIGTERM_IN_WEAKREF = """\x1b[36m(_trial pid=15729)\x1b[0m Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f8>
\x1b[36m(_trial pid=15729)\x1b[0m Traceback (most recent call last):
\x1b[36m(_trial pid=15729)\x1b[0m   File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove
\x1b[36m(_trial pid=15729)\x1b[0m     def _remove(item, selfref=ref(self)):
\x1b[36m(_trial pid=15729)\x1b[0m 
\x1b[36m(_trial pid=15729)\x1b[0m   File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler
\x1b[36m(_trial pid=15729)\x1b[0m     raise_sys_exit_with_custom_error_message(
\x1b[36m(_trial pid=15729)\x1b[0m SystemExit: 1"""
OTHER_IGNORED = """(pid=7) Exception ignored in: <function Foo.__del__ at 0x7f8>
(pid=7) Traceback (most recent call last):
(pid=7)   File "/work/pipeline/train/loop.py", line 10, in __del__
(pid=7) ValueError: a real problem"""


def test_ignored_exception_from_rays_sigterm_handler_is_file_only_others_shown(routed):
    console, out, err, path = routed(verbose=False)
    print(RAY_SIGTERM_IN_WEAKREF.replace("\n", "\n(pid=9) interleaved line from another worker\n", 1))
    print(OTHER_IGNORED)
    console.close()
    shown = out.getvalue()
    assert "sigterm_handler" not in shown and "SystemExit" not in shown
    assert "(pid=9) interleaved line from another worker" in shown
    assert OTHER_IGNORED in shown
    assert "in sigterm_handler" in path.read_text() and "SystemExit: 1" in path.read_text()


def test_settle_waits_for_late_worker_lines_then_returns(routed):
    """A failed worker's traceback that Ray forwards after the trial ended is printed before the summary."""
    import threading
    import time
    console, out, err, _ = routed(verbose=False)

    def late_traceback() -> None:
        for i in range(3):
            time.sleep(0.3)
            print(f"\x1b[36m(RayTrainWorker pid=7)\x1b[0m RuntimeError: late line {i}", file=sys.stderr)

    t = threading.Thread(target=late_traceback)
    t0 = time.monotonic()
    t.start()
    console.settle_workers(quiet_s=0.6, limit_s=5.0)
    waited = time.monotonic() - t0
    print("error: 1 of 4 domain(s) did not finish:", file=sys.stderr)
    t.join()
    console.close()
    lines = err.getvalue().splitlines()
    assert "late line 2" in lines[-2] and lines[-1].startswith("error:"), lines
    assert 1.4 <= waited < 4.5, waited   # the last line came at ~0.9 s; the limit (5 s) was not reached
    t0 = time.monotonic()
    console.settle_workers(quiet_s=0.2, limit_s=5.0)   # nothing arriving: returns after quiet_s
    assert time.monotonic() - t0 < 1.0


def test_a_log_file_on_a_full_disk_is_dropped_with_one_warning_and_the_console_goes_on():
    """/dev/full: every write fails with ENOSPC, as on a full disk (issue 23, item 6; was: the console's
    own writes raised, and the run ended in 'lost sys.stderr')."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, warnings.showwarning, logging.getLogger().level
    sys.stdout, sys.stderr = out, err
    try:
        console = setup_console(False)
        console.open_file(Path("/dev/full"))
        logging.getLogger("pipeline.cli").info("stage train: starting")
        print("a line after it", file=sys.stderr)
        logging.getLogger("pipeline.cli").error("a failed domain")
        console.close()
    finally:
        for h in list(logging.getLogger().handlers):
            if type(h).__name__ == "RecordHandler":
                logging.getLogger().removeHandler(h)
        sys.stdout, sys.stderr, warnings.showwarning = saved[0], saved[1], saved[2]
        logging.getLogger().setLevel(saved[3])
    shown = out.getvalue() + err.getvalue()
    assert "stage train: starting" in shown and "a line after it" in shown and "a failed domain" in shown
    warned = [ln for ln in shown.splitlines() if "can no longer be written" in ln]
    assert len(warned) == 1 and "No space left on device" in warned[0], shown


def test_worker_prefix_left_out_of_the_pipelines_own_records_on_the_console(routed):
    """A pipeline log record from a Ray worker names its domain itself: the console shows it without Ray's
    "(RayTrainWorker pid=..)" prefix; the file keeps the prefix, and a worker's traceback keeps it."""
    console, out, err, path = routed(verbose=False)
    record = "2026-12-01 09:58:19,592 INFO pipeline.train.loop: domain medicine step 10/40 loss 1.2"
    print(f"\x1b[36m(RayTrainWorker pid=2904)\x1b[0m {record}")
    print("\x1b[36m(RayTrainWorker pid=2904)\x1b[0m ValueError: a real problem")
    console.close()
    shown = out.getvalue().splitlines()
    assert record in shown
    assert "(RayTrainWorker pid=2904) ValueError: a real problem" in [ANSI.sub("", x) for x in shown]
    assert f"(RayTrainWorker pid=2904) {record}" in path.read_text()
