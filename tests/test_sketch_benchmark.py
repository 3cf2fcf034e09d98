"""Smoke test of the sketch benchmark suite (benchmarks/sketch.py) at toy size: rows, targets,
markdown; the accuracy rows are checked against the stated error (no timing assertion)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the repo root

from benchmarks.common import Workload, render_suite  # noqa: E402


def test_sketch_suite_runs_and_its_errors_follow_the_formula():
    from benchmarks.sketch import run

    suite = run(quick=True, repeats=1, workload=Workload(num_microbatches=4, batch=2, seq=8))
    text = render_suite("sketch", suite)
    assert text.startswith("### sketch") and "sketch normalize" in text
    json.dumps(suite, default=str)
    acc = [r for r in suite["rows"] if "d" in r and "sqnorm_rel_rms" in r]
    assert [r["d"] for r in acc] == [64, 256, 1024] * 2  # the Llama's gradients, then the demo GRPO run's
    assert [r["source"] for r in acc][-1] == "demo GRPO" and "demo's GRPO gradients" in text
    for r in acc:
        assert math.isclose(r["sqnorm_rel_se_formula"], math.sqrt(2 / r["d"]))
        assert r["sqnorm_rel_rms"] < 3 * r["sqnorm_rel_se_formula"]  # 2 hashes × 4 tasks: loose
        assert r["sketch_bytes"] == (4 + 2) * r["d"] * 4
    timed = [r for r in suite["rows"] if "configuration" in r]
    assert [r["configuration"].split(",")[0] for r in timed] == [
        "plain AdamW", "exact normalize", "sketch normalize", "sketch sum (measurement only)"]
    assert timed[2]["extra_bytes"] == timed[3]["extra_bytes"] == (4 + 2) * 1024 * 4 and timed[1]["extra_bytes"] == 4 * timed[1]["P"] * 4
    names = [t["name"] for t in suite["targets"]]
    assert any("(K + 2) × d × 4" in n for n in names) and any("0.5B" in n for n in names)
    assert any(n.startswith("sketch sum step") for n in names) and any(n.startswith("sketch normalize step") for n in names)
