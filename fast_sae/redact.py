"""Keeping secrets given on the command line out of everything the project writes or prints.

Why one helper: credentials can reach the process as ``--storage-option secret_access_key=...``
(any KEY=VALUE a store takes) or inside a URL (``http://USER:SECRET@host/...``), and the same
strings are later echoed by many places: a report's ``command``, a run's recorded cache path, a
cache's metadata, an error message a library formats around the endpoint, a progress line. Each
of those goes through this module, so there is one rule for what is a secret and how it is hidden.

The rule: the value of an option whose key names a credential (``secret``, ``key``, ``token``,
``password``, ``credential``, ``auth``, ``signature``, ``session``, ``sas``) is replaced whole; in
any URL the user-info part (``USER:PASSWORD@``) and the values of query parameters whose names
name a credential are replaced; and every such value seen while parsing the command line is
remembered, so a library's message that repeats it in another form is cleaned too.
Credentials should be given in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...),
which nothing here ever records.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, overload

MASK = "***"
_SECRET_WORDS = ("secret", "key", "token", "password", "passwd", "credential", "auth", "signature", "session",
                 "sas", "sig")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s]*)")
_KNOWN: set[str] = set()  # secret values seen in this process (never written anywhere)
_MIN_SECRET = 8  # shorter values are not substituted in free text (they would mangle ordinary words)


def is_secret_key(key: str) -> bool:
    """Whether an option or query parameter named ``key`` carries a credential."""
    k = key.strip().lower()
    return any(word in k for word in _SECRET_WORDS)


def remember(value: str) -> None:
    """Remember a secret value so that ``redact_text`` removes it from any later message."""
    if len(value) >= _MIN_SECRET and not value.isdigit() and value.lower() not in ("true", "false"):
        _KNOWN.add(value)


def redact_url(text: str) -> str:
    """``text`` with every URL's user-info and credential query values replaced by ***."""
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@" if m.group("userinfo") else m.group(0), text)
    if "://" in out:
        out = _QUERY_PARAM.sub(lambda m: f"{m.group('sep')}{m.group('name')}={MASK}"
                               if is_secret_key(m.group("name")) and m.group("value") else m.group(0), out)
    return out


def redact_option(key: str, value: str) -> str:
    """The value of ``--storage-option KEY=VALUE`` as it may be shown."""
    return MASK if is_secret_key(key) and value else redact_url(value)


def remember_options(options: dict[str, str]) -> None:
    """Remember the secrets among parsed storage options (credential values and URL user-info)."""
    for key, value in options.items():
        if is_secret_key(key):
            remember(value)
        for m in _URL_USERINFO.finditer(value):
            info = m.group("userinfo")
            remember(info)
            for part in info.split(":"):
                remember(part)


def redact_text(text: str) -> str:
    """A message or log line with known secrets and URL credentials replaced by ***."""
    for secret in sorted(_KNOWN, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return redact_url(text)


def _redact_pairs(text: str) -> str:
    """``KEY=VALUE,KEY=VALUE`` (one --storage-option argument) with secret values hidden."""
    parts = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        parts.append(f"{key}={redact_option(key, value)}" if sep else redact_url(item))
    return ",".join(parts)


def redact_argv(argv: Sequence[str], option_flags: Iterable[str] = ("--storage-option",)) -> list[str]:
    """A command line as it may be recorded: values of ``--storage-option`` (either ``--flag VALUE``
    or ``--flag=VALUE``) have their secret values hidden, and every argument's URL credentials."""
    flags = tuple(option_flags)
    out: list[str] = []
    take_next = False
    for arg in argv:
        if take_next:
            out.append(redact_text(_redact_pairs(arg)))
            take_next = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in flags and eq:
            out.append(f"{flag}={redact_text(_redact_pairs(value))}")
        elif arg in flags:
            out.append(arg)
            take_next = True
        else:
            out.append(redact_text(arg))
    return out


@overload
def redact_tree(obj: dict[str, Any]) -> dict[str, Any]: ...


@overload
def redact_tree(obj: object) -> object: ...


def redact_tree(obj: object) -> object:
    """A JSON-like document (dicts, lists, strings, numbers) with ``redact_text`` applied to every string."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return obj
