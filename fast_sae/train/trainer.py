"""The training run: one pass over the cache feeding every SAE of the grid.

Flow: open and check the cache -> split off held-out sequences -> this process's share of the
grid (distributed.py) -> memory check -> normalisation factors and b_dec init -> stacks of
same-shape SAEs (saes/) with one Adam each -> for every batch (read once per layer, buffer.py),
a step of every stack -> metrics, checkpoints -> held-out evaluation -> folded SAELens-style
checkpoints (export.py) and an end-of-run table.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import ActivationCache, CacheError
from fast_sae.redact import redact_tree
from fast_sae.saeio import CheckpointConfig, Normalization, TrainingData, id_ranges, resid_post_hook

from .buffer import BatchOrder, mixing_half
from .checkpoint import Checkpointer
from .config import GridConfig, SAESpec, TrainConfig, check_widths
from .distributed import Dist, init_distributed, partition
from .errors import RunError
from .evaluation import evaluate_groups
from .export import cache_record, run_record, save_group
from .loader import DataSplit, Prefetcher, TokenStream, readers_for
from .memory import estimate
from .normalize import initial_b_dec, normalization, normalization_source, sample_indices
from .report import format_table
from .resume import check_state, is_int
from .runfiles import RunLock, append_jsonl, read_metrics, remove_stale_temps, truncate_metrics, write_text_atomic
from .saes import GROUP_CLASSES, SAEGroup
from .saes.sparse import spec_decoder_path
from .schedule import lr_at, sparsity_scale_at
from .tracking import Tracker

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
B_DEC_SAMPLE_TOKENS = 16384


@dataclass
class RunResult:
    status: str  # "finished" | "stopped" | "already finished"
    run_dir: Path
    step: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def group_key(spec: SAESpec, d_in: int, decoder_path: str) -> str:
    """SAEs stacked together: same layer, architecture, width and decoder path. The path is chosen
    per SAE (by its own k), so an SAE trains the same way whatever else is in the grid."""
    key = f"L{spec.layer}_{spec.architecture}_x{spec.expansion_factor}"
    return key + "_sparse" if spec_decoder_path(spec, d_in, decoder_path) == "sparse" else key


def _cache_identity(cache: ActivationCache) -> dict[str, Any]:
    m = cache.meta
    return {"model_id": m.model_id, "d_model": m.d_model, "n_tokens": m.n_tokens, "n_sequences": m.n_sequences,
            "regime": m.regime, "dataset_fingerprint": m.dataset_fingerprint, "dtype": m.dtype}


def _comparable(run_cfg: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the folder's: every setting that changes what it trains."""
    unused = TrainConfig.fields_for(list(run_cfg["grid"].get("architectures") or []))
    skip = {"device", "max_memory_gb", "checkpoint_every"} | unused
    train = {k: v for k, v in run_cfg["train"].items() if k not in skip and not k.startswith("wandb_")}
    return {"train": train, "grid": run_cfg["grid"], "cache": run_cfg["cache"], "world_size": run_cfg["world_size"]}


def _check_run_config(doc: Any, f: Path) -> None:
    """The fields of a recorded run configuration that a resume reads, by type, before any use."""
    bad = None
    if not isinstance(doc, dict):
        bad = f"is {type(doc).__name__}, expected a JSON object"
    else:
        for key in ("train", "grid", "cache"):
            if not isinstance(doc.get(key), dict):
                bad = f"field {key!r} is {str(doc.get(key))[:40]}, expected an object"
                break
        else:
            if not isinstance(doc["grid"].get("architectures") or [], list):
                bad = f"field 'grid.architectures' is {str(doc['grid'].get('architectures'))[:40]}, expected a list"
            elif not is_int(doc.get("world_size")) or doc["world_size"] < 1:
                bad = f"field 'world_size' is {str(doc.get('world_size'))[:40]}, expected a positive integer"
    if bad is not None:
        raise RunError(f"{f}: corrupt run configuration ({bad}); use another --out")


