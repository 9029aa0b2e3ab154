"""Tables of the judge-free intervention measure (steer_likelihood.py) for report.md, intervention.md and
compare.md. Why apart: compare and report read finished JSON and need no model or torch."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    se = stat.get("se")
    return f"{stat['mean']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")


def markdown(result: dict[str, Any]) -> str:
    """The table of one SAE: per alpha, Δ log-likelihood per reply token (mean ± SE over conversations)."""
    if result.get("skipped"):
        return f"Likelihood measurement skipped: {result['skipped']}"
    head = (f"Reference-reply log-likelihood (mean per reply token, first {result['reply_tokens']} reply tokens, "
            f"{result['n_conversations']} held-out conversations) unsteered: {_cell(result['clean_loglik'])}. "
            f"Δ = steered − unsteered, mean ± SE over conversations; features {result['features']} vs "
            f"{result['n_random_directions']} random unit directions and random features of matched frequency "
            f"{result['matched_features']}; steering at {result['positions']} positions of layer {result['layer']}. "
            f"alpha 0 identical to unsteered: {'yes' if result['alpha0_identical'] else 'NO'}.")
    lines = [head, "", "| alpha | Δ special | Δ random dir. | Δ matched feat. | special − random dir. | "
                       "special − matched feat. |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['alpha']:g} | {_cell(r['special'])} | {_cell(r['random_direction'])} | "
                     f"{_cell(r['matched_feature'])} | {_cell(r['special_minus_random_direction'])} | "
                     f"{_cell(r['special_minus_matched_feature'])} |")
    return "\n".join(lines)


def compare_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """compare.md's table: every SAE's likelihood changes per non-zero alpha, FAST vs BT(F) vs BT(P)."""
    entries = [e for e in entries if e.get("likelihood") and not e["likelihood"].get("skipped")]
    if not entries:
        return []
    lines = ["### Special-token intervention: reference-reply likelihood (no judge)", "",
             "Δ log-likelihood per reply token of held-out reference replies when steering with alpha × the unit "
             "decoder direction (mean ± SE over conversations; steered − unsteered), for the SAE's special-token "
             "features and two controls: random unit directions and random features of matched activation "
             "frequency. special − control is paired per conversation. Higher = the reference reply became more "
             "likely. The judge's reply scores are in each report, counted only where the judge passed its "
             "calibration.", "",
             "| regime | SAE | features | alpha | Δ special | Δ random dir. | Δ matched feat. | "
             "special − random dir. | special − matched feat. | conversations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lik = e["likelihood"]
        for r in lik["rows"]:
            if r["alpha"] == 0:
                continue
            lines.append(f"| {e['regime']} | {e['name']} | {lik['features']} | {r['alpha']:g} | "
                         f"{_cell(r['special'])} | {_cell(r['random_direction'])} | {_cell(r['matched_feature'])} | "
                         f"{_cell(r['special_minus_random_direction'])} | "
                         f"{_cell(r['special_minus_matched_feature'])} | {lik['n_conversations']} |")
    return lines + [""]
