"""benchmarks/overlap_ab.py's pure parts: the per-pass phase split between two readings of the
engine's totals, and its arguments (shared with serving.py). No server started."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, path: Path):
    sys.path.insert(0, str(BENCH))  # overlap_ab imports its sibling serving.py
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


overlap_ab = _load("bench_overlap_ab", BENCH / "overlap_ab.py")


def totals(passes: float, tokens: float, **seconds: float) -> dict[str, float]:
    out = {f"{p}_seconds": seconds.get(p, 0.0) for p in overlap_ab.PHASES}
    return {**out, "forward_passes": passes, "generated_tokens": tokens}


def test_phase_split_is_milliseconds_per_pass_between_two_readings():
    before = totals(10, 100, schedule=1.0, forward=2.0, wait=0.5)
    after = totals(30, 500, schedule=1.2, forward=2.8, wait=0.5, sample=0.1)
    split = overlap_ab.phase_split(before, after)
    assert split["passes"] == 20
    assert split["tokens_per_pass"] == pytest.approx(20.0)
    assert split["schedule_ms"] == pytest.approx(10.0)
    assert split["forward_ms"] == pytest.approx(40.0)
    assert split["sample_ms"] == pytest.approx(5.0)
    assert split["wait_ms"] == pytest.approx(0.0)


def test_phase_split_of_no_passes_does_not_divide_by_zero():
    same = totals(7, 70, forward=1.0)
    split = overlap_ab.phase_split(same, same)
    assert split["passes"] == 0
    assert split["forward_ms"] == 0.0 and split["tokens_per_pass"] == 0.0


def test_rounds_below_one_are_refused():
    with pytest.raises(SystemExit):
        overlap_ab.main(["--baseline-args=", "--candidate-args=", "--rounds", "0"])
