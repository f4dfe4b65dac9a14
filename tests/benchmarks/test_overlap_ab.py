"""benchmarks/serving/overlap_ab.py's arguments (its phase split is the harness's:
test_harness.py). No server started."""

from __future__ import annotations

import pytest

from benchmarks import harness
from benchmarks.serving import overlap_ab


def test_the_phase_split_is_the_harness_one():
    assert overlap_ab.phase_split is harness.phase_split and overlap_ab.PHASES == harness.PHASES


def test_rounds_below_one_are_refused():
    with pytest.raises(SystemExit):
        overlap_ab.main(["--baseline-args=", "--candidate-args=", "--rounds", "0"])
