"""JSONL diagnostics log: one JSON object per optimizer step.

Usable from a plain training loop (``BalancedOptimizer(..., on_step=JSONLLogger(path))``) and
written by the TRL integration; ``balancedmix report`` reads it. Non-finite floats are written
as ``null`` so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["JSONLLogger", "read_jsonl", "truncate_after_step"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class JSONLLogger:
    """Append one line per call: ``{"step": ..., "time": ..., **metrics}``.

    Args:
        path: the file to write (parent folders are created; an existing file is appended to
            unless ``overwrite=True``).
        main_process: only the main process writes (pass ``accelerator.is_main_process``).
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False, main_process: bool = True) -> None:
        self.path = Path(path)
        self.main_process = main_process
        self._fh: TextIO | None = None
        self._count = 0
        if main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w" if overwrite else "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._fh is None:
            return
        record: dict[str, Any] = {}
        if step is not None:
            record["step"] = int(step)
        elif "step" in metrics:
            record["step"] = int(metrics["step"])
        else:
            record["step"] = self._count
        record["time"] = time.time()
        for key, value in metrics.items():
            if key != "step":
                record[str(key)] = _clean(value)
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()
        self._count += 1

    __call__ = log

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JSONLLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL log; a malformed line raises ``ValueError`` naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def truncate_after_step(path: str | os.PathLike[str], step: int) -> int:
    """Cut a JSONL log back to a checkpoint: keep the lines before the first one whose ``step``
    exceeds ``step``, drop that line and everything after it. Returns the number of lines dropped.

    This is what resuming a run from the checkpoint of ``step`` needs before appending: the steps
    up to the checkpoint are kept as written, and the lines past it (which the resumed run
    redoes) go. A torn last line (the process was killed while writing it) is dropped too. A
    missing file is fine (0). The file is replaced atomically (written aside, then renamed), so
    an interruption leaves either the old or the new file.

    Raises:
        ValueError: a malformed line that is not the last one (naming the file and line); the
            file is left unchanged.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep: list[str] = []
    dropped = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines) and not line.endswith("\n"):
                dropped += 1  # torn by a kill
                break
            raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg}); not truncating") from None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step:
            dropped += sum(1 for rest in lines[lineno - 1 :] if rest.strip())
            break
        keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, path)
    return dropped
