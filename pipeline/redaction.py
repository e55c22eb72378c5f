"""Secrets out of text: the one redaction helper for everything the pipeline logs or writes.

    is_secret_name(name)     whether an environment variable's name says it holds a credential
    redact_url(url)          a URL with its user:password part and secret query values masked
    scrub(text, environ)     any text: credential values taken from the environment (by value), URLs
                             inside it as redact_url does, Hugging Face tokens (hf_...)
    redact_args(argv)        a command line to show or store: each argument scrubbed, and the value of a
                             ``key=value`` (``--set``) whose key names a credential masked
    masked_command_line()    this process's own command line, as redact_args shows it
    mask_process_title()     that command line in the process list (`ps`, /proc), when the real one holds a secret

Callers: logs.Console (every console and log-file line), cli (error lines, the resume hint, the stage
records' command, the process title), raycluster (the command line ray.init records as the job's entrypoint), jobs/submit.py (the job's entrypoint and metadata, the --address shown), config.Config.redacted (URLs in the config), storage (endpoints in messages), download
(URLs and errors in logs and manifests), report (every file it writes); is_secret_name: jobs/submit.py
(it refuses, rather than masks, a credential in a job's runtime_env) and train/schedule.py (keeps
credentials out of what Ray Tune copies into its trials).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from typing import Mapping, Optional

MASK = "***"
# environment variables whose values are credentials: masked wherever they appear, by value
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "RAY_AUTH_TOKEN", "GITHUB_TOKEN", "WANDB_API_KEY",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary words

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|ACCESS_KEY|PRIVATE|AUTH|API_KEY|SESSION", re.I)
# a config key or option that holds a credential: its name ends so (not "tokens_per_micro_batch", "max_new_tokens")
_SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|credentials?|access_key|secret_key|api_key|auth)$", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s\"'<>]+@")
_SECRET_PARAM = re.compile(r"([?&](?:token|key|signature|sig|access_token|X-Amz-[A-Za-z-]+)=)[^&#\s\"'<>]+", re.I)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{10,}")


def is_secret_name(name: str) -> bool:
    """``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ``AWS_SESSION_TOKEN`` ... -> True."""
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """``https://user:pw@host/x?token=abc`` -> ``https://***@host/x?token=***`` (also inside longer text)."""
    url = _USERINFO.sub(MASK + "@", str(url))
    return _SECRET_PARAM.sub(r"\1" + MASK, url)


def scrub(text: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """Text with credential values (from ``environ``, default os.environ), URL secrets and HF tokens masked."""
    env = os.environ if environ is None else environ
    text = str(text)
    for name in SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= _MIN_SECRET_LEN:
            text = text.replace(value, MASK).replace(json.dumps(value)[1:-1], MASK)
    return _HF_TOKEN.sub("hf_" + MASK, redact_url(text))


def redact_args(argv: "list[str]", environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """``["--set", "storage.aws_secret_access_key=abc", "--address", "http://u:p@h"]`` ->
    ``["--set", "storage.aws_secret_access_key=***", "--address", "http://***@h"]``."""
    out: list[str] = []
    for a in map(str, argv):
        key, eq, _ = a.partition("=")
        if eq and _SECRET_KEY.search(key.lstrip("-").rsplit(".", 1)[-1].replace("-", "_")):
            out.append(f"{key}={MASK}")
        else:
            out.append(scrub(a, environ))
    return out


def _own_argv() -> list[str]:
    """This process's command line as it was started (the interpreter's own, where Python keeps it)."""
    return list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def masked_command_line() -> str:
    """This process's command line (the interpreter's, as it was started) with its secrets masked. Ray
    records a driver's command line as its job's entrypoint (the dashboard's Jobs page, ``ray list jobs``):
    pipeline.raycluster gives Ray this one instead."""
    return shlex.join(redact_args(_own_argv()))


def mask_process_title() -> bool:
    """Put masked_command_line() in the process list (``ps``, /proc/<pid>/cmdline: readable by every user of
    the machine) when the real command line holds a secret, e.g. a token in a ``--set`` URL. Ray's own
    setproctitle does it (the one Ray names its workers with); without Ray it is left as it is. True when
    the title was changed."""
    argv = _own_argv()
    if redact_args(argv) == list(map(str, argv)):
        return False
    try:
        from ray._raylet import setproctitle
    except ImportError:
        return False
    setproctitle(masked_command_line())
    return True
