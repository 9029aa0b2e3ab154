"""Rendering a conversation with the model's own chat template, and labelling every token's role.

Why a skeleton render: the template is arbitrary Jinja, so the only reliable way to know which
characters came from which message is to ask the template itself. Each conversation is rendered
twice: as is, and with every message's content replaced by a unique marker. The marker render is
the template's skeleton (its own text, with a numbered hole per message); walking it along the real
render gives each message's exact character span, so content is never matched inside template text
(a naive search for content "a" finds the "a" of ``<|im_start|>``). The rendered text is tokenized
with offsets and every token gets the role of the character it starts on. Tokens outside every
message are the template's own (special tokens, role names), except the default system prompt some
templates inject, which gets a role of its own. The text is tokenized with
``add_special_tokens=False``: the template already writes any BOS, so none is added twice.

Two kinds of content could otherwise pass for template structure (cache_layout.md, "Token roles"):
a message whose role the tool does not know (``tool``, ``wizard``), and special-token text typed
inside content (``<|im_end|><|im_start|>assistant``), which a plain tokenization turns into real
special tokens, a forged turn. ``RenderPolicy`` says what happens to each; the defaults are safe.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fast_sae.actcache import Role

MESSAGE_ROLES = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}
SPECIAL_IN_CONTENT = ("escape", "refuse")
OTHER_ROLES = ("refuse", "label")
_HOLE_OPEN, _HOLE_CLOSE = "\ue000", "\ue001"  # private-use characters: no template filter alters them


class TemplateError(Exception):
    """The model cannot render conversations; one line saying why."""


class RenderError(TemplateError):
    """One conversation cannot be rendered under the render policy; one line naming the message."""


@dataclass(frozen=True)
class RenderPolicy:
    """What to do with content that could pass for template structure.

    ``special_in_content``: ``escape`` tokenizes special-token text found inside a message as plain
    text (the template's own special tokens stay special); ``refuse`` stops with an error.
    ``other_roles``: ``refuse`` stops at a role other than system/user/assistant; ``label`` stores
    its content with role code ``other``, which is neither special nor content in the metrics.
    """

    special_in_content: str = "escape"
    other_roles: str = "refuse"


@dataclass
class TemplateInfo:
    special_ids: np.ndarray  # ids of every special / added-special token
    bos_id: int | None
    bos_is_turn_marker: bool  # e.g. SmolLM2: bos == <|im_start|>, which opens every turn
    template_hash: str | None
    default_system: str  # text the template adds as system prompt when a conversation has none ('' if none)
    special_strings: tuple[str, ...] = ()  # the text of those special tokens
    skeletons: dict[tuple, list[str | int]] = field(default_factory=dict, repr=False)  # by conversation shape


def template_info(tokenizer: Any, model_id: str, require_template: bool) -> TemplateInfo:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()))
    if require_template and not template:
        raise TemplateError(f"model {model_id!r}: tokenizer has no chat template; FAST and BT(F) render "
                            f"conversations with it (use --regime bt-p, or a model/tokenizer with a template)")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(tid))
            strings.add(str(tok.content))
    bos_id = tokenizer.bos_token_id
    marker = False
    if template and bos_id is not None:
        probe = render_text(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        marker = probe.count(tokenizer.bos_token) > 1
    return TemplateInfo(special_ids=np.array(sorted(special), dtype=np.int64), bos_id=bos_id,
                        bos_is_turn_marker=marker,
                        template_hash=hashlib.sha256(template.encode()).hexdigest() if template else None,
                        default_system=_default_system_prompt(tokenizer) if template else "",
                        special_strings=tuple(sorted(s for s in strings if s)))


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


def role_code(messages: list[dict[str, str]], i: int, policy: RenderPolicy) -> Role:
    """The code of message i's content; a role outside system/user/assistant is refused or 'other'."""
    role = messages[i]["role"]
    if role in MESSAGE_ROLES:
        return MESSAGE_ROLES[role]
    if policy.other_roles == "label":
        return Role.OTHER
    raise RenderError(f"message {i} has role {role!r}; known roles are system, user, assistant (store it with "
                      f"role code 'other' with --other-roles label, or map the role in the data)")


def _skeleton(tokenizer: Any, messages: list[dict[str, str]]) -> list[str | int]:
    """The template's own text pieces, alternating with the index of the message rendered in between."""
    mark = _HOLE_OPEN
    while any(mark in m["content"] for m in messages):  # a marker no content contains
        mark += _HOLE_OPEN
    probe = [{**m, "content": f"{mark}{i}{_HOLE_CLOSE}"} for i, m in enumerate(messages)]
    parts = re.split(f"{re.escape(mark)}(\\d+){_HOLE_CLOSE}", render_text(tokenizer, probe))
    return [int(p) if j % 2 else p for j, p in enumerate(parts)]


def _locate(text: str, skeleton: list[str | int], messages: list[dict[str, str]], exact: bool = False) -> tuple[
        list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Walk the skeleton along the rendered text: (message, start, end) of every content and the
    spans of the template's own text. Content may come out trimmed (templates that ``| trim``); any
    other change is located by the template text that follows it, unless ``exact``."""
    fail = RenderError("the chat template's output does not split into its own text and the messages' "
                       "content (it rewrites content beyond trimming whitespace); roles cannot be labelled")
    contents: list[tuple[int, int, int]] = []
    template: list[tuple[int, int]] = []
    pos = 0
    for j in range(0, len(skeleton), 2):
        piece = str(skeleton[j])
        if not text.startswith(piece, pos):
            raise fail
        template.append((pos, pos + len(piece)))
        pos += len(piece)
        if j + 1 == len(skeleton):
            break
        i, after, last = int(skeleton[j + 1]), str(skeleton[j + 2]), j + 3 == len(skeleton)
        content = messages[i]["content"]
        end = -1
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            e = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(after, e) and (not last or e + len(after) == len(text)):
                end = e
                break
        if end < 0 and after and not exact:
            end = len(text) - len(after) if last else text.find(after, pos)
        if end < pos:
            raise fail
        contents.append((i, pos, end))
        pos = end
    if pos != len(text):
        raise fail
    return contents, template


def _structure(tokenizer: Any, text: str, messages: list[dict[str, str]], info: TemplateInfo) -> tuple[
        list[tuple[int, int, int]], list[tuple[int, int]]]:
    """_locate with the skeleton of an earlier conversation of the same shape (roles and keys) when
    it fits exactly (every template piece and every content verified in place); else a fresh one.
    Saves a second template render per conversation; a template that branches on content simply
    misses the cache."""
    key = tuple((m["role"], tuple(sorted(k for k in m if k != "content"))) for m in messages)
    cached = info.skeletons.get(key)
    if cached is not None and not any(_HOLE_OPEN in m["content"] for m in messages):
        try:
            return _locate(text, cached, messages, exact=True)
        except RenderError:
            pass
    skeleton = _skeleton(tokenizer, messages)
    if len(info.skeletons) < 4096:
        info.skeletons[key] = skeleton
    return _locate(text, skeleton, messages)


def _retokenize(tokenizer: Any, text: str, ids: list[int], offsets: list[tuple[int, int]],
                forged: np.ndarray, real: np.ndarray) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize again, as plain text, every stretch between two real special tokens that holds a forged one.

    The tokenizer itself cuts the text at special tokens and tokenizes the stretches in between
    independently, so redoing only the stretches with forged tokens leaves every other token as is.
    """
    out_ids: list[int] = []
    out_off: list[tuple[int, int]] = []
    t = 0
    while t < len(ids):
        if real[t]:
            out_ids.append(ids[t])
            out_off.append(offsets[t])
            t += 1
            continue
        u = t
        while u < len(ids) and not real[u]:
            u += 1
        if forged[t:u].any():
            a = offsets[t - 1][1] if t else 0
            b = offsets[u][0] if u < len(ids) else len(text)
            enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True,
                            split_special_tokens=True)
            out_ids.extend(int(x) for x in enc["input_ids"])
            out_off.extend((s + a, e + a) for s, e in enc["offset_mapping"])
        else:
            out_ids.extend(ids[t:u])
            out_off.extend(offsets[t:u])
        t = u
    return out_ids, out_off


def render_conversation(tokenizer: Any, messages: list[dict[str, str]], info: TemplateInfo,
                        policy: RenderPolicy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and role codes of one templated conversation."""
    policy = policy or RenderPolicy()
    codes = [role_code(messages, i, policy) for i in range(len(messages))]
    text = render_text(tokenizer, messages)
    contents, template = _structure(tokenizer, text, messages, info)
    char_roles = np.full(len(text) + 1, int(Role.TEMPLATE), dtype=np.uint8)
    char_msg = np.full(len(text) + 1, -1, dtype=np.int64)
    if info.default_system and not (messages and messages[0]["role"] == "system"):
        for s, e in template:
            at = text.find(info.default_system, s, e)
            if at >= 0:
                char_roles[at:at + len(info.default_system)] = int(Role.DEFAULT_SYSTEM)
                break
    for i, s, e in contents:
        char_roles[s:e] = int(codes[i])
        char_msg[s:e] = i
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = [int(x) for x in enc["input_ids"]], [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    special = np.isin(np.asarray(ids, dtype=np.int64), info.special_ids)
    starts = np.clip(np.asarray([s for s, _ in offsets], dtype=np.int64), 0, len(text))
    forged = special & (char_msg[starts] >= 0)
    if forged.any():
        t = int(np.flatnonzero(forged)[0])
        i = int(char_msg[starts[t]])
        if policy.special_in_content == "refuse":
            raise RenderError(f"message {i} ({messages[i]['role']}) contains the special token "
                              f"{text[offsets[t][0]:offsets[t][1]]!r}, which would forge template structure "
                              f"(tokenize it as text with --special-in-content escape)")
        ids, offsets = _retokenize(tokenizer, text, ids, offsets, forged, special & ~forged)
    id_arr = np.asarray(ids, dtype=np.int64)
    starts = np.clip(np.asarray([s for s, _ in offsets], dtype=np.int64), 0, len(text))
    roles = char_roles[starts]
    roles[np.isin(id_arr, info.special_ids)] = int(Role.SPECIAL)
    if info.bos_id is not None and not info.bos_is_turn_marker and len(id_arr) and id_arr[0] == info.bos_id:
        roles[0] = int(Role.BOS)
    return id_arr, roles
