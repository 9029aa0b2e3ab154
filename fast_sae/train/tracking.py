"""Experiment tracking: a train run's curves, configuration and end-of-run table on Weights & Biases.

One W&B run per ``train`` run, every SAE of the grid in it (keys ``<sae>/<metric>``, so W&B shows
one section per SAE), not one W&B run per SAE. Why: the grid is one experiment (one pass over one
data stream under one schedule, in one process, with one resume), so one run holds what belongs
together: one config, one resume id, one set of system metrics; one W&B run per SAE would start
dozens of runs in one process and split a resume over as many ids. What one-run-per-SAE gives
(comparing SAEs in W&B's runs table) the end-of-run table gives here: it is logged as a W&B table
(``eval/saes``, one row per SAE, e.g. for an L0-MSE scatter) and each SAE's held-out scores are
summary keys (``<sae>/eval/<metric>``).

Cost: only the rows ``metrics.jsonl`` gets, at the same ``--log-every`` points, already computed,
and the training thread only queues them: a sender thread hands them to wandb (which passes them
to its own service process) and keeps the resume state, so a step never waits for W&B, even on a
machine so loaded that a wandb call or a file write takes tens of milliseconds (bench/tracking.py
measures it). W&B starts once, before the first step (~2 s; more on a loaded machine).

Never fails a run: wandb is optional (``pip install fast-sae[tracking]``) and every call to it is
guarded; the first error (no wandb, no API key, the W&B service gone, a full disk...) is one
warning line, tracking stops, training goes on, and metrics.jsonl still has every point.

Resume: the W&B run id is kept in ``RUN_DIR/wandb_run.json`` with the last step W&B was sent; a
rerun of the command continues the same W&B run (``resume="allow"``) and sends only later steps,
so no point is logged twice (a resumed run replays steps past its last checkpoint bit for bit;
W&B already has those). Tracking first asked for on a resumed run starts a W&B run that gets the
earlier points from metrics.jsonl first. Offline (``--wandb-mode offline`` or ``WANDB_MODE=offline``,
no network) each session writes ``RUN_DIR/wandb/offline-run-*-<id>/``; ``wandb sync --id <id>`` of
those folders uploads them as the one run (printed at the end).
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .runfiles import read_metrics, write_text_atomic

STATE = "wandb_run.json"
TRAIN_KEYS = ("mse", "mse_no_pos0", "mse_normalized", "explained_variance", "l0", "dead_fraction",
              "sparsity_coefficient")
EVAL_KEYS = ("mse", "mse_special", "explained_variance", "l0", "dead_fraction", "never_fired_on_eval", "eval_tokens")
TABLE_COLUMNS = ("sae", "layer", "architecture", "d_sae", "sparsity", *EVAL_KEYS, "held_out")


def history_rows(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """metrics.jsonl train rows -> one W&B history row per step: ``<sae>/<metric>`` plus the shared
    ``train/lr`` and ``train/tokens`` (None values, e.g. a TopK SAE's sparsity coefficient, left out)."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("split") != "train":
            continue
        step = out.setdefault(int(r["step"]), {})
        step.update({f"{r['sae']}/{k}": r[k] for k in TRAIN_KEYS if r.get(k) is not None})
        step.update({f"train/{k}": r[k] for k in ("lr", "tokens") if r.get(k) is not None})
    return out


class Tracker:
    """The W&B run of one train run, used by the main process only; without ``wandb_project`` (or
    with ``wandb_mode`` disabled) every method does nothing."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.echo = echo
        self.enabled = cfg.wandb_project is not None and cfg.wandb_mode != "disabled"
        self.seconds = 0.0  # spent in wandb calls (start and finish included), for the end-of-run line
        self.log_seconds = 0.0  # spent by the training thread at the --log-every points (queueing)
        self.points = 0  # logging steps sent
        self._run: Any = None
        self._last = 0  # the last step the W&B run holds
        # history rows by step, a threading.Event to set once all before it are sent, or None: stop
        self._queue: queue.Queue[dict[int, dict[str, Any]] | threading.Event | None] = queue.Queue()
        self._sender: threading.Thread | None = None

    # ------------------------------------------------------------------ guard
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Time a wandb call; any error becomes one warning line and turns tracking off."""
        t = time.perf_counter()
        try:
            yield
        except Exception as exc:  # a tracker must never stop training, whatever wandb raises
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            why = "wandb is not installed (pip install 'fast-sae[tracking]')" if isinstance(exc, ImportError) \
                else f"{what}: {type(exc).__name__}: {first}"
            self.echo(f"warning: W&B tracking stopped ({why}); training goes on and "
                      f"{self.run_dir / 'metrics.jsonl'} has every point")
            self.enabled = False
            self._close_quietly()
        finally:
            self.seconds += time.perf_counter() - t

    def _close_quietly(self) -> None:
        run, self._run = self._run, None
        try:
            if run is not None:
                run.finish(exit_code=1, quiet=True)
        except Exception:  # already broken; the warning has been given
            pass
        try:
            import wandb

            wandb.teardown(exit_code=1)
        except Exception:
            pass

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        f = self.run_dir / STATE
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            return {}
        same = isinstance(doc, dict) and isinstance(doc.get("id"), str) and \
            (doc.get("project"), doc.get("entity")) == (self.cfg.wandb_project, self.cfg.wandb_entity)
        return doc if same else {}  # another project: a new W&B run

    def _save_state(self) -> None:
        write_text_atomic(self.run_dir / STATE, json.dumps({
            "id": self._run.id, "project": self.cfg.wandb_project, "entity": self.cfg.wandb_entity,
            "last_step": self._last}))

    # ------------------------------------------------------------------ the run
    def start(self, run_config: dict[str, Any], metrics_file: Path, start_step: int) -> None:
        """Open (or continue) the W&B run and send what metrics.jsonl has that W&B lacks (up to
        ``start_step``, where training resumes)."""
        if not self.enabled:
            return
        with self._guard("wandb.init"):
            import wandb

            state = self._state()
            kwargs: dict[str, Any] = {
                "project": self.cfg.wandb_project, "entity": self.cfg.wandb_entity,
                "name": self.cfg.wandb_run_name or self.run_dir.resolve().name, "dir": str(self.run_dir),
                "settings": wandb.Settings(console="off", quiet=True)}
            if self.cfg.wandb_mode is not None:
                kwargs["mode"] = self.cfg.wandb_mode
            if state:
                kwargs.update(id=state["id"], resume="allow")
                self._last = int(state.get("last_step") or 0)
            self._run = wandb.init(**kwargs)
            self._run.config.update(run_config, allow_val_change=True)
            self._save_state()
            where = "offline" if self._run.offline else getattr(self._run, "url", None) or "online"
            self.echo(f"wandb: run {self._run.id} ({where}), "
                      + (f"continued after step {self._last}" if state else "new"))
        if self.enabled:
            self._sender = threading.Thread(target=self._send_queued, name="wandb-sender", daemon=True)
            self._sender.start()
            self._queue.put(history_rows([r for r in read_metrics(metrics_file) if r.get("step", 0) <= start_step]))

    def log(self, rows: list[dict[str, Any]]) -> None:
        """The rows just appended to metrics.jsonl (one logging step, every SAE): queued for the sender."""
        if self.enabled and self._sender is not None:
            t = time.perf_counter()
            self._queue.put(history_rows(rows))
            self.log_seconds += time.perf_counter() - t

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until the sender has handed every queued step to wandb; a W&B that takes longer than
        ``timeout`` seconds is given up (one warning)."""
        if self._sender is None or not self.enabled:
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            self.echo(f"warning: W&B tracking stopped (wandb took over {timeout:.0f} s to take the last points); "
                      f"{self.run_dir / 'metrics.jsonl'} has every point")
            self.enabled = False

    def _send_queued(self) -> None:
        """The sender thread: every queued history, in order, until told to stop."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
            elif self.enabled:
                self._send(item)

    def _send(self, steps: dict[int, dict[str, Any]]) -> None:
        new = [s for s in sorted(steps) if s > self._last]
        if not new:
            return
        with self._guard("wandb.log"):
            for s in new:
                self._run.log(steps[s], step=s)
                self._last = s
                self.points += 1
            self._save_state()

    def summary(self, rows: list[dict[str, Any]], steps: int, tokens: int) -> None:
        """The end-of-run table: ``<sae>/eval/<metric>`` summary keys and the ``eval/saes`` table."""
        self.flush()
        if not self.enabled:
            return
        with self._guard("wandb summary"):
            import wandb

            values: dict[str, Any] = {"status": "finished", "steps": steps, "tokens": tokens}
            for r in rows:
                values.update({f"{r['sae']}/eval/{k}": r[k] for k in EVAL_KEYS if r.get(k) is not None})
            self._run.summary.update(values)
            table = wandb.Table(columns=list(TABLE_COLUMNS), data=[[r.get(c) for c in TABLE_COLUMNS] for r in rows])
            self._run.summary["eval/saes"] = table

    def finish(self, failed: bool = False) -> None:
        """Close the W&B run (and say how to upload an offline one)."""
        self.flush()
        if self._sender is not None:
            self._queue.put(None)
            self._sender = None
        if not self.enabled or self._run is None:
            return
        run_id, offline = self._run.id, self._run.offline
        with self._guard("wandb.finish"):
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
        if self.enabled:
            self.echo(f"wandb: {self.points} logging steps sent, {self.seconds:.2f} s in wandb calls (start, "
                      f"sender, finish); {self.log_seconds:.4f} s at the training thread's log points")
            if offline:
                entity = f" -e {self.cfg.wandb_entity}" if self.cfg.wandb_entity else ""
                self.echo(f"wandb: offline run; upload it with: wandb sync --id {run_id} -p {self.cfg.wandb_project}"
                          f"{entity} {self.run_dir}/wandb/offline-run-*-{run_id}")
