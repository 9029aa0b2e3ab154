"""The end-of-run table: one line per SAE of the grid."""
from __future__ import annotations

import math
from typing import Any


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no SAEs)"
    head = ["sae", "d_sae", "mse(raw)", "mse_special", "expl.var", "L0", "dead%", "eval tokens"]
    body = [[r["sae"], str(r.get("d_sae", "")), _fmt(r.get("mse"), ".4g"), _fmt(r.get("mse_special"), ".4g"),
             _fmt(r.get("explained_variance"), ".4f"), _fmt(r.get("l0"), ".1f"),
             _fmt(100 * r["dead_fraction"] if r.get("dead_fraction") is not None else None, ".1f"),
             f"{r.get('eval_tokens', '')}{'' if r.get('held_out', True) else ' (train)'}"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)