def check_run_folder(run_dir: Path, run_cfg: dict[str, Any]) -> None:
    """A run folder belongs to one configuration: refuse to resume it with another."""
    f = run_dir / RUN_CONFIG
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
        raise RunError(f"{f}: corrupt run configuration (not JSON); use another --out") from None
    _check_run_config(old, f)
    old_c, new_c = _comparable(old), _comparable(run_cfg)
    if old_c == new_c:
        return
    oc, nc = old_c["cache"], new_c["cache"]
    if oc.get("d_model") != nc.get("d_model"):
        raise RunError(f"d_model mismatch: {run_dir} was trained on a cache with d_model {oc.get('d_model')}, "
                       f"this cache has d_model {nc.get('d_model')}; use another --out")
    for section in ("cache", "train", "grid"):
        for key in sorted(set(old_c[section]) | set(new_c[section])):
            if old_c[section].get(key) != new_c[section].get(key):
                raise RunError(f"{run_dir} holds a run with {section} {key} = {old_c[section].get(key)!r}, "
                               f"now {new_c[section].get(key)!r}; rerun the same command or use another --out")
    raise RunError(f"{run_dir} was started with {old_c['world_size']} processes, now {new_c['world_size']}; "
                   f"resume with the same number")


class Trainer:
    def __init__(self, cache_path: str | Path, run_dir: str | Path, cfg: TrainConfig, grid: GridConfig,
                 echo: Callable[[str], None] = print, progress: bool = True) -> None:
        self.cfg = cfg
        self.grid = grid
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.progress = progress
        cfg.validate()
        self.cache = ActivationCache.open(cache_path)
        self.specs = grid.specs()
        check_widths(self.specs, self.cache.meta.d_model)
        for layer in sorted({s.layer for s in self.specs}):
            if layer not in self.cache.meta.layers:
                raise CacheError(f"{self.cache.path}: layer {layer} not in cache (layers: {self.cache.meta.layers})")
        self.d_in = self.cache.meta.d_model
        self.split = DataSplit.from_cache(self.cache, cfg.eval_sequences)
        if self.split.train_tokens < cfg.batch_tokens:
            raise RunError(f"only {self.split.train_tokens} training tokens, fewer than one batch ({cfg.batch_tokens})")
        self.total_steps = cfg.steps()
        self.dist: Dist = Dist()
        train_range = (0, self.split.train_tokens)  # the normalisation statistic reads training tokens only
        self.norm_source, self.norm_range = (self.cache, train_range) if cfg.normalize_from is None else \
            normalization_source(cfg.normalize_from, self.cache, train_range, sorted({s.layer for s in self.specs}))
        self.norms: dict[int, Normalization] = {}
        self._data_record: TrainingData | None = None
        self.tracker = Tracker(cfg, self.run_dir, echo)  # started by the main process only

    # ------------------------------------------------------------------ setup
    def _run_config(self) -> dict[str, Any]:
        """The run's configuration as run_config.json records it (a URL's credentials hidden, the same
        way on every call, so a resume compares like with like)."""
        return redact_tree({"train": dataclasses.asdict(self.cfg), "grid": dataclasses.asdict(self.grid),
                            "cache": _cache_identity(self.cache), "cache_path": str(self.cache.path.resolve()),
                            "world_size": self.dist.world, "split": self.split.to_json(),
                            "saes": [s.name for s in self.specs]})

    def _build_groups(self, specs: list[SAESpec], scales: dict[int, float], stream: TokenStream,
                      resuming: bool) -> dict[str, SAEGroup]:
        b_dec: dict[int, torch.Tensor] = {}
        half = mixing_half(self.cfg.buffer_tokens, self.cfg.batch_tokens)
        n_sample = min(half, self.split.train_tokens, B_DEC_SAMPLE_TOKENS)
        for layer in sorted({s.layer for s in specs}):
            if resuming:  # overwritten by the checkpoint
                b_dec[layer] = torch.zeros(self.d_in)
                continue
            # a seeded random sample of the training tokens, not the first ones in stream order (one topic)
            sample = stream.readers[layer].gather(sample_indices(0, self.split.train_tokens, n_sample, self.cfg.seed)) \
                if self.cfg.b_dec_init == "geometric_median" else np.zeros((1, self.d_in), np.float32)
            b_dec[layer] = initial_b_dec(self.cfg.b_dec_init, sample, self.cache.layer_stats(layer).mean,
                                         scales[layer])
        groups: dict[str, list[SAESpec]] = {}
        for s in specs:
            groups.setdefault(group_key(s, self.d_in, self.cfg.decoder_path), []).append(s)
        out = {}
        for key, members in groups.items():
            cls = GROUP_CLASSES[members[0].architecture]
            out[key] = cls(members, self.d_in, self.cfg, b_dec[members[0].layer]).to(self.cfg.device)
        return out

    def _optimizers(self, groups: dict[str, SAEGroup]) -> dict[str, torch.optim.Optimizer]:
        return {k: g.make_optimizer()
                for k, g in groups.items()}

    # ------------------------------------------------------------------ run
    def run(self, stop_after_steps: int | None = None) -> RunResult:
        """The run, holding the run folder's lock (main process) so a second writer stops at once."""
        self.dist = d = init_distributed(self.cfg.device)
        lock, error = RunLock(self.run_dir), None
        if d.main:
            try:
                if self.run_dir.exists() and not self.run_dir.is_dir():
                    raise RunError(f"--out {self.run_dir}: exists and is not a folder; name a new or existing run "
                                   f"folder")
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise RunError(f"--out {self.run_dir}: cannot create the run folder ({exc.strerror or exc})"
                                   ) from None
                lock.acquire()
                remove_stale_temps(self.run_dir)  # leftovers of killed writers: temp files, <sae>.tmp-<pid>/
                check_run_folder(self.run_dir, self._run_config())
            except RunError as exc:
                error = str(exc)
        failed = True
        try:
            error = d.broadcast(error)
            if error is not None:
                raise RunError(error)
            result = self._run(stop_after_steps)
            failed = False
            return result
        finally:
            self.tracker.finish(failed)
            lock.release()

    def _run(self, stop_after_steps: int | None) -> RunResult:
        d, run_cfg = self.dist, self._run_config()
        summary_file = self.run_dir / SUMMARY
        if summary_file.is_file():
            try:
                doc = json.loads(summary_file.read_text())
            except (ValueError, UnicodeDecodeError):
                doc = None
            rows = doc.get("saes") if isinstance(doc, dict) else None
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise RunError(f"{summary_file}: corrupt run summary (field 'saes' must be a list of objects); "
                               f"move it away to finish the run again")
            if d.main:
                shutil.rmtree(self.run_dir / "checkpoint", ignore_errors=True)  # outlived a finished run
                self.echo(f"{self.run_dir}: run already finished")
                self.echo(format_table(rows))
            return RunResult("already finished", self.run_dir, self.total_steps, rows)

        mine = partition(self.specs, self.d_in, d.world)[d.rank]
        my_layers = sorted({s.layer for s in mine})
        est = estimate(mine, self.d_in, len(my_layers), self.cfg)
        prefix = f"[rank {d.rank}] " if d.active else ""
        self.echo(f"{prefix}{len(mine)} SAEs on layers {my_layers}; {est.line()}")
        fits = est.fits(same_device=not self.cfg.device.startswith("cuda"))
        verdicts = d.gather((fits, est.device_total + est.data, est.host_available))
        bad = None
        if d.main and verdicts:
            bad = next(([i, need, have] for i, (ok, need, have) in enumerate(verdicts) if not ok), None)
        bad = d.broadcast(bad)
        if bad is not None:
            where = f" on process {bad[0]}" if d.active else ""
            raise RunError(f"grid does not fit in memory{where}: estimated {bad[1] / 2**30:.2f} GiB, "
                           f"{bad[2] / 2**30:.2f} GiB available; train fewer or narrower SAEs, lower "
                           f"--batch-tokens/--buffer-tokens, or spread the grid over more processes")
        if d.main:
            write_text_atomic(self.run_dir / RUN_CONFIG, json.dumps(run_cfg, indent=2))

        self.norms = {layer: normalization(self.norm_source, layer, self.cfg.normalize, self.norm_range)
                      for layer in my_layers}
        scales = {layer: n.factor for layer, n in self.norms.items()}
        stream = TokenStream(readers_for(self.cache, my_layers, scales), self.split.train_tokens)
        ckpt = Checkpointer(self.run_dir, d, echo=self.echo)
        state = ckpt.load()
        groups = self._build_groups(mine, scales, stream, resuming=state is not None)
        optims = self._optimizers(groups)
        start = 0
        if state is not None:
            where, pointer_step = ckpt.loaded
            start = check_state(state, groups, optims, self.total_steps, pointer_step, where)  # before any use
            try:
                for k, g in groups.items():
                    g.load_state_dict(state["groups"][k])
                    optims[k].load_state_dict(state["optims"][k])
                    for st in optims[k].state.values():  # the fused Adam needs contiguous moments
                        for name, value in st.items():
                            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                                st[name] = value.contiguous()
                torch.set_rng_state(state["torch_rng"])
            except (RuntimeError, ValueError, TypeError, KeyError) as exc:
                raise RunError(f"{where}: cannot be loaded ({str(exc).splitlines()[0][:200] if str(exc) else exc!r}); "
                               f"delete {ckpt.dir} to restart") from None
            if d.main:
                self.echo(f"resuming {self.run_dir} at step {start} of {self.total_steps}")
        if d.main:
            truncate_metrics(self.run_dir / METRICS, start)
            self.tracker.start(run_cfg, self.run_dir / METRICS, start)

        step = self._loop(groups, optims, stream, scales, start, ckpt, stop_after_steps)
        if step < self.total_steps:
            return RunResult("stopped", self.run_dir, step)
        return self._finish(groups, scales, mine, ckpt)

    def _save_checkpoint(self, ckpt: Checkpointer, step: int, groups: dict[str, SAEGroup],
                         optims: dict[str, torch.optim.Optimizer]) -> None:
        ckpt.save(step, {"step": step, "groups": {k: g.state_dict() for k, g in groups.items()},
                         "optims": {k: o.state_dict() for k, o in optims.items()},
                         "torch_rng": torch.get_rng_state()})

    def _loop(self, groups: dict[str, SAEGroup], optims: dict[str, torch.optim.Optimizer], stream: TokenStream,
              scales: dict[int, float], start: int, ckpt: Checkpointer, stop_after: int | None) -> int:
        cfg, d, total = self.cfg, self.dist, self.total_steps
        b = cfg.batch_tokens
        by_layer: dict[int, list[str]] = {}
        for k, g in groups.items():
            by_layer.setdefault(g.specs[0].layer, []).append(k)
        order = BatchOrder(cfg.order, stream, b, cfg.buffer_tokens, cfg.seed)
        positions = self.cache.positions()
        bar = None
        if self.progress and d.main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True)
        step = start
        prefetch = Prefetcher(lambda: order.blocks(start, total), depth=1 if cfg.order == "mixing" else 2)
        try:
            for block in prefetch:
                acts = {layer: t.to(cfg.device, non_blocking=True) for layer, t in block.acts.items()}
                not_sink = torch.from_numpy(positions[block.token_index] != 0).to(cfg.device)
                for i in range(block.n_steps):
                    step = block.first_step + i
                    lr = lr_at(step, cfg, total)
                    sparsity = sparsity_scale_at(step, cfg, total)
                    for layer, keys in by_layer.items():
                        x = acts[layer][i * b:(i + 1) * b]
                        for k in keys:
                            self._step(groups[k], optims[k], x, lr, sparsity, not_sink[i * b:(i + 1) * b])
                    done = step + 1
                    if bar is not None:
                        bar.update(1)
                    if done % cfg.log_every == 0 or done == total:
                        self._log(groups, scales, done, lr, sparsity)
                        note = prefetch.wait_note()
                        if note is not None:
                            self.echo(f"[rank {d.rank}] {note}" if d.active else note)
                    if stop_after is not None and done >= stop_after and done < total:
                        self._save_checkpoint(ckpt, done, groups, optims)
                        return done
                    if done % cfg.checkpoint_every == 0 and done < total:
                        self._save_checkpoint(ckpt, done, groups, optims)
        finally:
            prefetch.close()
            if bar is not None:
                bar.close()
            self.echo(f"[rank {d.rank}] {prefetch.total_note()}" if d.active else prefetch.total_note())
        return total if total > start else start

    @staticmethod
    def _step(group: SAEGroup, opt: torch.optim.Optimizer, x: torch.Tensor, lr: float, sparsity: float,
              not_sink: torch.Tensor | None = None) -> None:
        for pg in opt.param_groups:
            pg["lr"] = lr * pg.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        out = group.forward_loss(x, sparsity)
        out.loss.backward()
        group.clip_grad_norm_(group.cfg.grad_clip)
        opt.step()
        group.after_step(out, x, not_sink)

    def _log(self, groups: dict[str, SAEGroup], scales: dict[int, float], done: int, lr: float,
             sparsity: float) -> None:
        lines = []
        for g in groups.values():
            for spec, m in zip(g.specs, g.take_window_metrics()):
                s2 = scales[spec.layer] ** 2
                coef = None if spec.k is not None else spec.sparsity * sparsity
                lines.append({"step": done, "tokens": done * self.cfg.batch_tokens, "split": "train", "sae": spec.name,
                              "layer": spec.layer, "architecture": spec.architecture,
                              "mse": m["mse_normalized"] / s2, "mse_normalized": m["mse_normalized"],
                              "mse_no_pos0": None if m["mse_normalized_no_pos0"] is None
                              else m["mse_normalized_no_pos0"] / s2,
                              "explained_variance": m["explained_variance"], "l0": m["l0"],
                              "dead_fraction": m["dead_fraction"], "lr": lr, "sparsity_coefficient": coef})
        gathered = self.dist.gather(lines)
        if self.dist.main and gathered:
            order = {s.name: i for i, s in enumerate(self.specs)}
            rows = sorted((line for part in gathered for line in part), key=lambda r: order[r["sae"]])
            append_jsonl(self.run_dir / METRICS, rows)
            self.tracker.log(rows)

    def _finish(self, groups: dict[str, SAEGroup], scales: dict[int, float], mine: list[SAESpec],
                ckpt: Checkpointer) -> RunResult:
        d = self.dist
        rows = evaluate_groups(self.cache, self.split, groups, scales, self.cfg)
        last_train = self._last_train_metrics() if d.main else {}
        for g in groups.values():
            for i, spec in enumerate(g.specs):
                cfg_json = self.sae_cfg(spec, g)
                save_group(self.run_dir / spec.name, g, i, scales[spec.layer], cfg_json)
        gathered = d.gather(rows)
        result_rows: list[dict[str, Any]] = []
        if d.main and gathered:
            order = {s.name: i for i, s in enumerate(self.specs)}
            result_rows = sorted((r for part in gathered for r in part), key=lambda r: order[r["sae"]])
            append_jsonl(self.run_dir / METRICS,
                         [{"step": self.total_steps, "split": "eval", **r} for r in result_rows])
            for r in result_rows:
                r.setdefault("train_explained_variance", last_train.get(r["sae"], {}).get("explained_variance"))
            write_text_atomic(self.run_dir / SUMMARY, json.dumps({
                "status": "finished", "steps": self.total_steps, "tokens": self.total_steps * self.cfg.batch_tokens,
                "saes": result_rows}, indent=2))
            self.tracker.summary(result_rows, self.total_steps, self.total_steps * self.cfg.batch_tokens)
            self.echo(format_table(result_rows))
        ckpt.remove()
        return RunResult("finished", self.run_dir, self.total_steps, result_rows)

    def _last_train_metrics(self) -> dict[str, dict[str, Any]]:
        return {r["sae"]: r for r in read_metrics(self.run_dir / METRICS) if r.get("split") == "train"}

    def _training_data(self) -> TrainingData:
        """The training pool and the held-out part, as token, sequence and document ranges (once per run)."""
        if self._data_record is None:
            split, doc_ids = self.split, self.cache.doc_ids()
            self._data_record = TrainingData(
                cache=cache_record(self.cache), train_token_range=(0, split.train_tokens),
                eval_token_range=split.eval_range,
                eval_sequence_ranges=[(split.eval_first_sequence, split.n_sequences)],
                train_doc_ids=id_ranges(doc_ids[:split.train_tokens]),
                eval_doc_ids=id_ranges(doc_ids[split.train_tokens:]))
        return self._data_record

    def sae_cfg(self, spec: SAESpec, group: SAEGroup) -> CheckpointConfig:
        """The checkpoint's configuration: what the SAE is, what it was trained on and how."""
        m, cfg = self.cache.meta, self.cfg
        return CheckpointConfig(
            architecture=spec.architecture, d_in=self.d_in, d_sae=spec.d_sae(self.d_in),
            hook_name=resid_post_hook(spec.layer), k=spec.k, apply_b_dec_to_input=group.apply_b_dec_to_input,
            model_name=m.model_id, model_revision=m.model_revision, context_size=m.context_size,
            dataset_path=m.dataset, prepend_bos=False, weights_folded=True,
            normalization=self.norms[spec.layer], training=self._training_data(),
            run=run_record(spec, cfg, self.total_steps, self.d_in, self.split.train_tokens))
