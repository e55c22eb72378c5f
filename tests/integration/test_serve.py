"""`adapters serve` on the demo's output (tests/fixtures_demo.py): the real HTTP endpoint on a local Ray
Serve, called with the `openai` client. Each domain answers with its own adapter: with greedy decoding
the answers equal `adapters generate`'s, also when requests for different adapters share one batch."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures_demo import ROOT, Run

pytestmark = pytest.mark.slow

PROMPTS = ["Should the resolution be adopted?", "Which dose fits a patient with fever?"]
TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_each_domain_with_its_own_adapter(demo_run, tmp_path: Path):
    import openai
    out, _ = demo_run
    # test_lifecycle shares this output and leaves some domains not finished (a run killed mid-training, a
    # Ctrl-C in prepare): the demo's own command brings every domain back (it trains only what is not finished)
    again = Run(tmp_path, "run", "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(out), name="restore")
    assert again.wait(timeout=1200) == 0, again.text()[-3000:]
    ref_file = tmp_path / "ref.jsonl"
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "--output", str(out), "--base",
                        "--domain", "debate,medicine,ecology", "--max-new-tokens", str(TOKENS),
                        "--out-file", str(ref_file), *PROMPTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = {(x["model"], x["prompt"]): x["output"] for x in map(json.loads, ref_file.read_text().splitlines())}
    assert len(set(ref.values())) > 1   # the adapters do answer differently: the comparison below can tell them apart

    port = _free_port()
    srv = Run(tmp_path, "serve", "--output", str(out), "--port", str(port), "--batch-wait-ms", "3000", name="serve")
    try:
        srv.wait_until(lambda: "serving base, " in srv.text(), 420, "the serving line")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["base", "debate", "ecology", "education", "medicine"]

        def ask(model: str, prompt: str):
            return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=TOKENS, temperature=0)

        # one request before the ready line's HTTP proxy is warm can be slow: the batch test follows it
        first = ask("debate", PROMPTS[0])
        assert first.choices[0].message.content == ref[("debate", PROMPTS[0])]
        asks = [("debate", PROMPTS[0]), ("medicine", PROMPTS[0]), ("base", PROMPTS[1]), ("ecology", PROMPTS[1])]
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(lambda a: ask(*a), asks))
        for (model, prompt), a in zip(asks, answers):
            assert a.model == model
            assert a.choices[0].message.content == ref[(model, prompt)], (model, prompt)
            assert a.usage.completion_tokens > 0 and a.usage.prompt_tokens > 0
        batches = [a.model_extra["batch_models"] for a in answers]
        assert any(len(set(b)) >= 2 for b in batches), batches   # different adapters in one generate() call

        with pytest.raises(openai.NotFoundError, match="not served here"):
            ask("law", PROMPTS[0])
        with pytest.raises(openai.BadRequestError, match="greedily"):
            client.chat.completions.create(model="debate", messages=[{"role": "user", "content": "x"}], temperature=0.7)
    finally:
        srv.proc.send_signal(signal.SIGINT)
        rc = srv.wait(timeout=120)
    assert rc == 130, srv.text()[-3000:]
    assert srv.left_after(30) == []
