"""Predictions files that are CSV tables (classification's top-5, scene-probe's patch grids): the
file, its header and each line's field count checked once, every fault a named error."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from fourm_eval.errors import PredictionsError


def csv_rows(path: Path, header: list[str], pred_file: str) -> Iterator[tuple[str, list[str]]]:
    """(``"PATH, line N"``, fields) of every non-empty line after the header; ``path`` may be a run's
    predictions folder holding ``pred_file``."""
    path = Path(path)
    if path.is_dir():
        path = path / pred_file
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found (expected a CSV with the header "
                               f"{','.join(header)}, or a run's predictions folder holding {pred_file})")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or [h.strip() for h in first] != header:
            raise PredictionsError(f"{path}: the first line must be the header {','.join(header)}, got {first}")
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{path}, line {n}"
            if len(row) != len(header):
                raise PredictionsError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
            yield where, row
