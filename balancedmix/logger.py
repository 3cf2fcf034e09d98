"""JSONL diagnostics log: one JSON object per optimizer step.

Usable from a plain training loop (``BalancedOptimizer(..., on_step=JSONLLogger(path))``) and
written by the TRL integration; ``balancedmix report`` reads it. Non-finite floats are written
as ``null`` so every line is strict JSON.

Robustness (see ``docs/diagnostics.md``, "The JSONL log"):

- *Torn lines.* Every record is written as one ``line + "\\n"``; a writer killed mid-write can
  leave a last line without its newline. :func:`scan_jsonl` / :func:`read_jsonl` set such a
  fragment aside (:class:`TornLine`, a warning) instead of refusing the file, and also recover a
  record that an older writer appended onto a torn line. A :class:`JSONLLogger` appending to a
  file with a torn last line moves the fragment to ``<path>.torn`` and truncates the file to its
  last complete line before writing.
- *Two runs in one file.* A logger appending to a file that already holds steps refuses (raises
  :class:`SplicedRunsError` before writing) a first step at or before the file's first step:
  that is a second run, not a continuation. A first step inside the file's range (a resume that
  redoes steps) is written, with a warning; readers keep the later records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = ["JSONLLogger", "read_jsonl", "scan_jsonl", "JSONLScan", "TornLine", "SplicedRunsError", "truncate_after_step"]

_log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


# ------------------------------------------------------------------------------- torn lines
#: what :class:`JSONLLogger` writes first on every line; a record spliced onto a torn line
#: is recognised by it
_RECORD_START = '{"step":'


class SplicedRunsError(ValueError):
    """A :class:`JSONLLogger` would append a second run to a log that already holds one."""


@dataclass(frozen=True)
class TornLine:
    """A line cut by a killed writer, set aside by :func:`scan_jsonl`.

    Attributes:
        lineno: 1-based line number in the file.
        text: the cut fragment (without the record recovered after it, if any).
        kind: ``"tail"``: the file's last line, without a newline, not valid JSON;
            ``"spliced"``: a cut line onto which a later writer appended a complete record
            (the record is kept, the fragment before it set aside).
    """

    lineno: int
    text: str
    kind: Literal["tail", "spliced"]

    def describe(self, path: str | os.PathLike[str]) -> str:
        """A one-line warning naming the file, the line and what was set aside."""
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        if self.kind == "tail":
            what = "the last line was cut (a writer killed mid-line?) and is left out"
        else:
            what = "a cut line had a later record appended to it; the record is kept, the cut fragment left out"
        return f"{path}:{self.lineno}: {what} ({len(self.text)} characters: {shown!r})"


@dataclass
class JSONLScan:
    """What :func:`scan_jsonl` found in a JSONL file.

    Attributes:
        path: the file.
        records: the JSON objects, in file order.
        line_numbers: the 1-based line number of each record.
        torn: the torn fragments set aside (empty for a clean file).
    """

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    torn: list[TornLine] = field(default_factory=list)


def _spliced(line: str) -> int:
    """Index of a complete ``{"step": ...}`` record appended onto a torn prefix of ``line`` (or -1)."""
    start = line.find(_RECORD_START, 1)
    while start > 0:
        try:
            if isinstance(json.loads(line[start:]), dict):
                return start
        except json.JSONDecodeError:
            pass
        start = line.find(_RECORD_START, start + 1)
    return -1


def scan_jsonl(path: str | os.PathLike[str]) -> JSONLScan:
    """Read a JSONL log, setting torn lines aside instead of failing.

    A *torn* line is (a) the last line of the file when it has no final newline and is not
    valid JSON (a writer killed mid-line), or (b) a malformed line that ends with a complete
    ``{"step": ...}`` record (a writer that appended onto such a cut line): the record is
    kept. Both are returned in :attr:`JSONLScan.torn`. Any other malformed line, or a line
    that is not a JSON object, raises ``ValueError`` naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    scan = JSONLScan(path=path)
    with open(path, "rb") as fh:
        raw_lines = fh.read().split(b"\n")
    # split() gives a final b"" when the file ends with a newline; otherwise the last piece is
    # a line without its newline
    last_complete = len(raw_lines) - 1
    for index, raw in enumerate(raw_lines):
        lineno = index + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if index == last_complete:  # cut inside a multi-byte character
                scan.torn.append(TornLine(lineno, raw.decode("utf-8", errors="replace"), "tail"))
                continue
            raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            start = _spliced(line)
            if start > 0:
                scan.torn.append(TornLine(lineno, line[:start], "spliced"))
                record = json.loads(line[start:])
            elif index == last_complete:
                scan.torn.append(TornLine(lineno, line, "tail"))
                continue
            else:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        scan.records.append(record)
        scan.line_numbers.append(lineno)
    return scan


