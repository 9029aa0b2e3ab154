"""The LLM judge: versioned prompts, strict reply parsing, an on-disk reply cache, retries, score bands.

Why strict parsing: a judge's free text is data only if its verdict is unambiguous. A reply without
exactly one well-formed verdict line (or with an out-of-range score) raises ``JudgeParseError``
naming what is wrong; the caller retries and, if every attempt fails, records the item as
*unscored* with that reason: one bad reply never aborts a run and never becomes a made-up score.

Why a cache: judging is the slow (or paid) step. Every reply is stored under a key made of the
prompt version and text hash, backend, model, generation settings, attempt number and the exact
messages (which contain the feature's content), so rerunning an evaluation asks nothing twice and
any change to what would be asked asks again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
SCORES = (1, 2, 3, 4, 5)
TOP_RANGE = (4, 5)  # the paper's "top range" / high-quality band


class JudgeParseError(ValueError):
    """A judge reply that does not contain exactly one valid verdict; the message says why."""


class BackendError(RuntimeError):
    """A judge backend call that failed (HTTP error, timeout, bad response body)."""


# ---------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """A versioned prompt file: ``=== system ===`` and ``=== user ===`` sections with {placeholders}."""

    version: str
    system: str
    user: str
    sha256: str

    def messages(self, **values: Any) -> list[dict[str, str]]:
        user = self.user
        for key, value in values.items():
            user = user.replace("{" + key + "}", str(value))
        leftover = re.findall(r"\{(feature|contexts|instruction|reply|explanation)\}", user)
        if leftover:
            raise KeyError(f"prompt {self.version}: no value given for {{{leftover[0]}}}")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def load_prompt(version: str, folder: Path = PROMPTS_DIR) -> Prompt:
    """Read ``<folder>/<version>.md``; the HTML comment at its top is documentation, not prompt."""
    path = folder / f"{version}.md"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: judge prompt file missing")
    text = path.read_text(encoding="utf-8")
    body = re.sub(r"\A\s*<!--.*?-->\s*", "", text, flags=re.S)
    match = re.fullmatch(r"=== system ===\n(.*?)\n=== user ===\n(.*)", body, flags=re.S)
    if not match:
        raise ValueError(f"{path}: expected '=== system ===' then '=== user ===' sections")
    return Prompt(version=version, system=match.group(1).strip(), user=match.group(2).strip(),
                  sha256=hashlib.sha256(text.encode()).hexdigest())


def format_activation(value: float) -> str:
    return "0" if value == 0 else f"{value:.2f}"


def render_contexts(contexts: Sequence[dict], max_contexts: int | None = None) -> str:
    """Contexts as the paper writes them: alternating tokens and activation values, one context a block."""
    blocks = []
    for i, ctx in enumerate(contexts[:max_contexts], 1):
        pairs = " ".join(f"{json.dumps(t, ensure_ascii=False)} ({format_activation(a)})"
                         for t, a in zip(ctx["tokens"], ctx["acts"]))
        blocks.append(f"Context {i} (max activation {format_activation(ctx['max_act'])}):\n{pairs}")
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class AnswerForm:
    """The answer format of a prompt, for backends that can constrain decoding (the local one).

    The reply is ``prefix + <one of choices> + after_choice [+ free text + free_text_end]``: a small
    local model rarely writes the format on its own, so the local backend picks the most likely
    choice and generates only the free-text field (see judge_backends.LocalBackend).
    """

    prefix: str
    choices: tuple[str, ...]
    after_choice: str
    free_text_end: str | None = None
    placeholders: tuple[str, ...] = ()  # the prompt's literal placeholders, banned from the free text


VERDICT_FORM = AnswerForm("My final verdict score is: [[", tuple(str(s) for s in SCORES), "]], feature name is [[",
                          "]]", ("NAME", "S"))
QUALITY_FORM = AnswerForm("Quality score: [[", tuple(str(s) for s in range(1, 11)), "]]")
MATCH_FORM = AnswerForm("Match score: [[", tuple(str(s) for s in SCORES), "]]")


# Names a judge copies from the prompt instead of naming the feature (the answer format's placeholders).
PLACEHOLDER_NAMES = frozenset({"s", "name", "names", "feature name", "feature", "descriptive name", "name here",
                               "short name", "a few words", "...", "n/a", "none", "null", "unknown", "x"})


def is_placeholder(name: str) -> bool:
    """Whether a feature name is empty, a placeholder of the prompt (S, NAME, ...) or only punctuation."""
    bare = name.strip().strip("[]<>{}()\"'`*_ .").casefold()
    return not bare or bare in PLACEHOLDER_NAMES or not any(ch.isalnum() for ch in bare)


@dataclass(frozen=True)
class Verdict:
    score: int
    name: str


_VERDICT = re.compile(r"my final verdict score is:\s*\[\[\s*([^\[\]]*?)\s*\]\]\s*,?\s*"
                      r"feature name is:?\s*\[\[\s*([^\[\]]*?)\s*\]\]", re.I)
_QUALITY = re.compile(r"quality score:\s*\[\[\s*([^\[\]]*?)\s*\]\]", re.I)
_MATCH = re.compile(r"match score:\s*\[\[\s*([^\[\]]*?)\s*\]\]", re.I)


def _snippet(reply: str, n: int = 120) -> str:
    flat = " ".join(reply.split())
    return repr(flat if len(flat) <= n else flat[:n] + "...")


def _score(raw: str, lo: int, hi: int, reply: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw):
        raise JudgeParseError(f"verdict score {raw!r} is not an integer {lo}-{hi} (reply {_snippet(reply)})")
    score = int(raw)
    if not lo <= score <= hi:
        raise JudgeParseError(f"verdict score {score} outside {lo}-{hi} (reply {_snippet(reply)})")
    return score


def _single(matches: list[tuple], what: str, reply: str) -> tuple:
    if not matches:
        raise JudgeParseError(f"reply has no line '{what}' (reply {_snippet(reply)})")
    if len(set(matches)) > 1:
        raise JudgeParseError(f"reply has {len(matches)} conflicting verdicts (reply {_snippet(reply)})")
    return matches[0]


def parse_verdict(reply: str) -> Verdict:
    """The interpretability verdict ``My final verdict score is: [[S]], feature name is [[NAME]]``.

    Raises JudgeParseError if the line is missing, repeated with different values, S is not an
    integer in 1-5, or NAME is empty or a placeholder the prompt uses ("S", "NAME", "feature name" ...).
    """
    raw_score, name = _single(_VERDICT.findall(reply),
                              "My final verdict score is: [[S]], feature name is [[NAME]]", reply)
    score = _score(raw_score, 1, 5, reply)
    if is_placeholder(name):
        raise JudgeParseError(f"verdict has an empty or placeholder feature name (reply {_snippet(reply)})")
    return Verdict(score=score, name=name)


def parse_quality(reply: str) -> int:
    """The reply-quality verdict ``Quality score: [[S]]`` with S an integer 1-10 (same strictness)."""
    (raw,) = (_single([(m,) for m in _QUALITY.findall(reply)], "Quality score: [[S]]", reply))
    return _score(raw, 1, 10, reply)


def parse_match(reply: str) -> int:
    """The explanation-match verdict ``Match score: [[S]]`` with S an integer 1-5 (same strictness)."""
    (raw,) = (_single([(m,) for m in _MATCH.findall(reply)], "Match score: [[S]]", reply))
    return _score(raw, 1, 5, reply)


# ---------------------------------------------------------------------------------------- cache
class ReplyCache:
    """Judge replies on disk, one small JSON file per key (safe to share between runs)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError):
            return None  # a torn or foreign file: ask again

    def put(self, key: str, reply: str, meta: dict) -> None:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"reply": reply, **meta}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, f)


