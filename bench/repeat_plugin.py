"""pytest plugin for bench/sigkill_under_load.sh, as pytest-repeat would do it plus a CPU load:

    -p bench.repeat_plugin --repeat N [--repeat-match SUBSTRING] [--busy]

runs each selected test whose name contains SUBSTRING (default: every one) N times in one session (the
session's demo run is shared); --busy keeps every CPU busy with a shell busy loop while each of those
runs, as on a loaded CI machine."""
import os
import signal
import subprocess

import pytest


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1, help="run each matching test this many times")
    parser.addoption("--repeat-match", default="", help="repeat only tests whose name contains this")
    parser.addoption("--busy", action="store_true", help="every CPU busy while a repeated test runs")


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("repeat")
    if n > 1 and metafunc.config.getoption("repeat_match") in metafunc.function.__name__:
        metafunc.fixturenames.append("repeat_index")
        metafunc.parametrize("repeat_index", range(1, n + 1))


@pytest.fixture(autouse=True)
def _busy_cpus(request):
    if not (request.config.getoption("busy") and "repeat_index" in request.fixturenames):
        yield
        return
    loops = [subprocess.Popen(["bash", "-c", "while :; do :; done"], start_new_session=True)
             for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in loops:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
