"""benchmarks/offline.py and its presets: arguments, presets that name real switches, and the
timed rounds on fake engines (a fake clock, so every value is exact). No model loaded."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import harness, offline
from benchmarks.presets import PRESETS, parse_presets
from plait.backends.cpu.linear import LAYOUTS
from plait.backends.cpu.plugin import CpuOptions
from plait.core.engine_config import EngineConfig


def test_every_preset_names_real_engine_arguments_and_backend_switches():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for p in PRESETS.values():
        assert set(p.engine) <= fields, p.name
        for key, value in p.cpu.items():  # a real switch, with a value of its kind
            if key == "linear_layout":
                assert value in LAYOUTS, p.name
            else:
                assert isinstance(getattr(CpuOptions(), key), bool), p.name
                assert isinstance(value, bool), p.name
    # the comparisons of the scripts this replaces stay available
    for old in (
        "transformers",
        "plait",
        "no-radix-cache",
        "mkl-eager",
        "prepacked",
        "prepacked-compile",
        "paged-attention",
        "fp32",
        "gguf",
        "gguf-a8",
        "int8",
        "overlap-off",
        "overlap",
        "tp1",
        "tp2",
        "cpu-torch",
        "tpu-jax",
    ):
        assert old in PRESETS
    assert PRESETS["tp1"].engine["tp_size"] == 1 and PRESETS["tp2"].engine["tp_size"] == 2


@pytest.mark.parametrize("names", [["plait"], ["plait", "plait"], ["plait", "sglang"], []])
def test_compare_needs_a_baseline_and_known_distinct_presets(names):
    with pytest.raises(ValueError, match="--compare"):
        parse_presets(names)


def test_arguments_that_cannot_work_together_are_refused(capsys):
    for argv in (
        ["--compare", "plait", "gguf", "--phases", "--metric", "decode"],
        ["--compare", "transformers", "plait", "--phases"],
        ["--compare", "plait", "gguf", "--rounds", "0"],
        ["--compare", "transformers", "plait", "--itl"],
    ):
        with pytest.raises(SystemExit):
            offline.parse_args(argv)
    assert "--phases" in capsys.readouterr().err


def test_unknown_workload_is_refused_naming_the_option():
    args, _ = offline.parse_args(["--compare", "plait", "gguf", "--workloads", "batch2"])
    with pytest.raises(SystemExit, match="--workloads"):
        offline.select_workloads(args)
    args, _ = offline.parse_args(
        ["--compare", "plait", "gguf", "--quick", "--workloads", "mixed,batch1"]
    )
    assert [w.name for w in offline.select_workloads(args)] == ["mixed", "batch1"]
    assert args.rounds == 1


def test_every_presets_cpu_switches_are_cpu_options_fields():
    """A preset's ``cpu`` switches become the engine's ``CpuOptions`` (the class is never
    patched); a stale switch name fails here, not in a long benchmark run."""
    for preset in PRESETS.values():
        options = offline.cpu_options(preset.cpu)
        assert (options is None) == (not preset.cpu)
        if options is not None:
            assert isinstance(options, CpuOptions)
            assert all(getattr(options, k) == v for k, v in preset.cpu.items())
    with pytest.raises(TypeError):
        offline.cpu_options({"prepack_weight": False})


class _FakeEngine:
    """Each generate call costs ``per_token`` fake seconds per generated token of the longest
    request; counters as ``get_server_info`` reports them."""

    def __init__(self, name: str, clock: list[float], per_token: float, order: list[str]):
        self.name, self.clock, self.per_token, self.order = name, clock, per_token, order
        self.info = {"forward_passes": 0, "forward_seconds": 0.0, "generated_tokens": 0}

    def flush_cache(self):
        pass

    def generate(self, *, input_ids, sampling_params):
        steps = max(sp["max_new_tokens"] for sp in sampling_params)
        self.order.append(self.name)
        self.clock[0] += self.per_token * steps
        self.info["forward_passes"] += steps
        self.info["forward_seconds"] += 0.5 * self.per_token * steps
        self.info["generated_tokens"] += sum(sp["max_new_tokens"] for sp in sampling_params)

    def get_server_info(self):
        return dict(self.info)


def test_rounds_alternate_and_rows_hold_medians_with_phases(monkeypatch):
    clock, order = [0.0], []
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    engines = {"a": _FakeEngine("a", clock, 0.1, order), "b": _FakeEngine("b", clock, 0.05, order)}
    args, _ = offline.parse_args(["--compare", "plait", "gguf", "--rounds", "3", "--phases"])
    w = harness.Workload(
        name="batch2", title="batch 2 (tok/s)", unit="tok/s", requests=[([1, 2], 10), ([3, 4], 10)]
    )
    rows, phases = offline.run(engines, {"a": 1, "b": 1}, [w], args)
    assert order == list("abbaab")
    assert rows == [("batch 2 (tok/s)", {"a": pytest.approx(20.0), "b": pytest.approx(40.0)})]
    split = {label: values for label, values in phases}
    assert split["batch2 wall_ms"] == {"a": pytest.approx(100.0), "b": pytest.approx(50.0)}
    assert split["batch2 exposed_ms"]["a"] == pytest.approx(50.0)
    assert split["batch2 tokens_per_pass"]["b"] == pytest.approx(2.0)
    assert "| batch 2 (tok/s) | 20.00 | 40.00 | 2.00x |" in harness.table(rows, "a", "{:.2f}")
