"""The special-token intervention (FAST paper §6): steer generation with the SAE features that fire on
chat-template special tokens, and judge the replies against the unmodified model's.

Entry point (called by fast_sae/evaluate/runner.py)::

    run_intervention(sae, cache, out_dir, *, prompts=None, alphas=(0, 15, 25, 50),
                     n_features=1, positions="all", max_new_tokens=48, judge=None,
                     features=None, mode="add", direction="unit", top_k=5, model_id=None, model=None,
                     token_ranges=None) -> dict

1. Feature discovery (special_features.py), from the cache only (no model; only ``token_ranges`` of it when given: the
   evaluation passes its held-out sequences): for every special-token id occurring at a
   special-token position (roles ``actcache.SPECIAL_ROLES``: BOS, template special tokens, template
   role/newline tokens, separators), the feature's maximum activation over that token's occurrences
   in each sample (doc id), averaged over the samples containing it (the paper's "average maximum
   activation", Tables 12-18); top ``top_k`` features per token. The ``n_features`` steered features
   are the highest such averages (distinct features) over the marker tokens (roles BOS / special /
   separator, e.g. <|im_start|>, <|im_end|>; all listed tokens if there are none), unless
   ``features`` is given.
2. Generation: each prompt as a one-turn user chat through the model's chat template, greedy,
   ``max_new_tokens``; first unmodified (no hook), then for every feature and alpha with a forward
   hook on ``decoder_layers(model)[hook_layer]`` (the SAE's layer: the cache stores that block's
   output) that adds ``alpha * d_k`` (eq. 8, ``mode="add"``) to the residual stream, with d_k the
   unit-norm decoder direction W_dec[k] / ‖W_dec[k]‖ as in the paper (``direction="unit"``), so
   alpha is in residual units whatever the SAE's normalisation; ``direction="raw_folded"`` adds
   the folded checkpoint row as is (its norm is 1/s for a unit-norm decoder trained on s·x), at every
   position (``positions="all"``: prompt and generated tokens) or only where the input token is a
   special token (``positions="special"``: the tokenizer's special ids, e.g. <|im_start|>, <|im_end|>).
   ``mode="scale"`` instead multiplies the feature's own activation by alpha
   (h + (alpha - 1) * f_k(h) * W_dec[k]; alpha 1 = unmodified, 0 = ablated). alpha = 0 in add mode
   leaves every float unchanged, so it reproduces the unmodified generation exactly; the result
   records that check per reply (``identical_to_unmodified``).
3. With a ``judge`` (``evaluate.interpret.JudgeConfig``), every reply (unmodified and steered) is
   scored 1-10 with ``fast_sae/evaluate/prompts/reply_quality_v1.md`` (strict ``Quality score: [[S]]``
   parsing, retries, on-disk reply cache as for interpretability). The paper judged only
   qualitatively; this is our quantitative stand-in.
Writes ``out_dir/intervention.json`` (everything, all replies) and ``out_dir/intervention.md`` (the
table alpha -> mean score per feature, plus the special-token feature table). Returns the summary.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import ActivationCache
from fast_sae.lm import decoder_layers, load_model, load_tokenizer, map_block_output
from fast_sae.saeio import LoadedSAE, load_sae

from .errors import EvalError
from .interpret.config import JudgeConfig
from .interpret.judge import QUALITY_FORM, ReplyCache, ask, load_prompt, parse_quality
from .interpret.judge_backends import make_backend
from .interpret.top_examples import sae_layer
from .special_features import pick_features, special_token_features

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts" / "intervention_prompts.json"
QUALITY_PROMPT = "reply_quality_v1"
POSITIONS = ("all", "special")
DIRECTIONS = ("unit", "raw_folded")
MODES = ("add", "scale")


def default_prompts() -> list[str]:
    """The instructions shipped in fast_sae/evaluate/prompts/intervention_prompts.json."""
    return list(json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))["prompts"])


# ------------------------------------------------------------------------------- steering
@dataclass
class SteeringSpec:
    """What to add where: feature ``feature`` of ``sae``, strength ``alpha``, at ``layer``."""

    layer: int
    direction: torch.Tensor  # W_dec[feature], [d_model]
    alpha: float
    positions: str = "all"
    special_ids: tuple[int, ...] = ()
    mode: str = "add"
    sae: Any = None
    feature: int | None = None


def steering_direction(sae: Any, feature: int, kind: str = "unit") -> torch.Tensor:
    """Feature ``feature``'s decoder direction: unit-norm W_dec[k] / ‖W_dec[k]‖ (the paper's d_k), or the
    folded checkpoint row as stored (``raw_folded``, whose norm depends on the training normalisation)."""
    if kind not in DIRECTIONS:
        raise EvalError(f"steering direction {kind!r}: expected one of {DIRECTIONS}")
    row = sae.W_dec[feature].detach().float()
    if kind == "raw_folded":
        return row
    norm = float(row.norm())
    if norm == 0:
        raise EvalError(f"feature {feature} has a zero decoder row; it has no direction to steer along")
    return row / norm


@contextmanager
def steering(model: Any, spec: SteeringSpec) -> Iterator[None]:
    """Hooks that steer every forward pass inside the ``with`` block (generate's cached steps too).

    A pre-hook on the input embeddings records the token ids of the current forward pass (so the
    "special" position mask is right for prompt and generated tokens alike); a forward hook on the
    decoder block rewrites its output, which may be a tensor or a tuple (transformers versions differ).
    """
    if spec.positions not in POSITIONS:
        raise EvalError(f"positions {spec.positions!r}: expected one of {POSITIONS}")
    if spec.mode not in MODES:
        raise EvalError(f"mode {spec.mode!r}: expected one of {MODES}")
    if spec.mode == "scale" and (spec.sae is None or spec.feature is None):
        raise EvalError("mode 'scale' needs the SAE and the feature index")
    current: dict[str, torch.Tensor] = {}
    special = torch.as_tensor(list(spec.special_ids), dtype=torch.int64)

    def record_ids(_module: Any, args: tuple) -> None:
        current["ids"] = args[0]

    def shift(hidden: torch.Tensor) -> torch.Tensor:
        direction = spec.direction.to(hidden.device, hidden.dtype)
        if spec.mode == "add":
            delta = spec.alpha * direction
        else:
            act = spec.sae.encode(hidden.float())[..., spec.feature].to(hidden.dtype)
            delta = (spec.alpha - 1.0) * act[..., None] * direction
        if spec.positions == "special":
            mask = torch.isin(current["ids"], special.to(current["ids"].device))[..., None]
            hidden = torch.where(mask, hidden + delta, hidden)
        else:
            hidden = hidden + delta
        return hidden

    handles = [model.get_input_embeddings().register_forward_pre_hook(record_ids),
               decoder_layers(model)[spec.layer].register_forward_hook(
                   lambda _m, _a, output: map_block_output(output, shift))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy reply to one user turn rendered with the chat template: (text, new token ids)."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    input_ids = enc["input_ids"].to(model.device)
    out = model.generate(input_ids=input_ids, attention_mask=enc["attention_mask"].to(model.device),
                         do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    new = out[0, input_ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


# ------------------------------------------------------------------------------- the experiment
def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _likelihood_lines(lik: dict | None) -> list[str]:
    if lik is None:
        return []
    from .intervention_tables import markdown

    return ["## Reference-reply likelihood under steering (no judge)", "", markdown(lik), ""]


def _markdown(summary: dict, rows: list[dict]) -> str:
    judge = summary["judge"]
    note = [f"**Reply scores {judge['note']}**", ""] if judge and not judge.get("scores_meaningful", True) else []
    lines = [f"# Special-token intervention: {summary['sae']}", "", *note,
             f"model `{summary['model']}`, layer {summary['layer']}, mode `{summary['mode']}`, direction "
             f"`{summary.get('direction')}`, positions "
             f"`{summary['positions']}`, {summary['n_prompts']} prompts, greedy, max_new_tokens "
             f"{summary['max_new_tokens']}, judge: {summary['judge']['model'] if summary['judge'] else 'none'}", "",
             *_likelihood_lines(summary.get("likelihood")),
             "## Generated replies" + ("" if summary.get("generated", True) else " (not run: --no-steer-generate)"), "",
             f"Unmodified model: mean quality {summary['unmodified_mean_score']}", "",
             "| feature | alpha | mean score (1-10) | delta vs unmodified | scored | identical to unmodified |",
             "|---|---|---|---|---|---|"]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    for r in rows:
        lines.append(f"| {r['feature']} | {r['alpha']:g} | {fmt(r['mean_score'])} | "
                     f"{fmt(r['delta_vs_unmodified'])} | {r['n_scored']}/{len(r['replies'])} | "
                     f"{r['n_identical_to_unmodified']}/{len(r['replies'])} |")
    lines += ["", "## Features on special tokens (average max activation, top features)", "",
              "| token id | token | samples | top features (feature: value) |", "|---|---|---|---|"]
    for t in summary["special_token_features"]:
        tops = ", ".join(f"{e['feature']}: {e['value']:.2f}" for e in t["top"])
        token = json.dumps(t["token"], ensure_ascii=False).replace("|", "\\|")
        marker = " (marker)" if t.get("marker") else ""
        lines.append(f"| {t['token_id']}{marker} | `{token}` | {t['n_samples']} | {tops} |")
    lines += ["", "## Replies to the first prompt", ""]
    first = summary["prompts"][0] if summary["prompts"] else ""
    base = summary["unmodified"][0]["reply"] if summary["unmodified"] else ""
    lines.append(f"**Prompt:** {first}\n\n**Unmodified:** {base}\n")
    for r in rows:
        reply = r["replies"][0]["reply"] if r["replies"] else ""
        lines.append(f"**feature {r['feature']}, alpha {r['alpha']:g}:** {reply}\n")
    return "\n".join(lines) + "\n"


@dataclass
class InterventionPlan:
    """What one intervention run steers with, fixed before any generation."""

    layer: int
    table: list[dict]  # special_token_features
    features: list[int]
    prompts: list[str]
    direction: str
    special_ids: tuple[int, ...]


def plan_intervention(sae: Any, cache: ActivationCache, *, prompts: list[str] | None, n_features: int,
                      features: list[int] | None, top_k: int, direction: str, tokenizer: Any,
                      token_ranges: list[tuple[int, int]] | None) -> InterventionPlan:
    """Feature discovery (or the given features), checked, with the prompts and special ids to use."""
    if direction not in DIRECTIONS:
        raise EvalError(f"steering direction {direction!r}: expected one of {DIRECTIONS}")
    layer = sae_layer(sae, cache)
    table = special_token_features(sae, cache, top_k=top_k, layer=layer, token_ranges=token_ranges)
    chosen = [int(f) for f in features] if features else pick_features(table, n_features)
    if not chosen:
        raise EvalError(f"{cache.path}: no feature fires on a special-token position of the eval tokens; "
                        f"pass features explicitly")
    for f in chosen:
        if not 0 <= f < sae.d_sae:
            raise EvalError(f"feature {f} outside 0..{sae.d_sae - 1}")
    special_ids = tuple(sorted(set(cache.meta.special_token_ids) | set(tokenizer.all_special_ids)))
    return InterventionPlan(layer=layer, table=table, features=chosen,
                            prompts=list(prompts) if prompts else default_prompts(), direction=direction,
                            special_ids=special_ids)


def generate_all(lm: Any, tok: Any, sae: Any, plan: InterventionPlan, alphas: Sequence[float], positions: str,
                 mode: str, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """Unmodified replies, then one row per (feature, alpha) of steered replies."""
    unmodified = []
    for p in plan.prompts:
        text, ids = generate_reply(lm, tok, p, max_new_tokens)
        unmodified.append({"prompt": p, "reply": text, "token_ids": ids})
    rows = []
    for f in plan.features:
        direction = steering_direction(sae, f, plan.direction if mode == "add" else "raw_folded")
        for alpha in alphas:
            spec = SteeringSpec(layer=plan.layer, direction=direction, alpha=float(alpha), positions=positions,
                                special_ids=plan.special_ids, mode=mode, sae=sae, feature=f)
            replies: list[dict[str, Any]] = []
            with steering(lm, spec):
                for p, base in zip(plan.prompts, unmodified):
                    text, ids = generate_reply(lm, tok, p, max_new_tokens)
                    replies.append({"prompt": p, "reply": text, "token_ids": ids,
                                    "identical_to_unmodified": ids == base["token_ids"]})
            rows.append({"feature": f, "alpha": float(alpha), "replies": replies,
                         "n_identical_to_unmodified": sum(r["identical_to_unmodified"] for r in replies)})
    return unmodified, rows


def judge_replies(judge: JudgeConfig | None, lm: Any, tok: Any, model_id: str, out_dir: Path,
                  unmodified: list[dict], rows: list[dict]) -> tuple[float | None, int]:
    """Score every reply 1-10 (when a judge is given); fills ``score``/``reason`` in place and the rows'
    means. Returns the unmodified mean score and the number of backend calls."""
    calls = 0
    if judge is not None:
        reuse = judge.backend == "local" and judge.model == model_id
        backend = make_backend(judge, **({"model": lm, "tokenizer": tok} if reuse else {}))
        prompt = load_prompt(QUALITY_PROMPT)
        reply_cache = ReplyCache(judge.cache_dir or out_dir / "judge_cache")
        for item in unmodified + [r for row in rows for r in row["replies"]]:
            out = ask(backend, reply_cache, prompt, prompt.messages(instruction=item["prompt"], reply=item["reply"]),
                      parse_quality, judge.retries, QUALITY_FORM)
            item["score"], item["reason"], item["judge_replies"] = out.value, out.reason, out.replies
        calls = backend.calls
    base_mean = _mean([r["score"] for r in unmodified if r.get("score") is not None])
    for row in rows:
        scores = [r["score"] for r in row["replies"] if r.get("score") is not None]
        row["n_scored"], row["mean_score"] = len(scores), _mean(scores)
        row["delta_vs_unmodified"] = (None if row["mean_score"] is None or base_mean is None
                                      else row["mean_score"] - base_mean)
    return base_mean, calls


def run_intervention(sae: Any, cache: ActivationCache | Path, out_dir: Path, *, prompts: list[str] | None = None,
                     alphas: tuple = (0, 15, 25, 50), n_features: int = 1, positions: str = "all",
                     max_new_tokens: int = 48, judge: JudgeConfig | None = None, features: list[int] | None = None,
                     mode: str = "add", direction: str = "unit", top_k: int = 5, model_id: str | None = None,
                     model: tuple[Any, Any] | None = None, device: str = "cpu",
                     token_ranges: list[tuple[int, int]] | None = None, name: str | None = None,
                     generate: bool = True, likelihood: dict[str, Any] | None = None,
                     frequency: np.ndarray | None = None) -> dict:
    """Run the experiment described in the module docstring on a loaded SAE (or its folder) and an opened
    cache (or its path); ``model`` may pass a loaded (model, tokenizer), else the model is loaded on
    ``device``; ``token_ranges`` restricts feature discovery to those cache tokens.

    ``model_id`` defaults to the cache's model (the one the SAE was trained on). ``generate`` off skips
    the generated (and judged) replies. ``likelihood`` (keyword arguments of ``steer_likelihood.measure``:
    n_conversations, reply_tokens, n_random, n_matched, seed) adds the judge-free measurement on held-out
    conversations of ``token_ranges``, against its controls; ``frequency`` gives the features' activation
    frequencies for the matched control (else computed on ``token_ranges``). Returns a JSON-safe
    summary with ``rows`` (feature, alpha, mean_score, delta_vs_unmodified, replies ...),
    ``unmodified_mean_score``, ``likelihood``, ``special_token_features`` and ``files``.
    """
    t0 = time.time()
    if positions not in POSITIONS or mode not in MODES:
        raise EvalError(f"positions {positions!r} / mode {mode!r}: expected one of {POSITIONS} / {MODES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache.open(cache)
    label = name or str(sae)
    sae = sae if isinstance(sae, LoadedSAE) else load_sae(Path(sae))
    model_id = model_id or cache.meta.model_id
    lm, tok = model if model is not None else (load_model(model_id, device=device), load_tokenizer(model_id))
    if int(lm.config.get_text_config().hidden_size) != sae.d_in:
        raise EvalError(f"model {model_id!r} has d_model {lm.config.get_text_config().hidden_size}, "
                        f"SAE d_in {sae.d_in}")
    plan = plan_intervention(sae, cache, prompts=prompts, n_features=n_features, features=features, top_k=top_k,
                             direction=direction, tokenizer=tok, token_ranges=token_ranges)
    lik = None
    if likelihood is not None:
        from .steer_likelihood import measure  # imported here: it builds on this module's steering

        lik = measure(lm, sae, cache, layer=plan.layer, features=plan.features, alphas=alphas,
                      token_ranges=token_ranges, positions=positions, special_ids=plan.special_ids,
                      frequency=frequency, **likelihood)
    sae = sae.to(lm.device)  # the steering hook (scale mode) encodes on the model's device
    unmodified, rows = (generate_all(lm, tok, sae, plan, alphas, positions, mode, max_new_tokens) if generate
                        else ([], []))
    base_mean, calls = judge_replies(judge if generate else None, lm, tok, model_id, out_dir, unmodified, rows)
    summary = {"sae": label, "cache": str(cache.path), "model": model_id, "layer": plan.layer, "mode": mode,
               "direction": plan.direction if mode == "add" else None, "positions": positions,
               "alphas": [float(a) for a in alphas], "features": plan.features, "max_new_tokens": max_new_tokens,
               "n_prompts": len(plan.prompts), "prompts": plan.prompts, "special_ids": list(plan.special_ids),
               "discovery_token_ranges": [list(r) for r in token_ranges] if token_ranges is not None else None,
               "judge": judge.describe() if judge else None, "judge_prompt": QUALITY_PROMPT if judge else None,
               "judge_backend_calls": calls, "special_token_features": plan.table, "unmodified": unmodified,
               "unmodified_mean_score": base_mean, "rows": rows, "generated": generate, "likelihood": lik}
    json_file, md_file = out_dir / "intervention.json", out_dir / "intervention.md"
    json_file.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    md_file.write_text(_markdown(summary, rows), encoding="utf-8")
    summary["files"] = {"json": str(json_file), "markdown": str(md_file)}
    summary["seconds"] = round(time.time() - t0, 2)
    return summary
