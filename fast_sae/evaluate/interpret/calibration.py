"""Judge calibration: score cases whose answer is known before believing the judge on real features.

Why: a judge's 1-5 score is a number only if the judge tells a clean feature from noise. A 135M
model scores everything alike; a strong model should not. Rather than a fixed rule per backend, the
evaluation asks the judge about two sets of synthetic cases built from the eval cache's own tokens
(held-out sequences, outside the documents' shared prefix, content tokens only):

1. *consistency* (prompt ``judge_v1``, the one real features get): ``cases`` planted features, each
   firing on every occurrence of one token id (a word token seen in at least ``top_n`` sequences;
   ``top_n`` contexts from distinct sequences, activation > 0 exactly where that token is), against
   ``cases`` random latents (``top_n`` contexts around random content tokens, active on that one
   token only). Positives: planted; negatives: random.
2. *explanation* (prompt ``explanation_v1``): each planted feature's contexts with a matching
   explanation (``the token "X"``, X its token) against the same contexts with another planted
   class's explanation. Positives: matching; negatives: mismatched.

Per task the separation is the AUC of the judge's scores (Mann-Whitney: the probability that a
positive scores above a negative, ties counting one half) over scored cases, with its n. The judge
**passes** when, for both tasks, AUC >= ``min_auc`` (default 0.75) and at least 3/4 of the cases of
each kind were scored (a judge that cannot answer in format is not calibrated by the few answers
it gave). Why 0.75 on 8 + 8: a judge scoring at random reaches AUC >= 0.75 on 8 + 8 cases with
probability ~4% per task (both tasks: ~0.2%), and a judge that reads the contexts gets ~1.0. The
result decides ``JudgeConfig.scores_meaningful``, so report and compare call judge scores meaningful
only after a measured pass, never by backend name.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import CONTENT_ROLES, ActivationCache

from .judge import (
    MATCH_FORM,
    VERDICT_FORM,
    Prompt,
    ReplyCache,
    ask,
    load_prompt,
    parse_match,
    parse_verdict,
    render_contexts,
)
from .top_examples import TokenRenderer

CONSISTENCY_PROMPT = "judge_v1"
EXPLANATION_PROMPT = "explanation_v1"
MIN_SCORED_SHARE = 0.75


@dataclass
class Case:
    """One calibration question with a known answer (``positive``)."""

    task: str  # "consistency" | "explanation"
    kind: str  # "planted" | "random" | "matching" | "mismatched"
    positive: bool
    contexts: list[dict]
    token_id: int | None = None
    explanation: str | None = None
    score: int | None = None
    reason: str | None = None
    replies: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"task": self.task, "kind": self.kind, "positive": self.positive, "token_id": self.token_id,
                "explanation": self.explanation, "score": self.score, "reason": self.reason,
                "contexts": self.contexts, "replies": self.replies}


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties counting 1/2 (the Mann-Whitney AUC); None if a side is empty."""
    if not positives or not negatives:
        return None
    pos, neg = np.asarray(positives, float)[:, None], np.asarray(negatives, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def _eligible(cache: ActivationCache, token_ranges: list[tuple[int, int]] | None,
              prefix_length: int) -> np.ndarray:
    """Content tokens (system/user/assistant/text) in ``token_ranges``, not position 0 of a sequence and
    not in the first ``prefix_length`` tokens of their document (the template prefix every document shares)."""
    n = cache.n_tokens
    keep = np.isin(cache.roles(), [int(r) for r in CONTENT_ROLES])
    if token_ranges is not None:
        inside = np.zeros(n, bool)
        for a, b in token_ranges:
            inside[a:b] = True
        keep &= inside
    keep[cache.seq_starts()[:-1]] = False
    if prefix_length:
        docs = cache.doc_ids()
        doc_starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        pos_in_doc = np.arange(n) - doc_starts[np.searchsorted(doc_starts, np.arange(n), side="right") - 1]
        keep &= pos_in_doc >= prefix_length
    return keep


def _is_word(text: str) -> bool:
    bare = text.strip()
    return len(bare) >= 2 and any(ch.isalpha() for ch in bare)


def _context(ids: np.ndarray, starts: np.ndarray, seq: int, centre: int, window: int, active: np.ndarray,
             peak: float, rng: np.random.Generator, render: TokenRenderer) -> dict:
    """The window around ``centre`` with activation > 0 on the ``active`` positions (the centre at ``peak``)."""
    lo, hi = max(int(starts[seq]), centre - window), min(int(starts[seq + 1]), centre + window + 1)
    acts = [0.0] * (hi - lo)
    for i in range(lo, hi):
        if active[i]:
            acts[i - lo] = peak if i == centre else round(float(peak * rng.uniform(0.6, 1.0)), 2)
    window_ids = ids[lo:hi].tolist()
    return {"sequence": int(seq), "token_index": int(centre), "max_act": max(acts), "peak": centre - lo,
            "token_ids": window_ids, "tokens": [render(i) for i in window_ids], "acts": acts}


def build_cases(cache: ActivationCache, *, cases: int = 8, top_n: int = 5, window: int = 8, seed: int = 0,
                token_ranges: list[tuple[int, int]] | None = None, prefix_length: int = 0,
                render: TokenRenderer | None = None) -> list[Case]:
    """The known cases described in the module docstring (seeded; raises ValueError if the tokens are too few)."""
    render = render or TokenRenderer.for_cache(cache)
    rng = np.random.default_rng(seed)
    ids, starts = cache.token_ids(), cache.seq_starts()
    seq_of = cache.sequence_of_token()
    keep = _eligible(cache, token_ranges, prefix_length)
    where = np.flatnonzero(keep)
    if len(where) == 0:
        raise ValueError(f"{cache.path}: no content tokens outside the shared prefix to build calibration cases from")
    # token id -> distinct sequences it occurs in (eligible positions only)
    pairs = np.unique(np.stack([ids[where].astype(np.int64), seq_of[where].astype(np.int64)], 1), axis=0)
    tok, n_seqs = np.unique(pairs[:, 0], return_counts=True)
    candidates = [int(t) for t, n in zip(tok, n_seqs) if n >= top_n and _is_word(render(int(t)))]
    if len(candidates) < max(cases, 2):
        raise ValueError(f"{cache.path}: only {len(candidates)} word tokens occur in >= {top_n} held-out sequences; "
                         f"the calibration needs {max(cases, 2)} (lower --judge-calibration-cases or use more "
                         f"eval data)")
    classes = [int(t) for t in rng.choice(candidates, size=cases, replace=False)]
    planted: list[Case] = []
    for t in classes:
        seqs = rng.choice(np.unique(pairs[pairs[:, 0] == t, 1]), size=top_n, replace=False)
        active = keep & (ids == t)
        ctxs = []
        for s in seqs:
            at = np.flatnonzero(active[int(starts[s]):int(starts[s + 1])]) + int(starts[s])
            peak = round(float(rng.uniform(4.0, 10.0)), 2)
            ctxs.append(_context(ids, starts, int(s), int(rng.choice(at)), window, active, peak, rng, render))
        planted.append(Case("consistency", "planted", True, sorted(ctxs, key=lambda c: -c["max_act"]), token_id=t))
    random_cases: list[Case] = []
    for _ in range(cases):
        seqs = rng.choice(np.unique(seq_of[where]), size=min(top_n, len(np.unique(seq_of[where]))), replace=False)
        ctxs = []
        for s in seqs:
            at = where[seq_of[where] == s]
            centre = int(rng.choice(at))
            only = np.zeros(len(ids), bool)
            only[centre] = True
            peak = round(float(rng.uniform(4.0, 10.0)), 2)
            ctxs.append(_context(ids, starts, int(s), centre, window, only, peak, rng, render))
        random_cases.append(Case("consistency", "random", False, sorted(ctxs, key=lambda c: -c["max_act"])))
    explained: list[Case] = []
    for i, case in enumerate(planted):
        other = planted[(i + 1 + int(rng.integers(len(planted) - 1))) % len(planted)]  # any other class
        for positive, source in ((True, case), (False, other)):
            word = json.dumps(render(int(source.token_id or 0)).strip(), ensure_ascii=False)
            explained.append(Case("explanation", "matching" if positive else "mismatched", positive, case.contexts,
                                  token_id=case.token_id, explanation=f"the token {word}"))
    return planted + random_cases + explained


def _messages(case: Case, prompts: dict[str, Prompt]) -> list[dict]:
    contexts = render_contexts(case.contexts)
    if case.task == "consistency":
        return prompts["consistency"].messages(feature="calibration", contexts=contexts)
    return prompts["explanation"].messages(contexts=contexts, explanation=case.explanation)


def score_cases(cases: list[Case], backend: Any, reply_cache: ReplyCache | None, retries: int) -> None:
    """Ask the judge about every case (same ``ask`` as real features: retries, reply cache); fills scores."""
    prompts = {"consistency": load_prompt(CONSISTENCY_PROMPT), "explanation": load_prompt(EXPLANATION_PROMPT)}
    for case in cases:
        prompt = prompts[case.task]
        if case.task == "consistency":
            out = ask(backend, reply_cache, prompt, _messages(case, prompts), parse_verdict, retries, VERDICT_FORM)
            case.score = out.value.score if out.value else None
        else:
            out = ask(backend, reply_cache, prompt, _messages(case, prompts), parse_match, retries, MATCH_FORM)
            case.score = out.value
        case.reason, case.replies = out.reason, out.replies


def separation(cases: list[Case], min_auc: float) -> dict[str, Any]:
    """Per task: AUC, n scored / asked per side, pass; overall pass = every task passes."""
    tasks: dict[str, Any] = {}
    for task in ("consistency", "explanation"):
        mine = [c for c in cases if c.task == task]
        pos = [c.score for c in mine if c.positive and c.score is not None]
        neg = [c.score for c in mine if not c.positive and c.score is not None]
        n_pos, n_neg = sum(c.positive for c in mine), sum(not c.positive for c in mine)
        value = auc(pos, neg)
        enough = (n_pos > 0 and n_neg > 0 and len(pos) >= math.ceil(MIN_SCORED_SHARE * n_pos)
                  and len(neg) >= math.ceil(MIN_SCORED_SHARE * n_neg))
        tasks[task] = {"auc": value, "n_positive": len(pos), "n_negative": len(neg), "asked_positive": n_pos,
                       "asked_negative": n_neg, "mean_positive": float(np.mean(pos)) if pos else None,
                       "mean_negative": float(np.mean(neg)) if neg else None,
                       "passed": bool(enough and value is not None and value >= min_auc)}
    return {"tasks": tasks, "passed": all(t["passed"] for t in tasks.values()), "min_auc": min_auc,
            "min_scored_share": MIN_SCORED_SHARE}


def verdict_line(result: dict[str, Any]) -> str:
    """One line for reports: pass/fail with each task's AUC and n."""
    parts = [f"{task} AUC {fmt_auc(t['auc'])} (n = {t['n_positive']} + {t['n_negative']} scored of "
             f"{t['asked_positive']} + {t['asked_negative']})" for task, t in result["tasks"].items()]
    word = "passed" if result["passed"] else "FAILED"
    return f"judge calibration {word}: " + "; ".join(parts) + f"; pass needs AUC >= {result['min_auc']:g} on both"


def fmt_auc(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def calibrate(backend: Any, cache: ActivationCache, out_dir: Path | None, *, judge_info: dict[str, Any],
              retries: int = 2, reply_cache: ReplyCache | None = None, cases: int = 8, min_auc: float = 0.75,
              top_n: int = 5, window: int = 8, seed: int = 0, token_ranges: list[tuple[int, int]] | None = None,
              prefix_length: int = 0) -> dict[str, Any]:
    """Build the known cases, ask ``backend`` about each, measure the separation.

    Writes ``out_dir/judge_calibration.json`` (every case, its contexts, score and the judge's replies)
    when ``out_dir`` is given. Returns the summary (``passed``, per-task AUC and n, ``line``, ``file``).
    """
    t0 = time.time()
    built = build_cases(cache, cases=cases, top_n=top_n, window=window, seed=seed, token_ranges=token_ranges,
                        prefix_length=prefix_length)
    score_cases(built, backend, reply_cache, retries)
    result = separation(built, min_auc) | {"cases_per_kind": cases, "top_n": top_n, "window": window, "seed": seed,
                                           "prompts": [CONSISTENCY_PROMPT, EXPLANATION_PROMPT],
                                           "cache": str(cache.path), "shared_prefix_excluded": prefix_length,
                                           "judge": judge_info, "backend_calls": getattr(backend, "calls", None)}
    result["line"] = verdict_line(result)
    result["seconds"] = round(time.time() - t0, 2)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = out_dir / "judge_calibration.json"
        f.write_text(json.dumps(result | {"cases": [c.record() for c in built]}, indent=1, ensure_ascii=False))
        result["file"] = str(f)
    return result