# ---------------------------------------------------------------------------------------- asking
@dataclass
class Outcome:
    """Result of asking the judge about one item: ``value`` is None when unscored (see ``reason``)."""

    value: Any = None
    reason: str | None = None
    replies: list[str] = field(default_factory=list)
    attempts: int = 0
    cached: int = 0


def ask(backend: Any, cache: ReplyCache | None, prompt: Prompt, messages: list[dict], parse: Callable[[str], Any],
        retries: int, form: AnswerForm | None = None) -> Outcome:
    """Ask up to ``1 + retries`` times until a reply parses; every reply is cached by attempt number.

    Backend failures and parse failures both count as a failed attempt; neither is raised.
    """
    outcome = Outcome()
    for attempt in range(retries + 1):
        outcome.attempts = attempt + 1
        key = ReplyCache.key(prompt=prompt.version, prompt_sha=prompt.sha256, backend=backend.kind,
                             model=backend.model, settings=backend.settings(), attempt=attempt, messages=messages)
        reply = cache.get(key) if cache else None
        if reply is not None:
            outcome.cached += 1
        else:
            try:
                reply = backend.complete(messages, attempt=attempt, form=form)
            except BackendError as exc:
                outcome.reason = f"backend error: {exc}"
                continue
            if cache:
                cache.put(key, reply, {"prompt": prompt.version, "backend": backend.kind, "model": backend.model,
                                       "attempt": attempt})
        outcome.replies.append(reply)
        try:
            outcome.value = parse(reply)
            outcome.reason = None
            return outcome
        except JudgeParseError as exc:
            outcome.reason = f"malformed reply: {exc}"
    return outcome


def score_features(reports: Sequence[dict], backend: Any, cache: ReplyCache | None, *, retries: int = 2,
                   prompt: Prompt | None = None, progress: Callable[[int], None] | None = None,
                   into: list[dict] | None = None) -> list[dict]:
    """Judge each feature report (``feature_contexts`` output): one record per feature with
    ``score``/``name`` or ``score: None`` and ``reason``. Records are appended to ``into`` as they
    are made, so a caller still has the judged ones if the run is interrupted."""
    prompt = prompt or load_prompt("judge_v1")
    records = [] if into is None else into
    for i, rep in enumerate(reports):
        messages = prompt.messages(feature=rep["feature"], contexts=render_contexts(rep["contexts"]))
        out = ask(backend, cache, prompt, messages, parse_verdict, retries, VERDICT_FORM)
        records.append({"feature": rep["feature"], "score": out.value.score if out.value else None,
                        "name": out.value.name if out.value else None, "reason": out.reason,
                        "attempts": out.attempts, "cached_replies": out.cached, "replies": out.replies})
        if progress:
            progress(i + 1)
    return records


def score_bands(records: Sequence[dict]) -> dict:
    """Share of scored features per score, the top-range (4-5) share and the CDF (share <= s)."""
    scores = [r["score"] for r in records if r.get("score") is not None]
    n = len(scores)
    counts = {s: scores.count(s) for s in SCORES}
    share = {str(s): (counts[s] / n if n else None) for s in SCORES}
    cdf, running = {}, 0
    for s in SCORES:
        running += counts[s]
        cdf[str(s)] = running / n if n else None
    return {"n_judged": len(records), "n_scored": n, "n_unscored": len(records) - n,
            "counts": {str(s): c for s, c in counts.items()}, "share": share,
            "top_range": list(TOP_RANGE),
            "top_range_share": (sum(counts[s] for s in TOP_RANGE) / n) if n else None,
            "cdf": cdf, "mean_score": (sum(scores) / n) if n else None}
