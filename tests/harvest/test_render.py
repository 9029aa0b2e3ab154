import numpy as np
import pytest

from fast_sae.actcache import Role
from fast_sae.harvest.render import TemplateError, render_conversation, template_info

CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]


def test_ids_equal_apply_chat_template_and_roles_are_right(embedded_model):
    _, tok = embedded_model
    info = template_info(tok, "embedded", require_template=True)
    ids, roles = render_conversation(tok, CONV, info)
    ref = tok.apply_chat_template(CONV, tokenize=True)
    assert list(ids) == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert set(roles[np.isin(ids, [im_start, im_end])]) == {int(Role.SPECIAL)}
    # exactly one BOS-like token is never doubled: the template's <|im_start|> is its own, nothing added
    assert ids[0] == im_start and ids[1] != im_start
    user_text = tok.decode(ids[roles == Role.USER])
    assistant_text = tok.decode(ids[roles == Role.ASSISTANT])
    assert user_text.strip() == CONV[0]["content"]
    assert assistant_text.strip() == CONV[1]["content"]
    # role names come from the template; so does its default system prompt, labelled apart
    assert [t.strip() for t in tok.batch_decode(ids[roles == Role.TEMPLATE][:, None]) if t.strip()] == \
        ["system", "user", "ass", "istant"]
    assert tok.decode(ids[roles == Role.DEFAULT_SYSTEM]) == info.default_system
    assert info.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert not (roles == Role.BOS).any()  # SmolLM2's bos is <|im_start|>, a per-turn marker


def test_explicit_system_message_is_system_content(embedded_model):
    _, tok = embedded_model
    info = template_info(tok, "embedded", require_template=True)
    ids, roles = render_conversation(tok, [{"role": "system", "content": "Be brief."}, *CONV], info)
    assert tok.decode(ids[roles == Role.SYSTEM]).strip() == "Be brief."
    assert "SmolLM" not in tok.decode(ids)
    assert not (roles == Role.DEFAULT_SYSTEM).any()


def test_missing_chat_template_is_a_clear_error(embedded_model):
    _, tok = embedded_model
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(TemplateError, match="no chat template"):
            template_info(tok, "some/model", require_template=True)
        assert template_info(tok, "some/model", require_template=False).template_hash is None
    finally:
        tok.chat_template = saved
