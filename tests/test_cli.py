"""``balancedmix report`` / ``balancedmix demo`` command line: clear failures, working report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from balancedmix.cli import build_parser, main


def write_run(folder: Path, n: int = 8, method: str = "sum") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        for s in range(n):
            fh.write(json.dumps({"step": s, "grad_norm/a": 2.0 + 0.1 * s, "grad_norm/b": 1.0, "reward/a/mean": 0.1 * s, "reward/b/mean": 0.5}) + "\n")
    (folder / "run.json").write_text(json.dumps({"method": method}))
    return folder


def test_report_writes_report_and_plots(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    a = write_run(tmp_path / "sum")
    b = write_run(tmp_path / "normalize", method="normalize")
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--out", str(out), "--title", "My runs"]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# My runs")
    assert "`normalize` vs `sum`" in text
    assert (out / "grad_norms.png").is_file()
    assert str(out / "report.md") in caplog.text


def test_report_accepts_a_jsonl_file(tmp_path):
    run = write_run(tmp_path / "r")
    assert main(["report", str(run / "metrics.jsonl"), "--out", str(tmp_path / "out")]) == 0


def test_report_missing_file_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    missing.mkdir()
    assert main(["report", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "balancedmix report: error: no metrics.jsonl in run folder" in err and str(missing) in err
    assert main(["report", str(tmp_path / "gone.jsonl")]) == 2
    assert "gone.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_malformed_line_named(tmp_path, capsys):
    run = write_run(tmp_path / "r", n=3)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "grad_norm/a": 1.0\n')
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}:4: malformed JSON" in err


def test_report_bad_value_named(tmp_path, capsys):
    run = write_run(tmp_path / "r", n=2)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "grad_norm/a": "NaN?"}\n')
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:3: 'grad_norm/a' must be a number or null" in capsys.readouterr().err


def test_report_needs_a_run(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2


def test_demo_arguments_parsed():
    args = build_parser().parse_args(["demo", "--methods", "sum, pcgrad", "--steps", "5", "--quick", "--seed", "3"])
    assert args.methods == ["sum", "pcgrad"] and args.steps == 5 and args.quick and args.seed == 3
    assert args.out == "balancedmix_demo" and args.preset == "default" and args.schedule is None
    default = build_parser().parse_args(["demo"])
    assert default.methods is None and default.seeds is None  # the preset decides


def test_presets_decide_methods_and_seeds(tmp_path):
    from balancedmix.demo.run import check_demo_args

    cfg, runs = check_demo_args(tmp_path / "d")
    assert (cfg.seeds, [r[1] for r in runs]) == (8, ["sum", "normalize"])
    cfg, runs = check_demo_args(tmp_path / "d", preset="quick")
    assert (cfg.seeds, [r[1] for r in runs]) == (1, ["sum", "normalize", "pcgrad"])
    cfg, runs = check_demo_args(tmp_path / "d", methods=["sum"], seeds=2)
    assert (cfg.seeds, [r[1] for r in runs]) == (2, ["sum"])


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--methods", ","], ["demo", "--preset", "huge"]])
def test_demo_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_demo_unknown_method_clear_error(tmp_path, capsys):
    assert main(["demo", "--methods", "sum,bogus", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "balancedmix demo: error: unknown method(s) ['bogus']" in err
    assert not (tmp_path / "d").exists()
