"""A SIGTERM that arrives during ray.init reaches the CLI's handler even when Ray's own handler's SystemExit is
swallowed (seen under load: raised inside logging's at-fork hook, "Exception ignored in _releaseLock", and the
run went on as if nothing had come). ray.init is replaced by a stand-in that installs a Ray-like handler and
swallows its exception, as that hook does; the real one is exercised by tests/integration/test_lifecycle.py."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray

from pipeline import raycluster


class Interrupted(Exception):
    pass


def _cli_handler(signum, frame):
    raise Interrupted(signum)


def _init_that_loses_the_signal(**kw):
    def ray_handler(signum, frame):          # what ray.init installs: sys.exit(signum)
        sys.exit(signum)
    signal.signal(signal.SIGTERM, ray_handler)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)                      # the handler runs here ...
    except SystemExit:
        pass                                 # ... and its exception is lost, as in an at-fork hook
    return "ctx"


def test_a_sigterm_lost_during_ray_init_still_reaches_the_cli_handler(monkeypatch):
    monkeypatch.setattr(ray, "init", _init_that_loses_the_signal)
    old = signal.signal(signal.SIGTERM, _cli_handler)
    try:
        with pytest.raises(Interrupted):
            raycluster._init_keeping_signal_handlers(address="local")
        assert signal.getsignal(signal.SIGTERM) is _cli_handler      # the CLI's handler is back in place
    finally:
        signal.signal(signal.SIGTERM, old)


def test_no_signal_no_call(monkeypatch):
    monkeypatch.setattr(ray, "init", lambda **kw: "ctx")
    old = signal.signal(signal.SIGTERM, _cli_handler)
    try:
        assert raycluster._init_keeping_signal_handlers(address="local") == "ctx"
    finally:
        signal.signal(signal.SIGTERM, old)
