"""Loading chat conversations and plain-text documents, from the embedded defaults or any HF source.

Embedded defaults (real data, offline): ``embedded:chatterbot-en`` is the English part of the
multi-turn ``chatterbot-corpus`` dialog corpus (BSD-3, PyPI), turns alternating user/assistant;
``embedded:python-docs`` is the prose of the Python documentation's topic pages that every
CPython ships as ``pydoc_data.topics`` (PSF licence), used as pre-training-like text for BT(P).
Anything else goes through ``datasets``: a hub name on a user's machine, or local
JSON/JSONL/parquet/CSV files, in the common conversation formats.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED_CHAT = "embedded:chatterbot-en"
EMBEDDED_TEXT = "embedded:python-docs"

Message = dict[str, str]


class DataError(Exception):
    """A dataset that cannot be read as asked; one line naming the source, row and field."""


@dataclass
class DataSource:
    name: str
    split: str = "train"
    config: str | None = None
    limit: int | None = None  # max samples read


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def _chatterbot_conversations() -> Iterator[list[Message]]:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{EMBEDDED_CHAT}: package chatterbot-corpus not installed; "
                        f"run `pip install --no-deps chatterbot-corpus` (or ./setup.sh)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            # A plain-string entry (a YAML slip: trivia.yml #13 lost its list markers) is one turn;
            # iterating it would make one turn per character.
            turns = [str(t).strip() for t in ([conv] if isinstance(conv, str) else conv) if str(t).strip()]
            if turns:
                yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text


def _hf_rows(src: DataSource) -> Iterator[dict[str, Any]]:
    """Rows of a hub dataset (streamed: no full download for a token budget) or of local files."""
    import datasets

    path = Path(src.name)
    files: list[str] = []
    try:
        if path.exists():
            files, builder = _local_files(path)
            rows: Iterable[dict[str, Any]] = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            rows = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)
        yield from rows
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds (network, schema, missing split)
        bad = _first_bad_json_line(files)
        if bad:
            raise DataError(bad) from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"dataset {src.name!r}: cannot load ({first})") from None


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: Path) -> tuple[list[str], str]:
    """The data files of a local path and their one ``datasets`` builder; a file of another kind is named.

    Hidden files (``.DS_Store``, ``.gitattributes``) are skipped; anything else must be data, since
    a stray file would otherwise fail deep inside ``datasets`` with no file name.
    """
    found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts)) if path.is_dir() else [path]
    if not found:
        raise DataError(f"{path}: no data files (expected .json, .jsonl, .parquet or .csv)")
    builders: dict[str, Path] = {}
    for f in found:
        builder = _BUILDERS.get(f.suffix.lower())
        if builder is None:
            raise DataError(f"{f}: not a data file (expected .json, .jsonl, .parquet or .csv)")
        builders.setdefault(builder, f)
    if len(builders) > 1:
        a, b = list(builders.values())[:2]
        raise DataError(f"{path}: mixes file kinds ({a.name} and {b.name}); keep one of .json/.jsonl, .parquet, .csv")
    return [str(f) for f in found], next(iter(builders))


def _first_bad_json_line(files: list[str]) -> str | None:
    """'FILE line N: reason' for the first line of a JSON-lines file that is not a JSON object, else None.

    Run only after ``datasets`` failed, whose own message names neither the file nor the line. A
    ``.json`` file that parses as one document (a JSON array) is not JSON lines and is skipped.
    """
    for name in files:
        if Path(name).suffix.lower() not in (".json", ".jsonl"):
            continue
        text = Path(name).read_text(encoding="utf-8", errors="replace")
        if name.lower().endswith(".json"):
            try:
                json.loads(text)
                continue
            except ValueError:
                pass
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"{name} line {n}: not valid JSON ({exc})"
            if not isinstance(row, dict):
                return f"{name} line {n}: expected a JSON object per line, got {type(row).__name__}"
    return None


def row_to_messages(row: dict[str, Any], where: str) -> list[Message]:
    """One dataset row in OpenAI ``messages``, ShareGPT ``conversations`` or Alpaca format → messages."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {str(m)[:80]!r}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "conversations" in row:
        convs = row["conversations"]
        if not isinstance(convs, list) or not convs:
            raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}}")
        out = []
        for i, m in enumerate(convs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: conversations[{i}] must be an object, got {str(m)[:80]!r}")
            who = m.get("from", m.get("role"))
            text = m.get("value", m.get("content"))
            if not isinstance(who, str) or who.lower() not in _SHAREGPT_ROLES or not isinstance(text, str):
                raise DataError(f"{where}: conversations[{i}] must have 'from' in {sorted(_SHAREGPT_ROLES)} "
                                f"and a string 'value', got {str(m)[:80]!r}")
            out.append({"role": _SHAREGPT_ROLES[who.lower()], "content": text})
        return out
    if "instruction" in row and "output" in row:
        if not isinstance(row["instruction"], str) or not isinstance(row["output"], str):
            raise DataError(f"{where}: 'instruction' and 'output' must be strings")
        prompt = row["instruction"]
        if isinstance(row.get("input"), str) and row["input"].strip():
            prompt = f"{prompt}\n\n{row['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    raise DataError(f"{where}: no conversation found; expected a 'messages' (OpenAI), 'conversations' "
                    f"(ShareGPT) or 'instruction'/'output' (Alpaca) field, got fields {sorted(row)[:8]}")


def iter_conversations(src: DataSource) -> Iterator[list[Message]]:
    if src.name == EMBEDDED_CHAT:
        rows: Iterable[list[Message]] = _chatterbot_conversations()
    elif src.name.startswith("embedded:"):
        raise DataError(f"dataset {src.name!r}: embedded chat data is {EMBEDDED_CHAT!r}")
    else:
        rows = (row_to_messages(row, f"{src.name} row {i}") for i, row in enumerate(_hf_rows(src)))
    for i, conv in enumerate(rows):
        if src.limit is not None and i >= src.limit:
            return
        yield conv


def iter_texts(src: DataSource, text_field: str = "text") -> Iterator[str]:
    if src.name == EMBEDDED_TEXT:
        rows: Iterable[str] = _python_docs()
    elif src.name.startswith("embedded:"):
        raise DataError(f"dataset {src.name!r}: embedded text data is {EMBEDDED_TEXT!r}")
    else:
        def gen() -> Iterator[str]:
            for i, row in enumerate(_hf_rows(src)):
                text = row.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f"{src.name} row {i}: field {text_field!r} must be a string, "
                                    f"got fields {sorted(row)[:8]}")
                yield text
        rows = gen()
    for i, text in enumerate(rows):
        if src.limit is not None and i >= src.limit:
            return
        yield text


class Fingerprint:
    """sha256 over the samples actually used, in order: two caches with equal fingerprints saw equal data."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, sample: Any) -> None:
        self._h.update(json.dumps(sample, sort_keys=True, ensure_ascii=False).encode())
        self._h.update(b"\x00")

    def hexdigest(self) -> str:
        return self._h.hexdigest()
