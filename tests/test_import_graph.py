"""The stages meet only through the cache format (actcache) and the checkpoint format (saeio).

Parses every module of the package and checks what each subpackage imports from the others, so a
stage importing another stage (or the model-free train stage importing the model layer) fails here
rather than in review.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fast_sae"

# shared top-level modules every subpackage may import (fast_sae/options.py: dataclass fields -> CLI options;
# fast_sae/redact.py: hiding credentials in whatever is written or printed)
SHARED = {"options", "redact"}
# subpackage -> the other subpackages it may import
ALLOWED = {
    "actcache": set(),
    "saeio": set(),
    "lm": set(),
    "harvest": {"actcache", "lm"},
    "train": {"actcache", "saeio"},
    "evaluate": {"actcache", "saeio", "lm"},
    # the convergence study chains the stages' public commands, like demo.py, and reads their reports
    "converge": {"actcache", "demo"},
}


def _imported_subpackages(path: Path) -> set[str]:
    """fast_sae subpackages a module imports, absolute or relative."""
    return _imports(path.read_text(), path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imports(source: str, here: tuple[str, ...]) -> set[str]:
    """``here``: the module's dotted name as parts, e.g. ('fast_sae', 'train', 'saes', 'base')."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        names: list[tuple[str, ...]] = []
        if isinstance(node, ast.Import):
            names = [tuple(a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level]
                names = [base + tuple((node.module or "").split(".")) if node.module else base]
            elif node.module:
                names = [tuple(node.module.split("."))]
        for parts in names:
            if len(parts) >= 2 and parts[0] == "fast_sae":
                found.add(parts[1])
    return found


def test_no_stage_imports_another_stage() -> None:
    bad = []
    for sub, allowed in ALLOWED.items():
        for f in sorted((PACKAGE / sub).rglob("*.py")):
            extra = _imported_subpackages(f) - allowed - SHARED - {sub}
            if extra:
                bad.append(f"{f.relative_to(PACKAGE.parent)} imports fast_sae.{', fast_sae.'.join(sorted(extra))}")
    assert not bad, "\n".join(bad)


def test_every_subpackage_is_covered_by_the_rule() -> None:
    subs = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert subs == set(ALLOWED), f"add {sorted(subs - set(ALLOWED))} to ALLOWED with the imports it may make"


def test_the_checker_sees_relative_and_absolute_imports() -> None:
    """The parser itself: relative imports one and two levels up and absolute ones all count."""
    here = ("fast_sae", "train", "saes", "base")
    assert _imports("from ..config import X\n", here) == {"train"}
    assert _imports("from ...evaluate import errors\nimport fast_sae.lm.blocks\n", here) == {"evaluate", "lm"}
    assert _imports("from fast_sae.saeio import load_sae\nimport numpy\n", here) == {"saeio"}
