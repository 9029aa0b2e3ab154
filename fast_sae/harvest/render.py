"""Rendering a conversation with the model's own chat template, and labelling every token's role.

Why character spans: the template is arbitrary Jinja, so the only reliable way to know which tokens
came from which message is to render the text, locate each message's content in it, tokenize the
rendered text with offsets, and give every token the role of the characters it starts on. Tokens
outside every message are the template's own (special tokens, role names), except the default
system prompt some templates inject, which gets a role of its own. The rendered text is tokenized with ``add_special_tokens=False``: the template already
writes any BOS, so none is added twice (pitfalls.md).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fast_sae.actcache import Role

_MESSAGE_ROLES = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


class TemplateError(Exception):
    """The model cannot render conversations; one line saying why."""


@dataclass
class TemplateInfo:
    special_ids: np.ndarray  # ids of every special / added-special token
    bos_id: int | None
    bos_is_turn_marker: bool  # e.g. SmolLM2: bos == <|im_start|>, which opens every turn
    template_hash: str | None
    default_system: str  # text the template adds as system prompt when a conversation has none ('' if none)


def template_info(tokenizer: Any, model_id: str, require_template: bool) -> TemplateInfo:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()))
    if require_template and not template:
        raise TemplateError(f"model {model_id!r}: tokenizer has no chat template; FAST and BT(F) render "
                            f"conversations with it (use --regime bt-p, or a model/tokenizer with a template)")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(tid))
    bos_id = tokenizer.bos_token_id
    marker = False
    if template and bos_id is not None:
        probe = render_text(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        marker = probe.count(tokenizer.bos_token) > 1
    return TemplateInfo(special_ids=np.array(sorted(special), dtype=np.int64), bos_id=bos_id,
                        bos_is_turn_marker=marker,
                        template_hash=hashlib.sha256(template.encode()).hexdigest() if template else None,
                        default_system=_default_system_prompt(tokenizer) if template else "")


def _default_system_prompt(tokenizer: Any) -> str:
    """The system prompt a template injects by itself, found by rendering with and without one.

    With an explicit system message the text is prefix + marker + suffix; without one, a template
    that injects a default renders prefix + DEFAULT + suffix.
    """
    marker = "\u2063SYSTEM\u2063"
    user = [{"role": "user", "content": "probe"}]
    try:
        with_sys = render_text(tokenizer, [{"role": "system", "content": marker}, *user])
        without = render_text(tokenizer, user)
    except TemplateError:
        return ""  # templates without a system role
    prefix, _, suffix = with_sys.partition(marker)
    if without.startswith(prefix) and without.endswith(suffix) and len(without) >= len(prefix) + len(suffix):
        return without[len(prefix):len(without) - len(suffix)]
    return ""


def render_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja errors, e.g. templates that insist on alternating roles
        raise TemplateError(f"chat template failed on a conversation ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def render_conversation(tokenizer: Any, messages: list[dict[str, str]], info: TemplateInfo) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and role codes of one templated conversation."""
    text = render_text(tokenizer, messages)
    char_roles = np.full(len(text) + 1, int(Role.TEMPLATE), dtype=np.uint8)
    cursor = 0
    if info.default_system and not (messages and messages[0]["role"] == "system"):
        at = text.find(info.default_system)
        if at >= 0:
            char_roles[at:at + len(info.default_system)] = int(Role.DEFAULT_SYSTEM)
            cursor = at + len(info.default_system)
    for m in messages:
        content = m["content"]
        for candidate in (content, content.strip()):
            at = text.find(candidate, cursor) if candidate else -1
            if at >= 0:
                char_roles[at:at + len(candidate)] = int(_MESSAGE_ROLES.get(m["role"], Role.TEMPLATE))
                cursor = at + len(candidate)
                break
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    roles = char_roles[np.clip(starts, 0, len(text))]
    roles[np.isin(ids, info.special_ids)] = int(Role.SPECIAL)
    if info.bos_id is not None and not info.bos_is_turn_marker and len(ids) and ids[0] == info.bos_id:
        roles[0] = int(Role.BOS)
    return ids, roles
