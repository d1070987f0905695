"""Results appended to JSONL as each prompt finishes, so that a long run that stops resumes where it was."""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

from megactx.errors import MegactxError

logger = logging.getLogger(__name__)


def read_rows(path: str) -> list[dict]:
    """Finished rows of an earlier run; a line cut short by a crash is ignored (that cell is redone)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    logger.warning("%s: ignoring an incomplete line", path)
    return rows


class ResultLog:
    """rows: every finished row (earlier runs included); skip(key) for cells already done; add(row) appends."""

    def __init__(self, path: str, key: Callable[[dict], tuple], on_row: Callable[[dict | None], None] | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.on_row = path, on_row
        self.rows = read_rows(path)
        self.done = {key(r) for r in self.rows}

    def __enter__(self) -> "ResultLog":
        self.file = open(self.path, "a+")
        self.file.seek(0, os.SEEK_END)
        if self.file.tell() > 0:  # start on a fresh line if a crash left the last one unfinished
            self.file.seek(self.file.tell() - 1)
            if self.file.read(1) != "\n":
                self.file.write("\n")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def skip(self, key: tuple) -> bool:
        if key in self.done:
            if self.on_row:
                self.on_row(None)
            return True
        return False

    def add(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows.append(row)
        if self.on_row:
            self.on_row(row)


def parse_int_list(text: str, what: str, example: str = "4096,8K,32K") -> list[int]:
    """'4096,8K,1M' -> [4096, 8192, 1048576]. `example` is shown in the error for a value that is not a number."""
    values = []
    for item in text.split(","):
        item = item.strip()
        scale = {"k": 1024, "m": 1024 * 1024}.get(item[-1:].lower(), 1)
        number = item[:-1] if scale > 1 else item
        try:
            values.append(int(number) * scale)
        except ValueError:
            raise MegactxError(f"{what}: {item!r} is not a whole number (write e.g. {example})") from None
    if not values or any(v < 0 for v in values):
        raise MegactxError(f"{what}: give one or more non-negative numbers, e.g. {example}")
    return values
