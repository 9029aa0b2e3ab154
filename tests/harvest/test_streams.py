import numpy as np
import pytest

from fast_sae.actcache import ActivationCache, Role
from fast_sae.harvest.data import EMBEDDED_CHAT, DataSource, Fingerprint, iter_conversations
from fast_sae.harvest.render import template_info
from fast_sae.harvest.streams import DocSelection, StreamError, block_stream, chat_pieces, fast_stream


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


@pytest.mark.slow
def test_bt_f_blocks_cross_samples(btf_cache):
    c = ActivationCache.open(btf_cache)
    starts, docs = c.seq_starts(), c.doc_ids()
    assert set(np.diff(starts)) == {c.meta.context_size}
    assert any(len(set(docs[starts[s]:starts[s + 1]])) > 1 for s in range(c.meta.n_sequences))
    _check_positions(c)
    assert (c.roles() == Role.SPECIAL).any()


@pytest.mark.slow
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


# ------------------------------------------------------------------ held-out document selection
def test_doc_selection_is_seeded_deterministic_and_disjoint():
    ids = range(20000)
    held = {i for i in ids if DocSelection("holdout", 0.1, 7).keep(i)}
    train = {i for i in ids if DocSelection("train", 0.1, 7).keep(i)}
    assert held.isdisjoint(train) and held | train == set(ids)
    assert abs(len(held) / 20000 - 0.1) < 0.01  # a random sample of the requested share
    assert held == {i for i in ids if DocSelection("holdout", 0.1, 7).keep(i)}  # deterministic
    assert held != {i for i in ids if DocSelection("holdout", 0.1, 8).keep(i)}  # the seed matters
    assert len(held & set(range(1000))) not in (0, 1000)  # spread over the dataset, not a block at its end
    assert all(DocSelection("all", 0.1, 7).keep(i) for i in ids)
    for docs, fraction in (("holdout", 0.0), ("train", 1.0), ("some", 0.1)):
        with pytest.raises(StreamError, match="--docs|--holdout-fraction"):
            DocSelection(docs, fraction, 0)


def test_harvest_streams_of_held_out_and_training_documents_are_disjoint(tmp_path, embedded_model):
    """The selection runs before rendering and the token budget: doc ids stay dataset indices."""
    from fast_sae.harvest.run import HarvestConfig, build_stream

    _, tok = embedded_model

    def docs(regime: str, which: str, max_tokens: int | None = None) -> tuple[set[int], int]:
        cfg = HarvestConfig(out=tmp_path / "c", regime=regime, docs=which, holdout_fraction=0.25, holdout_seed=3,
                            max_samples=120, max_tokens=max_tokens, context_size=64).resolved()
        stream, _, _ = build_stream(cfg, tok)
        return set(np.unique(stream.doc_ids).tolist()), len(stream.ids)

    held, _ = docs("fast", "holdout")
    train, _ = docs("fast", "train")
    btf, _ = docs("bt-f", "train")
    everything, _ = docs("fast", "all")
    assert held and train and held.isdisjoint(train) and held.isdisjoint(btf)
    assert held | train == everything == set(range(120))
    assert held == {i for i in range(120) if DocSelection("holdout", 0.25, 3).keep(i)}
    small, n = docs("fast", "holdout", max_tokens=600)
    assert small <= held and 500 < n <= 600  # the budget is filled with held-out documents only
