"""Quiet by default: what a bd-ray job prints, and where Ray's own output goes instead.

A job's console shows bd-ray's progress lines (one per step) and its results. Ray's output --
Ray Data progress bars, Ray's INFO logging, and every line Ray workers print (streamed to the
driver, often twice) -- goes to one log file whose path is printed once, unless the job runs
with ``--verbose`` (``bd_ray.cli``) or ``BD_RAY_VERBOSE=1`` in its environment, which keeps
Ray's defaults.

Worker lines still reach the console when they are bd-ray progress lines: they start with
``[bd-ray`` or are a training step line (``step N/M ...``, printed by rank 0 of the Ray Train
loop). Everything else a worker prints, and Ray's driver-side logging at INFO, is appended to
the log file (``$BD_RAY_LOG_DIR``, default ``<tmp>/bd-ray-logs``, one file per job process).
Ray's own logs stay where Ray puts them (the session directory, ``/tmp/ray/session_latest/logs``).

:func:`bd_ray.ray_connect.connect` applies this around ``ray.init``; jobs need nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["VERBOSE_ENV", "is_verbose", "set_verbose", "log_path", "quiet_env", "quiet_ray_logging", "quiet_ray",
           "is_progress_line"]

VERBOSE_ENV = "BD_RAY_VERBOSE"
_PROGRESS = re.compile(r"^\s*(\[bd-ray|step \d+/\d+ )")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_HANDLER = "bd_ray_quiet"
_lock = threading.Lock()
_log_path: Path | None = None


def is_verbose() -> bool:
    """True when Ray's output should stay on the console (``BD_RAY_VERBOSE`` is 1/true/yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(verbose: bool) -> None:
    """Set ``BD_RAY_VERBOSE`` for this process and the processes it starts (jobs of ``jobs/demo.py``)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def is_progress_line(line: str) -> bool:
    """Whether a worker's output line is a bd-ray progress line (shown on the console when quiet)."""
    return bool(_PROGRESS.match(line))


def log_path() -> Path:
    """This process's log file for Ray's output (created on first use)."""
    global _log_path
    with _lock:
        if _log_path is None:
            d = Path(os.environ.get("BD_RAY_LOG_DIR") or Path(tempfile.gettempdir()) / "bd-ray-logs")
            d.mkdir(parents=True, exist_ok=True)
            _log_path = d / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            _log_path.touch()
    return _log_path


def quiet_env() -> dict[str, str]:
    """Environment variables that keep Ray quiet in the driver and in the job's workers
    (``runtime_env["env_vars"]``): no Ray Data progress bars. Empty when verbose."""
    return {} if is_verbose() else {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def _write(lines: list[str]) -> None:
    with _lock, open(_log_path or log_path(), "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)


def _on_worker_output(data: dict[str, Any]) -> None:
    """Ray's per-batch callback for worker output: progress lines to the console, all lines to the file."""
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who} pid={data.get('pid')}{', ' + data['ip'] if data.get('ip') else ''}) "
    lines = list(data.get("lines") or [])
    _write([prefix + ln for ln in lines])
    for ln in lines:
        if is_progress_line(ln):
            print(ln, file=sys.stdout, flush=True)


def quiet_ray_logging() -> None:
    """Before ``ray.init`` (and after ``import ray``): Ray's Python loggers print only warnings and
    errors on the console and write everything from INFO to :func:`log_path`; the driver's own Ray
    Data reads :func:`quiet_env`. No-op when verbose."""
    if is_verbose():
        return
    os.environ.update(quiet_env())
    file_handler = logging.FileHandler(log_path())
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
        if (name == "ray" or not lg.propagate) and not any(
                isinstance(h, logging.FileHandler) and h.baseFilename == file_handler.baseFilename
                for h in lg.handlers):
            lg.addHandler(file_handler)


def quiet_ray() -> Path | None:
    """After ``ray.init(log_to_driver=True)``: route Ray's output to :func:`log_path` (see the module
    docstring) and print that path once. Returns it, or ``None`` when verbose (nothing changed).

    Ray Data progress bars are switched off in the driver's ``DataContext``; worker output goes
    through Ray's driver-side stream dispatcher (``ray._private.worker.global_worker_stdstream_dispatcher``,
    Ray 2.x), whose ``ray_print_logs`` handler is replaced by one that filters. On a Ray without
    it, worker output stays as Ray prints it.
    """
    if is_verbose():
        return None
    quiet_ray_logging()  # again: Ray Data configures its loggers when first imported
    path = log_path()
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
    except ImportError:  # Ray without Ray Data: nothing to silence
        pass
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        names = [n for n, _ in dispatcher.handlers]
        if "ray_print_logs" in names or _HANDLER in names:
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.remove_handler(_HANDLER)
            dispatcher.add_handler(_HANDLER, _on_worker_output)
    except (ImportError, AttributeError):  # another Ray: its own printing stays
        pass
    print(f"[bd-ray] Ray's output (progress bars, worker logs) -> {path}  (--verbose or {VERBOSE_ENV}=1 "
          "to show it here)", flush=True)
    return path
