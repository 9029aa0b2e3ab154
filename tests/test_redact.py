"""No credential given on the command line leaves the process: not in a report, a run folder, a cache,
an error message or a progress line (fast_sae/redact.py). The CLI runs as real subprocesses against
the real S3 server (SeaweedFS on 127.0.0.1), with its secret given in --storage-option and inside an
endpoint URL; everything they write and print is searched for it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_sae.actcache.copy import copy_cache
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.redact import MASK, redact_argv, redact_text, redact_url, remember_options
from tests.evaluate.helpers import save_pca_sae
from tests.helpers import ROOT, TRAIN_RUNNER, train_env
from tests.s3server import ACCESS_KEY, SECRET_KEY

URL_SECRET = "url-borne-secret-77d1"


def test_redaction_rules():
    assert redact_url("http://alice:pw12345@host:9/p?x=1") == f"http://{MASK}@host:9/p?x=1"
    assert redact_url("https://h/b?sig=abcdef&se=2030") == f"https://h/b?sig={MASK}&se=2030"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    argv = ["pipeline.py", "evaluate", "--storage-option", "endpoint=http://u:p4ssw0rd@h:1,secret_access_key=s3cr3t!",
            "--storage-option=aws_session_token=tok-123,region=eu", "--eval-cache", "http://bob:hunter22@h/c"]
    shown = " ".join(redact_argv(argv))
    for secret in ("p4ssw0rd", "s3cr3t!", "tok-123", "hunter22"):
        assert secret not in shown
    assert "region=eu" in shown and "endpoint=http://***@h:1" in shown
    remember_options({"password": "zz-remembered-zz", "skip_signature": "true"})
    assert redact_text("store said: bad password zz-remembered-zz, true") == f"store said: bad password {MASK}, true"


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _assert_no_secret(folders: list[Path], procs: list[subprocess.CompletedProcess]) -> int:
    """Search every file under ``folders`` and every output; returns how many files were searched."""
    n = 0
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                n += 1
                for secret in (SECRET_KEY, URL_SECRET):
                    assert secret.encode() not in data, f"{secret} written into {f}"
    for p in procs:
        for secret in (SECRET_KEY, URL_SECRET):
            assert secret not in p.stdout + p.stderr, f"{secret} printed by {p.args[2:4]}:\n{p.stdout}\n{p.stderr}"
    return n


@pytest.mark.slow  # a real S3 server and five CLI subprocesses (~60 s on an idle machine)
def test_no_secret_from_the_command_line_is_written_or_printed(s3, tmp_path):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 16))).astype(np.float32)
    local = tmp_path / "cache"
    write_cache_from_arrays(local, {3: x}, seq_starts=np.arange(0, 3001, 100), chunk_tokens=500)
    bucket = s3.bucket()
    url = f"s3://{bucket}/c"
    copy_cache(local, url, options={"endpoint": s3.endpoint})
    sae = save_pca_sae(tmp_path / "sae", x[:2000], 3, 6, model_name="synthetic")
    # the credentials only on the command line: none in the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_REGION"] = "us-east-1"
    creds = f"endpoint={s3.endpoint},access_key_id={ACCESS_KEY},secret_access_key={SECRET_KEY}"
    out, run, back = tmp_path / "eval", tmp_path / "run", tmp_path / "back"
    procs = [
        _cli("evaluate", "--sae", str(sae), "--eval-cache", url, "--out", str(out), "--no-downstream",
             "--eval-range", "20:30", "--storage-option", creds, env=env),
        _cli("cache", "copy", url, str(back), "--storage-option", creds, env=env),
        subprocess.run([sys.executable, "-c", TRAIN_RUNNER, url, "--out", str(run), "--layers", "3",
                        "--architectures", "topk", "--k", "4", "--expansion-factors", "2", "--tokens", "2000",
                        "--batch-tokens", "100", "--buffer-tokens", "500", "--eval-sequences", "5",
                        "--storage-option", creds], env={**train_env(), **env}, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL),
    ]
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    _assert_no_secret([out, run, back], procs)
    assert MASK in (out / "report.json").read_text()  # the command is recorded, its secret hidden
    # credentials inside an endpoint URL, and a failing request: the error names the store, not the secret
    host = s3.endpoint.split("://", 1)[1]
    bad = [_cli("info", url, "--storage-option", f"endpoint=http://{ACCESS_KEY}:{URL_SECRET}@{host},"
                f"access_key_id={ACCESS_KEY},secret_access_key={URL_SECRET}", env=env),
           _cli("info", f"http://{ACCESS_KEY}:{URL_SECRET}@{host}/{bucket}/none", env=env)]
    for p in bad:
        assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.startswith("Error: "), p.stderr
    assert _assert_no_secret([out, run, back], procs + bad) > 10
