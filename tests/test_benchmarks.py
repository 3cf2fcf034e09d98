"""Smoke tests of the benchmark suites (benchmarks/): each suite runs at toy size with 1 repeat
and produces its rows, targets and markdown; the CLI writes results.json and results.md. Not
timed tests: no assertion is made on any timing. The anchors' agreement check is a real one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the repo root

from benchmarks import common  # noqa: E402
from benchmarks.common import QUICK_LLAMA, Workload, render_suite  # noqa: E402

TOY = Workload(num_microbatches=4, batch=2, seq=8)


def _check_suite(suite: dict, min_rows: int = 1) -> str:
    assert len(suite["rows"]) >= min_rows
    for r in suite["rows"]:
        if "median_s" in r:
            assert r["median_s"] > 0 and math.isfinite(r["median_s"])
    for t in suite["targets"]:
        assert set(t) >= {"name", "value", "limit", "met"}
    text = render_suite("x", suite)
    assert text.startswith("### x") and "|" in text
    json.dumps(suite, default=str)
    return text


def test_model_spec_counts_parameters_exactly():
    for spec in (QUICK_LLAMA, common.TINY_LLAMA):
        model = common.build_model(spec)
        assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    assert 9_000_000 < common.TINY_LLAMA.num_params() < 11_000_000


def test_overhead_suite_runs_and_memory_is_as_documented():
    from benchmarks.overhead import run

    suite = run(quick=True, repeats=1, ks=(2,), workload=TOY)
    text = _check_suite(suite, min_rows=3)
    assert "balancedmix sum (split)" in text
    bal = [r for r in suite["rows"] if r["impl"] == "balancedmix"]
    raw = next(r for r in bal if r["estimator"] == "raw")
    split = next(r for r in bal if r["estimator"] == "split")
    assert raw["extra_bytes"] == 2 * raw["P"] * 4  # K = 2 rows of float32
    assert split["extra_bytes"] == 4 * split["P"] * 4  # 2 micro-batches per task: two rows per task
    assert all(r["bytes_as_documented"] for r in bal)


def test_methods_suite_runs_with_anchors_and_agreement():
    pytest.importorskip("torchjd")
    from benchmarks.methods import run

    suite = run(quick=True, repeats=1, ks=(2,), workload=TOY, extended_k=2)
    _check_suite(suite, min_rows=3)
    keys = {r["key"] for r in suite["rows"]}
    assert {"plain", "bm:pcgrad", "ref:pcgrad", "torchjd:pcgrad"} <= keys
    pcgrad_checks = [c for c in suite["agreement"] if c["check"].startswith("PCGrad") and c["same_algorithm"]]
    assert pcgrad_checks
    for c in pcgrad_checks:  # the same algorithm gives the same update
        assert c["rel_diff"] <= 1e-5, c


def test_reference_pcgrad_combine_against_explicit_loop():
    from benchmarks.runners import reference_pcgrad_combine

    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    out = reference_pcgrad_combine(g, [[0, 1], [0, 1]])
    # g0 · g1 = -1 < 0: g0 -> g0 + g1/2 ; g1 -> g1 + g0
    expected = torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0])
    assert torch.allclose(out, expected.double())
    no_conflict = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(reference_pcgrad_combine(no_conflict, [[1], [0]]), no_conflict.sum(0))


def test_floor_suite_runs():
    from benchmarks.floor import measure

    r = measure(2, 20_000, "pcgrad", repeats=1)
    assert r["rows"] == 2 and r["step_s"] > 0 and r["copy_bw"] > 0
    assert r["step_bytes"] == (2 * 2 * 20_000 + 20_000 + 2 * 20_000 + 2 * 20_000) * 4


def test_scaling_suite_runs():
    from benchmarks.scaling import run

    suite = run(quick=True, repeats=1, ks=(2,), workload=Workload(2, 1, 8))
    _check_suite(suite, min_rows=2)


def test_cli_writes_json_and_markdown_and_skips_gpu_rows(tmp_path):
    from benchmarks.__main__ import main

    assert main(["run", "--suite", "all", "--quick", "--only", "floor", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert "floor" in data["suites"]["cpu"]
    md = (tmp_path / "results.md").read_text()
    assert "Step-cost floor" in md
    if not torch.cuda.is_available():
        assert "no CUDA device" in " ".join(data["suites"]["gpu"]["floor"]["skipped"])
        assert "GPU rows skipped" in md


def test_cli_rejects_unknown_suite(tmp_path):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "--only", "nonsense", "--out", str(tmp_path)])


def test_cli_refuses_partial_docs_update(tmp_path, capsys):
    """--update-docs replaces the whole results block: with --only (and no --base) it would drop the other tables."""
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "--quick", "--only", "floor", "--update-docs", "--out", str(tmp_path)])
    assert "without --only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--quick", "--only", "floor", "--base", str(tmp_path), "--out", str(tmp_path)])


def test_cli_merges_a_subset_into_a_full_run_and_the_docs(tmp_path, monkeypatch):
    """--only X --update-docs --base DIR: X's tables replace the base run's, the others stay, and
    the page names the re-run."""
    import benchmarks.__main__ as cli
    from benchmarks.__main__ import main, render

    base = tmp_path / "full"
    old = {"machine": {"cpu": "c", "cpu_count": 2, "torch": torch.__version__, "torch_threads": 2, "load_average": 0.5},
           "command": "python -m benchmarks run", "elapsed_s": 900.0, "suites": {"cpu": {
               "floor": {"suite": "floor", "rows": [], "tables": [], "targets": [], "notes": ["OLD-FLOOR-NOTE"], "skipped": []},
               "grpo": {"suite": "grpo", "rows": [], "tables": [], "targets": [], "notes": ["kept grpo"], "skipped": []}}}}
    base.mkdir()
    (base / "results.json").write_text(json.dumps(old))
    page = tmp_path / "b.md"
    page.write_text("<!-- results:cpu:begin -->\nold\n<!-- results:cpu:end -->\n")
    monkeypatch.setattr(cli, "DOCS", page)
    with pytest.raises(FileNotFoundError, match="no full run"):
        main(["run", "--quick", "--only", "floor", "--update-docs", "--base", str(tmp_path / "none"),
              "--out", str(tmp_path / "sub")])
    assert main(["run", "--quick", "--only", "floor", "--update-docs", "--base", str(base), "--out", str(tmp_path / "sub")]) == 0
    merged = json.loads((base / "results.json").read_text())
    assert merged["suites"]["cpu"]["grpo"]["notes"] == ["kept grpo"]
    assert merged["suites"]["cpu"]["floor"]["notes"] != ["OLD-FLOOR-NOTE"]
    assert [r["suites"] for r in merged["reruns"]] == [["cpu/floor"]]
    text = page.read_text()
    assert "kept grpo" in text and "OLD-FLOOR-NOTE" not in text and "Re-run since, replacing their tables: cpu/floor" in text and "cpu/floor" in text
    assert text.count("<!-- results:cpu:begin -->") == 1 and render(merged) in (base / "results.md").read_text()
    # a second re-run of the same suite replaces the first's line (it no longer describes a table)
    assert main(["run", "--quick", "--only", "floor", "--update-docs", "--base", str(base), "--out", str(tmp_path / "sub")]) == 0
    merged = json.loads((base / "results.json").read_text())
    assert [r["suites"] for r in merged["reruns"]] == [["cpu/floor"]] and page.read_text().count("Re-run since") == 1


def test_update_docs_replaces_between_markers(tmp_path):
    from benchmarks.__main__ import update_docs

    page = tmp_path / "b.md"
    page.write_text("intro\n<!-- results:cpu:begin -->\nold\n<!-- results:cpu:end -->\noutro\n")
    update_docs("new table", "cpu", page)
    assert page.read_text() == "intro\n<!-- results:cpu:begin -->\nnew table\n<!-- results:cpu:end -->\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        update_docs("x", "gpu", page)


@pytest.mark.slow
def test_grpo_suite_runs():
    pytest.importorskip("trl")
    from benchmarks.grpo import run

    _check_suite(run(quick=True, repeats=1), min_rows=2)


@pytest.mark.slow
def test_ddp_suite_runs():
    from benchmarks.ddp import run

    suite = run(quick=True, repeats=2)
    assert not [s for s in suite["skipped"] if "DeepSpeed" not in s], suite["skipped"]  # ZeRO rows may be skipped, with the reason
    _check_suite(suite, min_rows=2)
    fsdp = {r["variant"]: r for r in suite["rows"] if r["engine"] == "fsdp2"}
    assert {"fsdp2_plain", "fsdp2_sum"} <= set(fsdp)
    assert fsdp["fsdp2_sum"]["buffer_bytes_per_rank"] < next(r for r in suite["rows"] if r["variant"] == "ddp_sum")["buffer_bytes_per_rank"]
