"""The measurement journal (``runs.journal.jsonl``): resume, merge parts of a matrix, drop records.

Append-only, one finished measurement per line, flushed and fsynced; a rerun of the same matrix
reuses every measurement it holds, and :func:`drop_records` is how a measurement is re-measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from bd_ray.config.evaluate import EvalJobConfig
from bd_ray.evaluate.items import item_key
from bd_ray.evaluate.report import json_default

__all__ = ["JOURNAL_NAME", "Journal", "drop_records"]

JOURNAL_NAME = "runs.journal.jsonl"


class Journal:
    """Append-only ``runs.journal.jsonl`` of finished measurements.

    Each line is ``{"fingerprint", "key", "record"}``, flushed and fsynced, so a run killed at any
    point loses at most the measurement in flight. The fingerprint covers what changes every
    measurement (models, corpus, policies, token counts, needle); the axes a user grows a matrix
    along (more prompts per context, more contexts, budgets, gammas or modes) are in each item's
    key instead, so a grown matrix reuses what was measured (prompt k does not depend on how many
    prompts are drawn). Lines with another fingerprint, or torn by a crash, are ignored on load.
    """

    def __init__(self, out_dir: str | Path, cfg: EvalJobConfig) -> None:
        self.path = Path(out_dir) / JOURNAL_NAME
        dump = cfg.model_dump(mode="json")
        ident = {k: dump[k] for k in ("models", "data", "matrix", "needle")}
        ident["data"] = {k: v for k, v in ident["data"].items() if k != "prompts_per_context"}
        ident["matrix"] = {k: v for k, v in ident["matrix"].items() if k not in ("contexts", "budgets", "gammas", "modes")}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def load(self) -> dict[str, dict]:
        """``{item key: record}`` of this config's journaled measurements (a torn last line is cut
        off the file first, so later appends start on a new line)."""
        done: dict[str, dict] = {}
        if not self.path.is_file():
            return done
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            # a crash mid-write left a torn last line: cut it so later appends start on a new line
            text = text[:text.rfind("\n") + 1]
            with open(self.path, "r+") as f:
                f.truncate(len(text.encode()))
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue        # a line torn by a crash mid-write
            if entry.get("fingerprint") == self.fingerprint:
                done[entry["key"]] = entry["record"]
        return done

    def merge_from(self, other_dir: str | Path) -> tuple[int, int]:
        """Append the measurements journaled in ``other_dir`` (another process or machine that ran
        part of the same matrix) that this journal lacks; lines of another fingerprint (another
        config) and torn lines are left out. Returns ``(added, already_here)``.

        Raises:
            FileNotFoundError: ``other_dir`` has no journal.
        """
        src = Path(other_dir) / self.path.name
        if not src.is_file():
            raise FileNotFoundError(f"no {self.path.name} in {other_dir}")
        here = self.load()
        new: list[str] = []
        for line in src.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("fingerprint") != self.fingerprint or entry.get("key") in here:
                continue
            here[entry["key"]] = entry["record"]
            new.append(line)
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("\n".join(new) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return len(new), len(here) - len(new)

    def append(self, item: dict, rec: dict) -> None:
        """Journal the record ``rec`` of measurement ``item`` (flushed and fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"fingerprint": self.fingerprint, "key": item_key(item), "record": rec},
                          default=json_default)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def drop_records(out_dir: str | Path, prompts: Sequence[str], only: str | None = None, unstamped: bool = False,
                 started_between: tuple[str, str] | None = None) -> tuple[int, int]:
    """Drop AR and SD measurements from the journal in ``out_dir`` so the next run re-measures them.

    A record is dropped when its prompt id (``c<context>-p<k>``) is in ``prompts`` and every given
    filter holds: ``only="adaptive"`` / ``"fixed"`` keeps to items of an adaptive-γ mode (their AR
    runs included) / of the other modes; ``unstamped`` to records without ``started_at`` (measured
    before the field existed); ``started_between`` (two ISO times, UTC) to records whose
    ``started_at`` lies in that closed interval (e.g. measurements disturbed by other work on the
    machine). Needle runs are never dropped; lines that are not JSON (torn by a crash) are kept as
    they are. Lines of every config fingerprint are considered.

    The file is rewritten atomically (a fsynced temporary file renamed over it, so a crash leaves
    the old or the new journal). Do not run it on a journal a running evaluation appends to.

    Returns:
        ``(dropped, kept)`` line counts.

    Raises:
        FileNotFoundError: ``out_dir`` has no journal.
        ValueError: ``only`` is not ``None``, ``"adaptive"`` or ``"fixed"``; a malformed time.
    """
    if only not in (None, "adaptive", "fixed"):
        raise ValueError(f"only must be 'adaptive' or 'fixed', got {only!r}")
    window = None
    if started_between:
        window = [datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp() for t in started_between]
    path = Path(out_dir) / JOURNAL_NAME
    kept, dropped = [], 0
    wanted = set(prompts)
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        key, rec = entry["key"], entry["record"]
        kind, prompt_id = key.split("|")[:2]                 # see item_key
        adaptive = '"adaptive": true' in key                 # the item's mode, as item_key dumps it
        drop = (kind in ("ar", "sd") and prompt_id in wanted
                and not (only == "adaptive" and not adaptive) and not (only == "fixed" and adaptive)
                and not (unstamped and "started_at" in rec)
                and not (window and not window[0] <= rec.get("started_at", -1.0) <= window[1]))
        if drop:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped, len(kept)
