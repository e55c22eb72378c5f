"""Issue 23.4: secrets never printed, stored or shipped. One redaction (pipeline.redaction) on every
console and log-file line, the stored command line of each stage (runs/<run>/stages/*.json), the Ctrl-C
resume hint (the same string), and what jobs/submit.py prints and sends. In-process; no Ray started."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.redaction import redact_args

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
KEY, SECRET, TOKEN = "AKIAEXAMPLEKEY77", "wJalrXUtnFEMIsecret99", "tok3nNEVERshown42"


def _all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_credentials_in_an_s3_output_uri_are_never_printed(capsys, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    rc = main(["report", "--config", DEMO, "--output", f"s3://{KEY}:{SECRET}@bucket/prefix"])
    cap = capsys.readouterr()
    assert rc != 0
    assert "holds credentials: remove them from the URI" in cap.err and "s3://***@bucket/prefix" in cap.err
    assert rc == 2   # a malformed output URI is a usage error (pipeline.uris)
    assert SECRET not in cap.out + cap.err and KEY not in cap.out + cap.err


def test_a_custom_source_url_with_a_token_is_masked_in_config_errors(capsys, tmp_path):
    src = f"{{name: mine, domain: debate, path: 'https://user:{TOKEN}@example.com/x.csv', format: csv}}"
    rc = main(["prepare", "--config", DEMO, "--output", str(tmp_path / "o"), "--set", f"data.custom_sources=[{src}]"])
    cap = capsys.readouterr()
    assert rc == 2 and "https://***@example.com/x.csv" in cap.err
    assert TOKEN not in cap.out + cap.err


def test_stored_command_lines_and_the_log_file_hold_no_secret(capsys, tmp_path):
    """--set values with URL secrets: runs/<run>/stages/*.json (in the bucket on S3), the log file and the
    console get them masked; the stage still runs with the real value."""
    out = tmp_path / "o"
    rc = main(["report", "--config", DEMO, "--output", str(out),
               "--set", f"data.download.ddo_debates_url=https://user:{TOKEN}@drive.example/f?token={TOKEN}x",
               "--set", f"storage.endpoint_url=http://{KEY}:{SECRET}@127.0.0.1:1"])
    cap = capsys.readouterr()
    rec = json.loads((out / "runs/demo/stages/report.json").read_text())
    assert "https://***@drive.example/f?token=***" in rec["command"], rec["command"]
    assert "storage.endpoint_url=http://***@127.0.0.1:1" in rec["command"]
    seen = cap.out + cap.err + _all_text(out)
    for s in (TOKEN, SECRET, KEY):
        assert s not in seen
    assert rc in (0, 1)


def test_redact_args_masks_credential_keys_only():
    assert redact_args(["--set", "storage.aws_secret_access_key=abc", "--set", "train.tokens_per_micro_batch=4096",
                        "--max-new-tokens", "256", "--set", "hf_token=xyz", "--address", "http://u:pw@head:8265"]) == [
        "--set", "storage.aws_secret_access_key=***", "--set", "train.tokens_per_micro_batch=4096",
        "--max-new-tokens", "256", "--set", "hf_token=***", "--address", "http://***@head:8265"]


# ---- jobs/submit.py ------------------------------------------------------------------------------

def _submit_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text("raytoken-0123456789abcdef")
    return {"HOME": str(home), "PATH": "/usr/bin:/bin"}


def test_submit_never_prints_address_credentials(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--config", "configs/demo.yaml", "--output",
                        str(tmp_path / "o"), "--address", f"http://user:{SECRET}@127.0.0.1:8265", "--dry-run"],
                       cwd=str(ROOT), env=_submit_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert json.loads(r.stdout)["address"] == "http://***@127.0.0.1:8265"
    bad = subprocess.run([sys.executable, "-m", "jobs.submit", "--config", "configs/demo.yaml",
                          "--address", f"user:{SECRET}@127.0.0.1:8265", "--dry-run"],
                         cwd=str(ROOT), env=_submit_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and SECRET not in bad.stdout + bad.stderr


def test_submit_refuses_a_credential_in_the_entrypoint(tmp_path):
    from jobs import submit as js
    args = argparse.Namespace(config=DEMO, output=str(tmp_path / "o"), raw_dir=None, domains=None, stage="run",
                              address="http://127.0.0.1:8265", job_name=None, submission_id=None, env=[],
                              entrypoint_num_cpus=None, working_dir=str(ROOT), no_wait=False, dry_run=True,
                              set=[f"data.download.ddo_debates_url=https://user:{TOKEN}@drive.example/f"])
    with pytest.raises(js.SubmitError) as e:
        js.build(args, environ=_submit_env(tmp_path))
    assert "credential" in str(e.value) and TOKEN not in str(e.value)
    args.set = ["train.max_steps=3"]
    assert "train.max_steps=3" in js.build(args, environ=_submit_env(tmp_path))["entrypoint"]


def test_the_job_package_ray_builds_ships_no_keys_tokens_env_files_venvs_or_outputs(tmp_path):
    """Issue 23.5: the files of the package Ray's own packager builds from the submit's runtime_env."""
    import os
    from jobs import submit as js
    from pipeline.ownership import OUTPUT_MARKER
    wd = tmp_path / "checkout"
    secret_files = [".ssh/id_rsa", "deploy.key", "tls/server.pem", ".env", ".envrc", ".huggingface/token",
                    ".kube/config", "kubeconfig", "ops/prod.kubeconfig", ".aws/credentials", "sub/.venv/bin/python",
                    "venv/pyvenv.cfg", "output/demo/adapters/x.safetensors", "raw/debatesum/a.csv",
                    "results/run1/adapters/a.bin", f"results/run1/{OUTPUT_MARKER}", ".git/config"]
    shipped = ["pipeline/cli.py", "configs/demo.yaml", "fixtures/raw/iam/claims.txt", "README.md"]
    for rel in secret_files + shipped:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("x")
    facts = js.package_facts(js.runtime_env(wd, [], {}))
    assert facts["names"] == sorted(shipped), facts["names"]
    (wd / "pipeline" / "weights.bin").write_bytes(os.urandom(2 * 2**20))
    facts = js.package_facts(js.runtime_env(wd, [], {}))
    assert facts["files"] == len(shipped) + 1 and facts["bytes"] > 2 * 2**20
    with pytest.raises(js.SubmitError, match=r"over the 1 MB limit; largest: pipeline/weights.bin \(2.0 MB\)"):
        js.check_package(facts, limit_mb=1)


def test_submit_prints_the_package_size_and_file_count(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--config", "configs/demo.yaml", "--output",
                        str(tmp_path / "o"), "--dry-run"], cwd=str(ROOT), env=_submit_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "working_dir package: " in r.stderr and " MB, " in r.stderr and " files (from " in r.stderr


def test_errors_stored_in_state_files_are_scrubbed(tmp_path):
    """A domain's or a stage's error (stored in the output, in the bucket on S3) never holds a URL secret."""
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_train import tiny_config
    from pipeline.status import StageRecord
    from pipeline.storage import Store
    from pipeline.train.schedule import write_state
    store = Store(str(tmp_path))
    cfg = tiny_config(str(tmp_path))
    write_state(store, cfg, "debate", "failed", error=f"GET https://user:{TOKEN}@host/x failed")
    with pytest.raises(RuntimeError):
        with StageRecord(store, "t", "train", "adapters train"):
            raise RuntimeError(f"s3://{KEY}:{SECRET}@bucket/x unreachable")
    text = _all_text(tmp_path)
    assert "https://***@host/x" in text and "s3://***@bucket/x" in text
    assert TOKEN not in text and SECRET not in text and KEY not in text


def test_a_set_secret_is_masked_in_the_process_list_and_in_the_entrypoint_ray_records():
    """`ps` (every user of the machine) and the job table's entrypoint (ray.init takes it from
    ray._private.utils.get_entrypoint_name, which pipeline.raycluster points at masked_command_line)."""
    code = ("import json, sys; from pipeline.redaction import mask_process_title, masked_command_line; "
            "changed = mask_process_title(); "
            "print(json.dumps([changed, open('/proc/self/cmdline', 'rb').read().decode(), masked_command_line()]))")
    url = f"data.download.ddo_debates_url=https://user:{TOKEN}@drive.example/f?token={SECRET}"
    r = subprocess.run([sys.executable, "-c", code, "train", "--set", url], capture_output=True, text=True, timeout=60)
    changed, proc, entry = json.loads(r.stdout.strip().splitlines()[-1])
    assert changed and TOKEN not in proc and SECRET not in proc, proc
    assert "--set 'data.download.ddo_debates_url=https://***@drive.example/f?token=***'" in proc
    assert entry.endswith("train --set 'data.download.ddo_debates_url=https://***@drive.example/f?token=***'"), entry
    plain = subprocess.run([sys.executable, "-c", code, "train", "--set", "train.max_steps=5"],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(plain.stdout.strip().splitlines()[-1])[0] is False   # nothing to hide: the title stays
