"""A store that errs, drops connections mid-body or returns altered bytes: retried, or one clear error;
never a silently short or wrong batch (a real proxy on 127.0.0.1 in front of the real S3 server)."""
from __future__ import annotations

import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.train.loader import LayerReader, TokenStream
from tests.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.slow  # a real S3 server starts (~15 s)


@pytest.fixture(scope="module")
def remote(s3):
    rng = np.random.default_rng(3)
    acts = {0: rng.standard_normal((6000, 32)).astype(np.float32)}
    url = f"s3://{s3.bucket()}/flaky"
    write_cache_from_arrays(url, acts, seq_starts=np.arange(0, 6001, 300), chunk_tokens=500,
                            options={"endpoint": s3.endpoint})
    proxy = FlakyProxy(s3.endpoint)
    yield url, acts[0], proxy
    proxy.close()


def _stream(url: str, proxy: FlakyProxy) -> TokenStream:
    cache = ActivationCache.open(url, options={"endpoint": proxy.endpoint, "timeout": "10s"})
    return TokenStream({0: LayerReader(cache, 0, 1.0)}, 6000)


@pytest.mark.parametrize("mode", ["error", "drop", "corrupt"])
def test_transient_faults_are_retried(remote, mode):
    url, x, proxy = remote
    proxy.set(mode, 3)
    got = _stream(url, proxy).read(0, 6000)[0]
    assert proxy.spoiled == 3
    assert np.array_equal(got, x)


@pytest.mark.parametrize("mode, message", [("error", "read failed after 4 tries"),
                                           ("drop", "read failed after 4 tries"),
                                           ("corrupt", "checksum mismatch")])
def test_persistent_faults_end_with_one_line_naming_the_chunk(remote, mode, message):
    url, x, proxy = remote
    proxy.set(mode, -1)
    try:
        with pytest.raises(CacheError) as info:
            _stream(url, proxy).read(0, 1000)
    finally:
        proxy.set("pass", 0)
    text = str(info.value)
    assert message in text and "acts/layer_0/c/0/0" in text and "\n" not in text
