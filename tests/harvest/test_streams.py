import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, Role
from fast_sae.harvest.data import EMBEDDED_CHAT, DataSource, Fingerprint, iter_conversations
from fast_sae.harvest.render import template_info
from fast_sae.harvest.streams import StreamError, block_stream, chat_pieces, fast_stream


def _check_positions(cache):
    starts = cache.seq_starts()
    pos = cache.positions()
    seq = cache.sequence_of_token()
    assert np.array_equal(pos, np.arange(len(pos)) - starts[seq])


def test_fast_never_crosses_a_sample_boundary(fast_cache):
    c = ActivationCache.open(fast_cache)
    starts, docs = c.seq_starts(), c.doc_ids()
    _check_positions(c)
    for s in range(c.meta.n_sequences):
        assert len(set(docs[starts[s]:starts[s + 1]])) == 1
    # one sequence per sample, in dataset order
    first_docs = docs[starts[:-1]]
    assert np.all(np.diff(first_docs) >= 1)
    im_start = c.tokenizer().convert_tokens_to_ids("<|im_start|>")
    assert np.all(c.token_ids()[starts[:-1]] == im_start)  # every sequence starts with the template
    assert c.meta.regime == "fast" and c.meta.chat_template_hash


def test_bt_f_blocks_cross_samples(btf_cache):
    c = ActivationCache.open(btf_cache)
    starts, docs = c.seq_starts(), c.doc_ids()
    assert set(np.diff(starts)) == {c.meta.context_size}
    assert any(len(set(docs[starts[s]:starts[s + 1]])) > 1 for s in range(c.meta.n_sequences))
    _check_positions(c)
    assert (c.roles() == Role.SPECIAL).any()


def test_bt_p_is_plain_text_blocks(btp_cache):
    c = ActivationCache.open(btp_cache)
    assert set(np.diff(c.seq_starts())) == {c.meta.context_size}
    assert set(np.unique(c.roles())) == {int(Role.TEXT)}
    assert c.meta.dataset == "embedded:python-docs"


def test_fast_truncates_and_respects_budget(embedded_model):
    _, tok = embedded_model
    info = template_info(tok, "embedded", True)
    convs = list(iter_conversations(DataSource(EMBEDDED_CHAT, limit=30)))
    s = fast_stream(chat_pieces(convs, tok, info, Fingerprint()), context_size=16, max_tokens=200)
    lengths = np.diff(s.seq_starts)
    assert lengths.max() <= 16 and s.seq_starts[-1] <= 200
    b = block_stream(chat_pieces(convs, tok, info, Fingerprint()), 64, 200, separator_id=tok.eos_token_id)
    assert len(b.ids) == 192 and (b.roles == Role.SEPARATOR).sum() >= 1
    with pytest.raises(StreamError, match="fewer than one block"):
        block_stream(chat_pieces(convs[:1], tok, info, Fingerprint()), 4096, None)
