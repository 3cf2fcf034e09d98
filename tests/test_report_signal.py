"""The report's signal-vs-noise figures and the paper's Gain(t), on logs with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from balancedmix import analysis as A


def _write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _records(n: int = 30) -> list[dict]:
    """a: raw ‖g‖² 9, unbiased 3 ± small (67 % noise, resolved); b: raw 1, unbiased alternating ±0.5 (not resolved)."""
    out = []
    for s in range(n):
        out.append(
            {
                "step": s,
                "grad_norm/a": 3.0,
                "grad_norm/b": 1.0,
                "grad_sqnorm_unbiased/a": 3.0 + (0.1 if s % 2 else -0.1),
                "grad_sqnorm_unbiased/b": 0.5 if s % 2 else -0.5,
                "noise_scale/a": 8.0 + s % 3,
                "noise_scale/b": 100.0,
                "reward/a/mean": 0.02 * s,
                "reward/b/mean": 0.5,
            }
        )
    return out


def test_signal_noise_table(tmp_path: Path) -> None:
    run = A.load_run(_write(tmp_path / "r", _records()))
    rows = {r["task"]: r for r in A.signal_noise_table(run)}
    assert rows["a"]["noise share of raw ‖g‖²"] == pytest.approx(1 - 3.0 / 9.0)
    assert rows["a"]["noise scale (samples)"] == pytest.approx(9.0)
    assert rows["a"]["signal resolved"] is True
    assert rows["b"]["noise share of raw ‖g‖²"] == pytest.approx(1.0)
    assert rows["b"]["signal resolved"] is False


def test_without_split_estimator_the_noise_columns_are_nan(tmp_path: Path) -> None:
    recs = [{k: v for k, v in r.items() if not k.startswith(("grad_sqnorm_unbiased", "noise_scale"))} for r in _records()]
    (row_a, _) = A.signal_noise_table(A.load_run(_write(tmp_path / "r", recs)))
    assert math.isnan(row_a["noise share of raw ‖g‖²"]) and math.isnan(row_a["noise scale (samples)"])
    assert row_a["signal resolved"] is False


def test_report_states_noise_in_words_and_draws_the_papers_plot(tmp_path: Path) -> None:
    run = A.load_run(_write(tmp_path / "r", _records()))
    text = A.write_report([run], tmp_path / "out", gain_window=4).read_text()
    assert "`a` 67 %, `b` 100 % (signal not resolved)" in text
    assert "Ratios between tasks involving `b` measure noise" in text
    assert "## Signal and noise per task" in text and "paper_gain.png" in text
    assert (tmp_path / "out" / "paper_gain.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_gain_series_uses_the_window(tmp_path: Path) -> None:
    run = A.load_run(_write(tmp_path / "r", _records(30)))
    gains = A.paper_gain_series(run, 5)
    # reward of a rises 0.02 per step: next-5 mean − previous-5 mean = 0.02 × 6 at every interior step
    interior = gains["a"][5:25]
    np.testing.assert_allclose(interior, 0.12, atol=1e-12)
    assert np.isnan(gains["a"][:5]).all() and np.isnan(gains["a"][25:]).all()
    np.testing.assert_allclose(gains["b"][5:25], 0.0, atol=1e-12)
    assert A.default_gain_window(run) == 3
