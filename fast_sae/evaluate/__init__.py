"""Stage 3: score SAE checkpoints against an activation cache (and the model, for downstream loss).

Modules, one job each:
- ``errors``: ``EvalError``, the one-line input error every module raises;
- ``sources``: find SAE checkpoints in run folders, check them against a cache, pick eval sequences;
- ``reconstruction``: model-free metrics streamed from the cache (paper eq. 7 MSE, MSE_st, FVE, L0, ...);
- ``downstream``: LM loss with the SAE reconstruction spliced into the model;
- ``probe_labels`` / ``logistic`` / ``probes`` / ``probe_tables``: chat-structure sparse probes from the cache;
- ``report`` / ``plots`` / ``compare``: report.json, report.md, PNG figures, FAST vs BT side by side;
- ``runner``: ``run_evaluation(EvalConfig)``, the whole stage as one call;
- ``cli``: the ``pipeline.py evaluate`` and ``pipeline.py compare`` commands.
Interpretability (``evaluate.interpret``) and the special-token intervention (``evaluate.intervention``)
are separate subsystems that the CLI calls behind flags.
"""
from .errors import EvalError

__all__ = ["EvalError"]
