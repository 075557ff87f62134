"""The command-line shape every bd-ray job shares: ``--config``, repeatable ``--set``, ``--print-config``,
``--verbose``.

Jobs (``jobs/*.py``) differ only in their config model and what they run; parsing, validation
and the exit code for a bad config (2, naming the field) live here once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from bd_ray import logs
from bd_ray.config import ConfigError

__all__ = ["job_parser", "load_job_config"]


def job_parser(doc: str, config_model: str, set_example: str) -> argparse.ArgumentParser:
    """An argument parser with the shared job options (add job-specific ones to it).

    Args:
        doc: the job's module docstring (shown by ``--help``).
        config_model: dotted name of the config class, for the ``--config`` help.
        set_example: an override shown in the ``--set`` help, e.g. ``optim.lr=1e-4``.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"YAML config ({config_model})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a field, value parsed as YAML 1.1 (repeatable): --set {set_example}. "
                         f"YAML 1.1 reads no/off/yes/on as booleans (quote for YAML inside the shell's quotes: "
                         f"--set run.name=\"'no'\") and 1e3 as a string (a float field accepts it; an int "
                         f"field needs 1000)")
    ap.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    ap.add_argument("--verbose", action="store_true",
                    help=f"show Ray's own output (progress bars, every worker line) instead of sending it to a log "
                         f"file (same as {logs.VERBOSE_ENV}=1)")
    return ap


def load_job_config(args: argparse.Namespace, load: Callable[[Any, Sequence[str]], Any]) -> tuple[Any, int | None]:
    """Validate the job config; returns ``(config, None)`` or ``(None, exit_code)``.

    A config error prints its message (it names the field and the limit) and gives exit code 2;
    ``--print-config`` prints the validated config as JSON and gives exit code 0. ``--verbose`` sets
    ``BD_RAY_VERBOSE=1`` for this process (:mod:`bd_ray.logs`), read when the job connects to Ray.
    """
    if getattr(args, "verbose", False):
        logs.set_verbose(True)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None, 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json", by_alias=True), indent=1))
        return None, 0
    return cfg, None
