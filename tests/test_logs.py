"""Logs that survive kills and re-runs, a demo that never half-replaces its output, flags checked
before any work (issue 14, items 2, 3, 4, 17 and ``report --out`` of 18)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from balancedmix import analysis as A
from balancedmix.cli import main
from balancedmix.logger import JSONLLogger, SplicedRunsError, read_jsonl, scan_jsonl


def record(step: int, a: float = 2.0, b: float = 1.0) -> dict:
    return {"step": step, "grad_norm/a": a, "grad_norm/b": b, "reward/a/mean": 0.1 * step, "reward/b/mean": 0.5}


def write_lines(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def log_steps(path: Path, steps: range, **kw) -> None:
    with JSONLLogger(path, **kw) as log:
        for s in steps:
            log(record(s), step=s)


# ------------------------------------------------------------------------ item 2: torn lines
def test_torn_last_line_is_set_aside_when_read(tmp_path, caplog):
    path = write_lines(tmp_path / "run" / "metrics.jsonl", [record(s) for s in range(3)], tail='{"step": 3, "grad_norm/a": 2.')
    scan = scan_jsonl(path)
    assert [r["step"] for r in scan.records] == [0, 1, 2] and scan.line_numbers == [1, 2, 3]
    (torn,) = scan.torn
    assert (torn.lineno, torn.kind, torn.text) == (4, "tail", '{"step": 3, "grad_norm/a": 2.')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    assert "metrics.jsonl:4: the last line was cut" in caplog.text


def test_report_warns_about_a_torn_line_instead_of_refusing(tmp_path, caplog):
    run = tmp_path / "run"
    write_lines(run / "metrics.jsonl", [record(s) for s in range(4)], tail='{"step": 4, "grad_n')
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(run), "--out", str(out)]) == 0
    assert "metrics.jsonl:5: the last line was cut" in caplog.text
    text = (out / "report.md").read_text()
    assert "**Log problems**" in text and "metrics.jsonl:5: the last line was cut" in text
    assert A.load_run(run).steps.tolist() == [0, 1, 2, 3]


def test_malformed_lines_that_are_not_torn_still_fail(tmp_path):
    # a cut line followed by more lines, and a malformed last line that has its newline, are corruption
    mid = write_lines(tmp_path / "mid.jsonl", [record(0)], tail='{"step": 1, "grad\n' + json.dumps(record(2)) + "\n")
    with pytest.raises(ValueError, match="mid.jsonl:2: malformed JSON"):
        read_jsonl(mid)
    last = write_lines(tmp_path / "last.jsonl", [record(0)], tail='{"step": 1, "grad\n')
    with pytest.raises(ValueError, match="last.jsonl:2: malformed JSON"):
        read_jsonl(last)


def test_appending_logger_moves_a_torn_line_aside(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log_steps(path, range(3))
    with open(path, "a") as fh:
        fh.write('{"step": 3, "time": 17')  # killed mid-line
    with caplog.at_level(logging.WARNING):
        log_steps(path, range(3, 5))  # the resumed writer
    assert "moved its 22 bytes" in caplog.text
    scan = scan_jsonl(path)
    assert [r["step"] for r in scan.records] == [0, 1, 2, 3, 4] and not scan.torn
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 3, "time": 17\n'


def test_appending_logger_completes_a_last_line_missing_only_its_newline(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record(0)))  # valid, no newline (written by hand or another tool)
    log_steps(path, range(1, 3))
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    assert not (tmp_path / "m.jsonl.torn").exists()


def test_record_spliced_onto_a_torn_line_is_recovered(tmp_path):
    # what an older writer left: the resumed run's first record glued to the cut line
    text = json.dumps(record(0)) + "\n" + '{"step": 1, "grad_norm/a": 2.5, "grad_n' + json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n"
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text(text)
    scan = scan_jsonl(path)
    assert [r["step"] for r in scan.records] == [0, 1, 2] and scan.line_numbers == [1, 2, 3]
    assert scan.records[1] == record(1)
    (torn,) = scan.torn
    assert torn.kind == "spliced" and torn.lineno == 2 and torn.text == '{"step": 1, "grad_norm/a": 2.5, "grad_n'
    run = A.load_run(path.parent)
    assert run.steps.tolist() == [0, 1, 2] and any("metrics.jsonl:2: a cut line" in p for p in run.problems)


def test_line_numbers_stay_right_after_a_torn_line(tmp_path):
    bad = dict(record(3), **{"grad_norm/a": "oops"})
    text = json.dumps(record(0)) + "\n\n" + '{"step": 1, "gr' + json.dumps(record(1)) + "\n" + json.dumps(bad) + "\n"
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"m.jsonl:4: 'grad_norm/a' must be a number"):
        A.load_run(path)


# --------------------------------------------------------------------- item 4: two runs, one file
def test_logger_refuses_to_splice_a_second_run(tmp_path):
    path = tmp_path / "m.jsonl"
    log_steps(path, range(5))
    before = path.read_bytes()
    log = JSONLLogger(path)  # the script run again: append by default
    with pytest.raises(SplicedRunsError, match=r"already holds a run \(steps 0..4\).*first step is 0.*overwrite=True"):
        log({"grad_norm/a": 1.0, "step": 0})
    with pytest.raises(SplicedRunsError):  # still refused: nothing is ever written
        log({"grad_norm/a": 1.0})
    log.close()
    assert path.read_bytes() == before


def test_logger_counter_restarting_is_refused_too(tmp_path):
    path = tmp_path / "m.jsonl"
    with JSONLLogger(path) as log:
        log({"grad_norm/a": 1.0})
        log({"grad_norm/a": 1.0})
    with JSONLLogger(path) as log, pytest.raises(SplicedRunsError):
        log({"grad_norm/a": 1.0})


def test_logger_continues_and_resumes(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    log_steps(path, range(5))
    with caplog.at_level(logging.WARNING):
        log_steps(path, range(5, 7))  # continues: silent
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        log_steps(path, range(3, 8))  # a resume from a checkpoint at step 2 that redoes 3, 4...
    assert "resuming at step 3" in caplog.text
    run = A.load_run(path)
    assert run.steps.tolist() == list(range(8))
    log_steps(path, range(2), overwrite=True)  # overwrite replaces without a word
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]


def two_runs(folder: Path) -> Path:
    write_lines(folder / "metrics.jsonl", [record(s, a=3.0) for s in range(1, 6)] + [record(s, a=5.0) for s in range(1, 4)])
    (folder / "run.json").write_text(json.dumps({"method": "sum"}))
    return folder


def test_two_runs_in_one_file_are_an_error(tmp_path, capsys):
    run = two_runs(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds 2 runs.*goes back to 1 at line 6.*--split-runs"):
        A.load_run(run)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "holds 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_runs_in_one_file_can_be_split(tmp_path, capsys):
    run = two_runs(tmp_path / "run")
    first, second = A.load_runs([run], split_runs=True)
    assert (first.name, second.name) == ("run[1]", "run[2]")
    assert first.steps.tolist() == [1, 2, 3, 4, 5] and second.steps.tolist() == [1, 2, 3]
    assert set(first.series("grad_norm/a")) == {3.0} and set(second.series("grad_norm/a")) == {5.0}
    assert first.meta == {} and second.meta == {"method": "sum"}
    assert "run 1 of 2" in first.problems[0] and "attached to the last run" in second.problems[0]
    out = tmp_path / "out"
    assert main(["report", str(run), "--split-runs", "--out", str(out)]) == 0
    assert "`run[1]`" in (out / "report.md").read_text()


# ------------------------------------------------------------------- item 18: report --out
def test_report_to_an_unwritable_out_is_a_clear_error(tmp_path, capsys):
    run = two_runs(tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["report", str(run), "--split-runs", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"balancedmix report: error: cannot write the report to --out {out}" in err and "choose" in err
        assert "Traceback" not in err


# ------------------------------------------------------------------------ items 3 and 17: demo
@pytest.fixture
def no_training(monkeypatch):
    """Replace the demo's warm start and GRPO runs by instant fake runs (``calls`` counts them)."""
    from balancedmix.demo import run as R

    calls = []

    def fake_run_all(cfg, runs, out, seed, preset, progress, fail_at=None):
        calls.append([name for name, _, _ in runs])
        dirs = []
        for i, (name, method, _) in enumerate(runs):
            d = out / name
            d.mkdir(parents=True)
            (d / A.INCOMPLETE_MARKER).write_text("running\n")
            write_lines(d / "metrics.jsonl", [record(s, a=2.0 + i) for s in range(1, 5)])
            if fake_run_all.interrupt_at == name:
                raise KeyboardInterrupt
            (d / "run.json").write_text(json.dumps({"method": method, "name": name}))
            (d / A.INCOMPLETE_MARKER).unlink()
            dirs.append(d)
        return dirs

    fake_run_all.interrupt_at = None
    fake_run_all.calls = calls
    monkeypatch.setattr(R, "_run_all", fake_run_all)
    return fake_run_all


