"""L2-regularised binary logistic regression in torch: the classifier of the chat-structure probes.

Why here and not scikit-learn: scikit-learn is not a dependency of the project, and the probes'
problems are small (thousands of tokens × at most d_model features), which a full-batch
deterministic solver in float64 handles in milliseconds to a second on two cores.

Objective: scikit-learn's, so that ``c`` means what its ``C`` means (SAEBench's sparse probing
uses ``LogisticRegression(penalty="l2", C=1.0)``):

    C · Σ_i w_i · logloss(y_i, σ(x̃_i·β + b)) + ½‖β‖²      (the intercept b is not penalised)

- sample weights w_i = n / (2 · n_{y_i}) (class-balanced, Σ w_i = n): on unbalanced labels (the
  first tokens of a reply against the rest) an unweighted probe would learn the majority class;
  with the weights it is scored fairly by balanced accuracy, and on balanced labels w_i = 1.
- x̃ = (x − mean) / sd with the training set's mean and sd per feature (a constant feature stays
  0): the penalty is then the same pressure whatever the scale of an SAE latent or a residual
  dimension, so SAEs of different normalisation are probed alike. (SAEBench fits on raw latent
  activations; on token-level chat labels with SAEs of different scale the standardised fit is
  the fairer comparison.)
- solver: Newton's method with conjugate-gradient steps (truncated Newton, scikit-learn's
  ``newton-cg``: Hessian-vector products only, so any d works) and a backtracking line search, in
  float64, on the objective divided by n (same minimiser), on one thread: these problems are too
  small for a thread pool (its synchronisation made a 400 × 3 fit take 0.5 s instead of 10 ms on a
  loaded two-core machine), and one thread makes the fit deterministic on a given machine. Not
  ``torch.optim.LBFGS``: constructing any torch optimiser imports torch._dynamo (2-4 s per process).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class LogisticProbe:
    """A fitted probe: standardisation and the linear decision function on the standardised features."""

    mean: torch.Tensor  # (d,) float64
    scale: torch.Tensor  # (d,) float64, 1 where the feature is constant
    coef: torch.Tensor  # (d,) float64
    intercept: float
    converged: bool
    n_iter: int

    def decision(self, x: torch.Tensor) -> torch.Tensor:
        """x·β + b on standardised features (> 0: the positive class)."""
        return ((x.double() - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.decision(x) > 0


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_weights(y: torch.Tensor) -> torch.Tensor:
    """n / (2 · n_class) per sample (Σ = n); a label with only one class gets weight 1."""
    n, n_pos = len(y), int(y.sum())
    if n_pos in (0, n):
        return torch.ones(n, dtype=torch.float64)
    return torch.where(y, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).double()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-7) -> LogisticProbe:
    """Fit on ``x`` (n, d) and boolean labels ``y`` (n,); see the module docstring for the objective.
    Stops when the largest gradient entry is below ``tol`` × its starting value (``converged``)."""
    if c <= 0:
        raise ValueError("the inverse regularisation strength c must be > 0")
    with one_thread():
        return _newton_cg(x, y.bool(), c, max_iter, tol)


def _newton_cg(x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int, tol: float) -> LogisticProbe:
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    sd = x.std(0, unbiased=False)
    scale = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    xs = (x - mean) / scale
    target = y.double()
    cw = c * class_weights(y) / n  # per-sample weight of the mean-form objective
    theta = torch.zeros(d + 1, dtype=torch.float64)  # (β, b)

    def objective(t: torch.Tensor) -> float:
        z = xs @ t[:d] + t[d]
        return float((cw * (torch.nn.functional.softplus(z) - target * z)).sum() + 0.5 * (t[:d] @ t[:d]) / n)

    def gradient(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(xs @ t[:d] + t[d])
        r = cw * (p - target)
        return torch.cat([xs.T @ r + t[:d] / n, r.sum()[None]]), cw * p * (1 - p)

    def hess_vec(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = s * (xs @ v[:d] + v[d])
        return torch.cat([xs.T @ q + v[:d] / n, q.sum()[None]])

    g, s = gradient(theta)
    g0 = float(g.abs().max())
    f = objective(theta)
    it, converged = 0, g0 == 0.0
    while not converged and it < max_iter:
        step = _conjugate_gradient(partial(hess_vec, s), -g, min(0.5, float(g.norm()) ** 0.5))
        slope = float(g @ step)
        t = 1.0
        for _ in range(40):  # backtracking (Armijo)
            f_new = objective(theta + t * step)
            if f_new <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        theta, f = theta + t * step, f_new
        g, s = gradient(theta)
        it += 1
        converged = float(g.abs().max()) <= tol * max(g0, 1.0)
    return LogisticProbe(mean=mean, scale=scale, coef=theta[:d].clone(), intercept=float(theta[d]),
                         converged=converged, n_iter=it)


def _conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, rel_tol: float,
                        max_iter: int = 250) -> torch.Tensor:
    """Approximately solve A·v = rhs for symmetric positive definite A (only products A·v are needed)."""
    v = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = float(r @ r)
    stop = (rel_tol * float(rhs.norm())) ** 2
    for _ in range(min(max_iter, len(rhs) + 1)):
        if rr <= stop:
            break
        ap = matvec(p)
        alpha = rr / float(p @ ap)
        v += alpha * p
        r -= alpha * ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return v


def accuracies(y_true: torch.Tensor, y_pred: torch.Tensor) -> tuple[float, float]:
    """(accuracy, balanced accuracy: the mean of the two classes' recalls; with one class, its recall)."""
    y_true, y_pred = y_true.bool(), y_pred.bool()
    acc = float((y_true == y_pred).double().mean()) if len(y_true) else float("nan")
    recalls = [float((y_pred[m] == y_true[m]).double().mean()) for m in (y_true, ~y_true) if bool(m.any())]
    return acc, (sum(recalls) / len(recalls) if recalls else float("nan"))
