"""A run's folder: ``results.jsonl`` (one row per line, appended and flushed as each cell is done)
and ``config.json`` (written atomically, compared on resume).

A rerun with the same configuration skips the rows already there, so an interrupted run resumes
where it stopped; a truncated last line (the process died mid-write) is dropped and that cell is
run again. Rows written before budgets existed have no ``budget`` field and count as ``uniform``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvtrim.bench.config import BenchConfig, canonical_label
from kvtrim.core.errors import KVTrimError
from kvtrim.core.files import write_atomic

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"

Key = tuple[str, int, str, float, str]  # (task, sample index, method, ratio, budget)


def row_key(row: Mapping[str, Any]) -> Key:
    """(task, index, method, ratio, budget) with canonical labels; rows from before the budget
    axis are ``uniform``."""
    budget = canonical_label(str(row.get("budget") or "uniform"))
    return (
        str(row["task"]),
        int(row["index"]),
        canonical_label(str(row["method"])),
        float(row["ratio"]),
        budget,
    )


def read_results(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a results.jsonl. A last line cut short by an interruption is ignored (and cut off
    the file when ``repair``, so appending starts on a clean line); a bad line before it is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    offset = keep_until = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        end = offset + len(line) + (1 if number < len(lines) else 0)
        if line.strip():
            try:
                rows.append(json.loads(line))
                keep_until = end
            except json.JSONDecodeError as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise KVTrimError(
                        f"{path} line {number} is corrupt ({err}); fix or delete that line to resume."
                    ) from err
                break  # the interrupted last row
        else:
            keep_until = end
        offset = end
    if repair:
        _repair(path, data, keep_until, bool(rows))
    return rows


def _repair(path: Path, data: bytes, keep_until: int, has_rows: bool) -> None:
    if keep_until < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep_until)
    if has_rows and not path.read_bytes().endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")


class ResultsWriter:
    """Appends one JSON row per line, flushed at once, so a crash loses at most the row being written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _stored_config(path: Path) -> dict[str, Any]:
    """The stored configuration with today's defaults for fields added since, labels canonical."""
    stored = {**BenchConfig.defaults(), **json.loads(path.read_text(encoding="utf-8"))}
    try:
        return BenchConfig.from_dict(stored).to_dict()
    except KVTrimError:
        return stored  # a configuration this version no longer accepts: compared as it is


def check_config(out_dir: Path, config: BenchConfig) -> None:
    """Store the configuration in a new folder, or refuse one whose stored configuration differs.

    A field the stored file lacks was added since that run, which used its default (old folders
    have no ``budgets``: they ran the uniform budget only).
    """
    path = out_dir / CONFIG_FILE
    wanted = config.to_dict()
    if path.is_file():
        stored = _stored_config(path)
        if stored != wanted and read_results(out_dir / RESULTS_FILE):
            diffs = [
                f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now"
                for k in sorted(set(stored) | set(wanted))
                if stored.get(k) != wanted.get(k)
            ]
            raise KVTrimError(
                f"{out_dir} holds a run with a different configuration ({'; '.join(diffs)}). "
                "Rerun with the same options to resume it, or choose another --out folder."
            )
        if stored == wanted:
            return
    elif read_results(out_dir / RESULTS_FILE):
        raise KVTrimError(f"{out_dir} has {RESULTS_FILE} but no {CONFIG_FILE}; choose another --out folder.")
    write_atomic(path, (json.dumps(wanted, indent=2) + "\n").encode())