def demo(out: Path, *extra: str) -> int:
    return main(["demo", "--out", str(out), "--no-progress", *extra])


def test_demo_writes_out_only_when_complete(tmp_path, no_training):
    out = tmp_path / "d"
    assert demo(out, "--methods", "sum,mgda") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mgda", "sum"]
    assert (out / "report.md").is_file() and json.loads((out / ".balancedmix-demo").read_text())["status"] == "complete"
    assert not (tmp_path / "d.partial").exists()
    assert f"`{out / 'sum' / 'metrics.jsonl'}`" in (out / "report.md").read_text()  # names the final place


def test_second_demo_into_the_same_out_is_refused(tmp_path, no_training, capsys):
    out = tmp_path / "d"
    assert demo(out, "--methods", "sum,mgda") == 0
    report = (out / "report.md").read_text()
    capsys.readouterr()
    assert demo(out, "--methods", "sum") == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty" in err and "--overwrite" in err
    assert len(no_training.calls) == 1 and (out / "report.md").read_text() == report and (out / "mgda").is_dir()
    # --overwrite replaces the whole folder: no run of the old demo is left behind
    assert demo(out, "--methods", "sum", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sum"]
    assert "mgda" not in (out / "report.md").read_text()
    assert not list(tmp_path.glob("d.*"))


def test_interrupted_demo_leaves_out_unchanged(tmp_path, no_training, capsys, caplog):
    out = tmp_path / "d"
    assert demo(out, "--methods", "sum,mgda") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    no_training.interrupt_at = "pcgrad"
    assert demo(out, "--methods", "sum,pcgrad", "--overwrite") == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    stage = tmp_path / "d.partial"
    assert (stage / "pcgrad" / A.INCOMPLETE_MARKER).is_file() and not (stage / "sum" / A.INCOMPLETE_MARKER).exists()
    # report flags the unfinished run instead of passing it off as complete
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(stage / "sum"), str(stage / "pcgrad"), "--out", str(tmp_path / "r")]) == 0
    assert "pcgrad: the run did not finish" in caplog.text
    assert "the run did not finish" in (tmp_path / "r" / "report.md").read_text()
    # the next demo clears the stale staging folder
    no_training.interrupt_at = None
    assert demo(out, "--methods", "sum,pcgrad", "--overwrite") == 0
    assert not stage.exists() and sorted(p.name for p in out.iterdir() if p.is_dir()) == ["pcgrad", "sum"]