def _prepare_append(path: Path) -> tuple[int, int] | None:
    """Before appending to ``path``: set a torn last line aside, return the file's (first, last) step.

    A last line without its newline that is not valid JSON is appended to ``<path>.torn`` and
    cut from the file (a warning); a complete last line without its newline gets one. Returns
    None when the file is absent or holds no record with an integer ``step``.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail)
            complete = True
        except ValueError:  # JSONDecodeError, or a UnicodeDecodeError of a cut multi-byte character
            complete = not tail.strip()
        if complete:
            with open(path, "ab") as fh:
                fh.write(b"\n")
            data += b"\n"
        else:
            aside = path.with_name(path.name + ".torn")
            with open(aside, "ab") as fh:
                fh.write(tail + b"\n")
            with open(path, "r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
            _log.warning(
                "%s: the last line was cut (a writer killed mid-line?); moved its %d bytes to %s and appending after line %d",
                path,
                len(tail),
                aside,
                data.count(b"\n"),
            )
    steps = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            steps.append(step)
    if not steps:
        return None
    return steps[0], max(steps)


def _check_continuation(path: Path, existing: tuple[int, int], step: int) -> None:
    """Refuse a first step that starts a second run in ``path``; warn about re-done steps."""
    first, last = existing
    if step <= first:
        raise SplicedRunsError(
            f"{path} already holds a run (steps {first}..{last}) and this logger's first step is {step}: appending "
            "would splice two runs into one log. Write each run to its own file, pass overwrite=True to replace the "
            f"old run, or, to continue it, log steps after {last}."
        )
    if step <= last:
        _log.warning(
            "%s: resuming at step %d, but the file already holds steps up to %d; readers keep the later record of each "
            "repeated step",
            path,
            step,
            last,
        )


class JSONLLogger:
    """Append one line per call: ``{"step": ..., "time": ..., **metrics}``.

    Args:
        path: the file to write (parent folders are created; an existing file is appended to
            unless ``overwrite=True``). Appending first sets a torn last line aside (into
            ``<path>.torn``), and the first record refuses to start a second run in the file
            (:class:`SplicedRunsError`); see the module docstring.
        main_process: only the main process writes (pass ``accelerator.is_main_process``).
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False, main_process: bool = True) -> None:
        self.path = Path(path)
        self.main_process = main_process
        self._fh: TextIO | None = None
        self._count = 0
        self._existing_steps: tuple[int, int] | None = None  # (first, last) step already in the file
        if main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not overwrite:
                self._existing_steps = _prepare_append(self.path)
            self._fh = open(self.path, "w" if overwrite else "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write one record: ``step`` (argument, else ``metrics["step"]``, else a call counter),
        ``time`` and the metrics (non-finite floats as ``null``, tensors as their value).

        Raises :class:`SplicedRunsError` (nothing written) when this is the first record of a
        logger appending to a file whose steps start at or after this step.
        """
        if self._fh is None:
            return
        record: dict[str, Any] = {}
        if step is not None:
            record["step"] = int(step)
        elif "step" in metrics:
            record["step"] = int(metrics["step"])
        else:
            record["step"] = self._count
        if self._existing_steps is not None:
            _check_continuation(self.path, self._existing_steps, record["step"])
            self._existing_steps = None
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
    """Read a JSONL log: one dict per record, in file order.

    A malformed line raises ``ValueError`` naming the file and line number, except a torn
    line (see :func:`scan_jsonl`), which is left out with a warning.
    """
    scan = scan_jsonl(path)
    for torn in scan.torn:
        _log.warning("%s", torn.describe(scan.path))
    records = scan.records
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
