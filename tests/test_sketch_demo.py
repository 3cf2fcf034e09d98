"""``balancedmix demo --sketch-dim D``: a ``<method>+sketch`` run beside each exact corrected run."""

from __future__ import annotations

import json

import pytest

from balancedmix.demo.run import SKETCH_SUFFIX, check_demo_args


def test_sketch_dim_adds_a_sketch_run_per_corrected_method(tmp_path):
    cfg, runs = check_demo_args(tmp_path / "d", ["sum", "normalize", "pcgrad"], sketch_dim=4096, preset="quick")
    assert [name for name, _, _ in runs] == ["sum", "normalize", "pcgrad", "normalize+sketch", "pcgrad+sketch"]
    assert [m for _, m, _ in runs][3:] == ["normalize", "pcgrad"]
    assert cfg.sketch_dim == 4096 and SKETCH_SUFFIX == "+sketch"
    cfg0, runs0 = check_demo_args(tmp_path / "d", ["sum", "normalize"], preset="quick")
    assert cfg0.sketch_dim is None and len(runs0) == 2


@pytest.mark.parametrize(
    ("methods", "dim", "match"),
    [(["sum"], 4096, "besides sum"), (["sum", "normalize"], 0, "sketch_dim must be"), (["sum", "normalize"], True, "sketch_dim must be")],
)
def test_bad_sketch_dim_is_refused_before_any_work(tmp_path, methods, dim, match):
    with pytest.raises(ValueError, match=match):
        check_demo_args(tmp_path / "d", methods, sketch_dim=dim, preset="quick")
    assert not (tmp_path / "d").exists()


def test_cli_flag_reaches_run_demo(monkeypatch, tmp_path):
    from balancedmix import cli
    from balancedmix.demo import run as R

    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return tmp_path / "report.md"

    monkeypatch.setattr(R, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--methods", "sum,normalize", "--sketch-dim", "65536", "--out", str(tmp_path / "o")]) == 0
    assert seen["sketch_dim"] == 65536 and seen["methods"] == ["sum", "normalize"]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--sketch-dim", "-3"])


@pytest.mark.slow
def test_demo_with_sketch_dim_end_to_end(tmp_path):
    from balancedmix.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--methods", "sum,normalize", "--sketch-dim", "65536", "--steps", "3"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    exact = [json.loads(line) for line in (out / "normalize" / "metrics.jsonl").read_text().splitlines()]
    sketch = [json.loads(line) for line in (out / "normalize+sketch" / "metrics.jsonl").read_text().splitlines()]
    assert len(sketch) == len(exact) == 3
    assert all(r["sketch_dim"] == 65536 for r in sketch) and all("sketch_dim" not in r for r in exact)
    tasks = [k.split("/", 1)[1] for k in sketch[0] if k.startswith("grad_norm_se/")]
    assert tasks and all(f"coef_next/{t}" in sketch[-1] for t in tasks)
    assert all(r[f"coef/{t}"] == 1.0 for r in sketch[:1] for t in tasks)  # the first step is sum
    # the first step's gradients are the same in both runs (same warm start, coefficients 1):
    # the sketched norms are within a few standard errors of the exact ones
    for t in tasks:
        se = sketch[0][f"grad_norm_se/{t}"]
        assert abs(sketch[0][f"grad_norm/{t}"] - exact[0][f"grad_norm/{t}"]) <= 5 * se + 1e-9
    meta = json.loads((out / "normalize+sketch" / "run.json").read_text())
    assert meta["sketch_dim"] == 65536 and meta["method"] == "normalize"
    report = (out / "report.md").read_text()
    assert "| normalize+sketch | normalize |" in report