def test_overwrite_refuses_a_folder_the_demo_did_not_write(tmp_path, no_training, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert demo(out, "--overwrite") == 2
    assert "holds files that no balancedmix demo wrote" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious" and not no_training.calls
    (tmp_path / "afile").write_text("x")
    assert demo(tmp_path / "afile") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_an_empty_existing_out_is_fine(tmp_path, no_training):
    out = tmp_path / "d"
    out.mkdir()
    assert demo(out, "--methods", "sum") == 0 and (out / "report.md").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "sum,weights"], "method 'weights' needs options the demo cannot pass"),
        (["--schedule", "fixed:foo=1"], "schedule 'fixed:foo=1': .*unknown task 'foo'"),
        (["--schedule", "temperature:-1"], "schedule 'temperature:-1': Temperature tau must be a positive finite number"),
        (["--schedule", "fixed:add=-1"], "schedule 'fixed:add=-1': .*negative"),
        (["--schedule", "fixed:add=1,add=2"], "task 'add' is given twice"),
        (["--schedule", "gradient_share:3"], "gradient_share takes no argument"),
        (["--schedule", "temperature:x"], "temperature needs a number"),
        (["--methods", "sum,nope"], r"unknown method\(s\) \['nope'\]"),
    ],
)
def test_bad_demo_flags_fail_before_any_work(tmp_path, no_training, capsys, flags, message):
    import re

    assert demo(tmp_path / "d", *flags) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not no_training.calls and not list(tmp_path.iterdir())  # refused before any work


