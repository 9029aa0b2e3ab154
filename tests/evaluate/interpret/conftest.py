"""Fixtures for the interpretability tests: small real caches and hand-made SAEs with known values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fast_sae.actcache import Role
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.lm import EMBEDDED_MODEL, load_tokenizer
from fast_sae.saeio import save_sae

D_MODEL, D_SAE = 16, 24


def make_sae(folder: Path, seed: int = 0, d_in: int = D_MODEL, d_sae: int = D_SAE, layer: int = 2) -> Path:
    """A standard (ReLU) SAE with random weights and negative encoder bias, so features are sparse."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    weights = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": torch.full((d_sae,), -1.0), "b_dec": torch.zeros(d_in)}
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "hook_name": f"blocks.{layer}.hook_resid_post",
           "hook_layer": layer, "model_name": "synthetic"}
    return save_sae(folder, weights, cfg)


def random_stream(seed: int = 0, n_seqs: int = 40, d: int = D_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """Activations and sequence starts with varied sequence lengths (some longer than a chunk)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 180, size=n_seqs)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    acts = rng.standard_normal((int(starts[-1]), d)).astype(np.float32)
    return acts, starts


@pytest.fixture()
def synthetic(tmp_path, embedded_model):
    """(sae_dir, cache_path, acts, starts): a random real cache (chunk 128 tokens) and a random SAE."""
    acts, starts = random_stream()
    rng = np.random.default_rng(1)
    ids = rng.integers(200, 5000, size=len(acts))
    ids[10] = 1  # <|im_start|>, to see special tokens rendered and escaped
    cache = write_cache_from_arrays(tmp_path / "cache", {2: acts}, seq_starts=starts, token_ids=ids,
                                    roles=np.full(len(acts), int(Role.USER)), chunk_tokens=128,
                                    tokenizer=embedded_model[1])
    sae = make_sae(tmp_path / "sae")
    return sae, cache, acts, starts


class ChatServer:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 (an ephemeral port) answering from a script.

    ``replies`` is consumed in order (the last one repeats); an int entry answers with that HTTP
    error status, a bytes entry is sent as the raw body. It serves at most ``max_requests`` requests
    and stops by itself after
    ``idle_timeout`` seconds without one, so a failing test can never leave it running.
    """

    def __init__(self, replies: list, max_requests: int = 50, idle_timeout: float = 20.0) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer

        self.replies, self.requests = list(replies), []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server_self.requests.append({"path": self.path, "body": body,
                                             "auth": self.headers.get("Authorization")})
                i = min(len(server_self.requests), len(server_self.replies)) - 1
                reply = server_self.replies[i]
                if isinstance(reply, int):
                    data, status = b'{"error": "scripted failure"}', reply
                elif isinstance(reply, bytes):  # a raw (possibly broken) response body
                    data, status = reply, 200
                else:
                    data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}]}).encode()
                    status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = idle_timeout
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._stop = False

        def serve():
            for _ in range(max_requests):
                if self._stop:
                    break
                before = len(self.requests)
                self.server.handle_request()
                if len(self.requests) == before:  # timed out idle (or a stray connection)
                    break
            self.server.server_close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import urllib.request

        self._stop = True
        if self.thread.is_alive():  # wake handle_request so the loop sees _stop
            try:
                urllib.request.urlopen(urllib.request.Request(self.url + "/chat/completions", data=b"{}",
                                                              method="POST"), timeout=2).read()
            except Exception:
                pass
        self.thread.join(timeout=5)


@pytest.fixture()
def chat_server():
    servers = []

    def start(replies, **kw):
        servers.append(ChatServer(replies, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


SENTENCES = ["The cat sat on the mat near the window.", "Please write a poem about the sea and the moon.",
             "Water boils at one hundred degrees.", "My garden has tomatoes, beans and a small apple tree.",
             "Explain how a bicycle works in simple words.", "The train leaves the station at noon every day.",
             "Music helps people relax after work.", "Paris is the capital city of France."]
CHAT_PREFIX = "You are a helpful assistant."


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory):
    """60 real-token conversations (embedded tokenizer): a shared system prefix, a user turn, an assistant turn."""
    tok = load_tokenizer(EMBEDDED_MODEL)
    rng = np.random.default_rng(0)
    ids, roles, starts, docs = [], [], [0], []
    prefix = tok(CHAT_PREFIX, add_special_tokens=False)["input_ids"]
    for d in range(60):
        seq = [(1, Role.SPECIAL)] + [(t, Role.DEFAULT_SYSTEM) for t in prefix]
        for role in (Role.USER, Role.ASSISTANT):
            text = " ".join(rng.choice(SENTENCES, size=2, replace=False))
            seq += [(2, Role.SPECIAL)] + [(t, role) for t in tok(text, add_special_tokens=False)["input_ids"]]
        ids += [t for t, _ in seq]
        roles += [int(r) for _, r in seq]
        docs += [d] * len(seq)
        starts.append(len(ids))
    acts = np.random.default_rng(1).standard_normal((len(ids), 8)).astype(np.float32)
    path = write_cache_from_arrays(tmp_path_factory.mktemp("cal") / "cache", {1: acts}, seq_starts=starts,
                                   token_ids=ids, roles=roles, doc_ids=docs, chunk_tokens=256, tokenizer=tok,
                                   regime="fast", model_id=EMBEDDED_MODEL)
    return path, acts
