"""Drop measurements from an evaluation journal so the next run of the matrix re-measures them.

The journal (``runs.journal.jsonl``, see ``bd_ray.evaluate._Journal``) is append-only and a rerun
skips every key it holds; deleting lines is how a measurement is redone. This script does it
atomically (a new file renamed over the old one, so a crash leaves one or the other) and prints
what it dropped.

    python results/reference/drop_from_journal.py DIR --prompts c2048-p0 c2048-p1 --adaptive --unstamped
    python results/reference/drop_from_journal.py DIR --prompts c2048-p2 --fixed --unstamped
    python results/reference/drop_from_journal.py DIR --prompts c4096-p4 \
        --started-between 2026-11-30T10:24:00 2026-11-30T10:29:00

--prompts: prompt ids (``c<context>-p<k>``) whose measurements may be dropped (required).
--adaptive / --fixed: only the greedy-adaptive items (their AR included) / only the fixed-γ items.
--unstamped: only records without ``started_at`` (measured before the field existed, i.e. by the
    controller and under the conditions of an earlier session).
--started-between START END: only records whose ``started_at`` lies in [START, END] (ISO times, UTC),
    e.g. measurements disturbed by other work on the machine.
Do not run it on a journal a running evaluation is appending to.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--prompts", nargs="+", required=True)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--adaptive", action="store_true")
    kind.add_argument("--fixed", action="store_true")
    p.add_argument("--unstamped", action="store_true")
    p.add_argument("--started-between", nargs=2, metavar=("START", "END"))
    args = p.parse_args()
    window = None
    if args.started_between:
        window = [datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp() for t in args.started_between]
    path = args.dir / "runs.journal.jsonl"
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        key, rec = entry["key"], entry["record"]
        parts = key.split("|")
        adaptive = '"adaptive": true' in key
        drop = (parts[0] in ("ar", "sd") and parts[1] in args.prompts
                and not (args.adaptive and not adaptive) and not (args.fixed and adaptive)
                and not (args.unstamped and "started_at" in rec)
                and not (window and not window[0] <= rec.get("started_at", -1.0) <= window[1]))
        if drop:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, path)
    print(f"{path}: dropped {dropped}, kept {len(kept)}")


if __name__ == "__main__":
    main()