def test_weights_message_names_usable_methods(tmp_path, no_training, capsys):
    assert demo(tmp_path / "d", "--methods", "sum,weights") == 2
    err = capsys.readouterr().err
    assert "pick demo methods among: " in err and "normalize" in err.split("among: ")[1]
    assert "weights" not in err.split("among: ")[1]


def test_bad_seed_is_refused_before_work(tmp_path, no_training):
    from balancedmix.demo.run import run_demo

    with pytest.raises(SystemExit) as exc:
        demo(tmp_path / "d", "--seed", "-1")
    assert exc.value.code == 2
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        run_demo(tmp_path / "d", seed=2**32, progress=False)
    assert not no_training.calls and not list(tmp_path.iterdir())


def test_out_may_not_be_the_current_folder(tmp_path, no_training, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("x")
    assert demo(Path("."), "--overwrite") == 2
    assert "is the current folder" in capsys.readouterr().err


@pytest.mark.slow
def test_real_quick_demo_leaves_no_marker_or_staging(tmp_path, capsys):
    out = tmp_path / "d"
    assert demo(out, "--quick", "--methods", "sum", "--steps", "1") == 0
    assert not list(out.rglob(A.INCOMPLETE_MARKER)) and not (tmp_path / "d.partial").exists()
    assert (out / "sum" / "run.json").is_file() and (out / "report.md").is_file()
    run = A.load_run(out / "sum")
    assert run.steps.tolist() == [1] and not run.problems
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert demo(out, "--quick", "--methods", "sum", "--steps", "1") == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not (tmp_path / "d.partial").exists()


def test_torn_line_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes((json.dumps(record(0)) + "\n").encode() + '{"step": 1, "note": "é'.encode()[:-1])
    scan = scan_jsonl(path)
    assert [r["step"] for r in scan.records] == [0] and scan.torn[0].kind == "tail"
    log_steps(path, range(1, 2))
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]
    (tmp_path / "bad.jsonl").write_bytes(b'{"step": 0, "x": "\xff"}\n{"step": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not UTF-8"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_demo_out_that_cannot_be_created_fails_before_work(tmp_path, no_training, capsys):
    (tmp_path / "afile").write_text("x")
    assert demo(tmp_path / "afile" / "d") == 2
    err = capsys.readouterr().err
    assert "cannot create the output folder" in err and "choose a writable --out" in err
    assert not no_training.calls


def test_report_on_a_demo_folder_names_its_runs(tmp_path, no_training, capsys):
    out = tmp_path / "d"
    assert demo(out, "--methods", "sum,mgda") == 0
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 2
    assert f"no metrics.jsonl in run folder {out}; it holds run folders (mgda, sum): pass those" in capsys.readouterr().err
