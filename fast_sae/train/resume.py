"""Checking a resume state field by field before any of it is used.

Why: a checkpoint is a file in a run folder, and a resume trusts it with the run. Decoding it runs
no code (statefile.py), but its values still steer the run: a ``step`` of 10^9 made the resume
replay the mixing buffer for every step up to it, a string step or a dict where a list belongs
crashed deep in torch, ``2.5`` was taken as 2. So every field is compared with what this run builds
itself (the SAE stacks and their optimizers, fresh, before loading) by type, range and shape, and a
mismatch is one line naming the file and the field. Only then is anything loaded.
"""
from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch

from .errors import RunError

_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what Adam keeps per parameter (+ max_exp_avg_sq with amsgrad)


class _Bad(Exception):
    """A field that is not what the run expects: (field, message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message


def is_int(value: Any) -> TypeGuard[int]:
    """A JSON integer (not a bool, not a float such as 2.5 or 2.0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(value: Any, field: str, like: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise _Bad(field, f"is {type(value).__name__}, expected a tensor")
    if tuple(value.shape) != tuple(like.shape) or value.dtype != like.dtype:
        raise _Bad(field, f"is a {value.dtype} tensor of shape {tuple(value.shape)}, expected {like.dtype} of shape "
                          f"{tuple(like.shape)}")


def _same_kind(value: Any, ref: Any, field: str) -> None:
    """A hyper-parameter of an optimizer's param group: the type of the run's own value."""
    if isinstance(ref, bool) or ref is None:
        if not (value is None or isinstance(value, bool)):
            raise _Bad(field, f"is {value!r}, expected {'a bool' if ref is not None else 'null or a bool'}")
    elif isinstance(ref, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad(field, f"is {value!r}, expected a finite number")
    elif isinstance(ref, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(ref):
            raise _Bad(field, f"is {str(value)[:40]}, expected {len(ref)} values")
        for i, (v, r) in enumerate(zip(value, ref)):
            _same_kind(v, r, f"{field}[{i}]")
    elif isinstance(ref, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
            raise _Bad(field, f"is {type(value).__name__}, expected a tensor of shape {tuple(ref.shape)}")
    elif type(value) is not type(ref):
        raise _Bad(field, f"is {type(value).__name__}, expected {type(ref).__name__}")


def _check_module(doc: Any, reference: dict[str, Any], field: str) -> None:
    if not isinstance(doc, dict):
        raise _Bad(field, f"is {type(doc).__name__}, expected an object of tensors")
    if set(doc) != set(reference):
        missing, extra = sorted(set(reference) - set(doc)), sorted(map(str, set(doc) - set(reference)))
        raise _Bad(field, f"has tensors {extra[:3]} the SAEs lack" if extra else f"lacks tensors {missing[:3]}")
    for name, like in reference.items():
        _tensor(doc[name], f"{field}.{name}", like)


def _check_optimizer(doc: Any, opt: torch.optim.Optimizer, field: str) -> None:
    ref = opt.state_dict()
    if not isinstance(doc, dict) or set(doc) != {"state", "param_groups"}:
        raise _Bad(field, "expected an object with 'state' and 'param_groups'")
    groups = doc["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(ref["param_groups"]):
        raise _Bad(f"{field}.param_groups", f"expected a list of {len(ref['param_groups'])} parameter groups")
    for i, (pg, rpg) in enumerate(zip(groups, ref["param_groups"])):
        where = f"{field}.param_groups[{i}]"
        if not isinstance(pg, dict) or set(pg) != set(rpg):
            raise _Bad(where, f"expected the fields {sorted(rpg)}")
        if pg["params"] != rpg["params"]:
            raise _Bad(f"{where}.params", f"is {str(pg['params'])[:40]}, expected {rpg['params']}")
        for key, rv in rpg.items():
            if key != "params":
                _same_kind(pg[key], rv, f"{where}.{key}")
    params = [p for g in opt.param_groups for p in g["params"]]
    state = doc["state"]
    if not isinstance(state, dict):
        raise _Bad(f"{field}.state", f"is {type(state).__name__}, expected an object")
    for index, entry in state.items():
        where = f"{field}.state.{index}"
        if not is_int(index) or not 0 <= index < len(params):
            raise _Bad(where, f"names parameter {index!r}, expected 0..{len(params) - 1}")
        if not isinstance(entry, dict) or not _ADAM_STATE <= set(entry) <= _ADAM_STATE | {"max_exp_avg_sq"}:
            raise _Bad(where, f"expected the fields {sorted(_ADAM_STATE)}")
        step = entry["step"]
        value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**53:
            raise _Bad(f"{where}.step", f"is {str(step)[:40]}, expected a non-negative step count")
        for key in sorted(set(entry) - {"step"}):
            _tensor(entry[key], f"{where}.{key}", params[index].detach())


def check_state(state: dict[str, Any], groups: dict[str, Any], optims: dict[str, torch.optim.Optimizer],
                total_steps: int, pointer_step: int, where: str) -> int:
    """Validate a loaded resume state against this run's freshly built stacks and optimizers; returns
    the step. Raises RunError naming ``where`` (the state file) and the field."""
    try:
        step = state["step"]
        if not is_int(step) or not 0 <= step <= total_steps:
            raise _Bad("step", f"is {str(step)[:40]}, expected an integer in 0..{total_steps} (the run's steps)")
        if step != pointer_step:
            raise _Bad("step", f"is {step}, but LATEST names step {pointer_step}")
        for name, kind in (("groups", "SAE stacks"), ("optims", "optimizers")):
            doc = state[name]
            if not isinstance(doc, dict) or set(doc) != set(groups):
                got = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
                raise _Bad(name, f"is {str(got)[:80]}, expected the run's {kind} {sorted(groups)}")
        for key, group in groups.items():
            _check_module(state["groups"][key], group.state_dict(), f"groups.{key}")
            _check_optimizer(state["optims"][key], optims[key], f"optims.{key}")
        _tensor(state["torch_rng"], "torch_rng", torch.get_rng_state())
    except _Bad as bad:
        raise RunError(f"{where}: field {bad.field!r} {bad.message}; the checkpoint is damaged, delete its folder "
                       f"to restart") from None
    return int(step)
