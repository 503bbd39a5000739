"""The bench driver's pure parts: results schema and writer, scaling fit, synthetic catalogue, README section.

No timing assertions: the figures themselves are measured by `make bench`, never in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

# benchmarks/ is not an installed package: make it importable under a bare `pytest` too (`python -m pytest`
# already has the repository on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import readme_section  # noqa: E402
from benchmarks.run import (  # noqa: E402
    KEYS,
    LATEST,
    TensorMemoryPeak,
    batch_weight,
    heaviest_batches_first,
    make_entry,
    read_results,
    scaling_exponent,
    synthetic_sequences,
    validate_results,
    write_results,
)

HARDWARE = {"cpu": "Test CPU", "cores": 2, "torch_threads": 1, "gpu": None, "torch": "2.x", "device": "cpu",
            "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [2.0, 1.5, 1.0]}


def payload(partial: bool = False, keys: list[str] | None = None) -> dict:
    """A results payload with one synthetic entry per key (values derived from the key, not hard-coded)."""
    entries = {key: make_entry(key, 0.5 + i, values={"i": i}, measured="synthetic", hardware=HARDWARE,
                               extrapolated=key.startswith("lora"), steps=3 if key.startswith("lora") else None)
               for i, key in enumerate(keys if keys is not None else KEYS)}
    return {"schema_version": 1, "mode": "quick", "partial": partial, "groups": ["stage1"],
            "measured_at": "2026-01-01T00:00:00Z", "finished_unix": 1767225600.0, "wall_seconds": 12.0,
            "git_commit": "abc", "hardware": HARDWARE, "settings": {"threads": 1}, "entries": entries}


def test_entries_carry_every_field_and_targets():
    entry = make_entry("stage1_speedup_vs_morec_loop", 3.5, values={"ours": 70.0, "morec": 20.0},
                       measured="m", hardware=HARDWARE)
    assert entry["ratio"] == 3.5 and entry["unit"] == "x"
    assert entry["target"] == {"op": ">=", "value": 3.0} and entry["meets_target"] is True
    below = make_entry("eval_seconds_sci_test", 1.5, values={}, measured="m", hardware=HARDWARE)
    assert below["ratio"] is None and below["meets_target"] is False
    assert make_entry("stage1_items_per_s", 70.0, values={}, measured="m", hardware=HARDWARE)["meets_target"] is None
    with pytest.raises(KeyError, match="unknown benchmark key"):
        make_entry("made_up", 1.0, values={}, measured="m", hardware=HARDWARE)


def test_writer_writes_latest_and_dated_copy_with_every_key(tmp_path):
    data = payload()
    latest, dated = write_results(data, tmp_path / "results")
    assert latest.name == LATEST and dated.name == "2026-01-01T00-00-00Z.json"
    assert latest.read_text() == dated.read_text()
    loaded = read_results(latest)
    assert list(loaded["entries"]) == list(KEYS)
    for key, entry in loaded["entries"].items():
        assert entry["key"] == key
        assert {"loadavg_before", "loadavg_after", "cpu", "torch_threads"} <= set(entry["hardware"])
    assert not list((tmp_path / "results").glob("*.tmp"))


def test_writer_rejects_incomplete_or_malformed_results(tmp_path):
    missing = payload(keys=[k for k in KEYS if k != "cache_hit_seconds"])
    with pytest.raises(ValueError, match="missing entry 'cache_hit_seconds'"):
        write_results(missing, tmp_path)
    assert not list(tmp_path.iterdir())                     # nothing written
    validate_results({**missing, "partial": True})          # a partial run (--only) may lack keys
    bad = payload()
    bad["entries"]["lora_over_ssna_epoch_ratio"]["steps"] = None
    del bad["entries"]["eval_seconds_sci_test"]["hardware"]["loadavg_after"]
    with pytest.raises(ValueError) as err:
        validate_results(bad)
    assert "extrapolated without the number of steps" in str(err.value)
    assert "lacks 'loadavg_after'" in str(err.value)


def test_read_results_names_file_and_fix(tmp_path):
    broken = tmp_path / "latest.json"
    broken.write_text('{"mode": \n')
    with pytest.raises(ValueError, match=r"latest.json, line \d+: not valid JSON.*make bench"):
        read_results(broken)
    with pytest.raises(FileNotFoundError, match="make bench"):
        read_results(tmp_path / "absent.json")


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_scaling_exponent_recovers_the_power(power):
    sizes = np.array([1000, 4000, 16000])
    rng = np.random.default_rng(0)
    seconds = 0.01 * sizes**power * rng.uniform(0.97, 1.03, size=3)   # a little timing noise
    assert scaling_exponent(sizes, seconds) == pytest.approx(power, abs=0.05)


def test_scaling_exponent_rejects_degenerate_input():
    with pytest.raises(ValueError, match="two distinct positive sizes"):
        scaling_exponent([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive and finite"):
        scaling_exponent([1, 2], [1.0, 0.0])


def test_synthetic_catalogue_replicates_with_distinct_ids():
    sequences = [np.array([5, 2, 7]), np.array([2, 9, 5, 1]), np.array([3, 3, 4])]
    seqs, source = synthetic_sequences(sequences, 10, 3, users=2)
    used = np.array([1, 2, 5, 7, 9])                         # the items the first 2 users touch
    assert len(seqs) == 6 and len(source) == 3 * len(used)
    assert np.array_equal(source, np.tile(used, 3))
    for c in range(3):                                       # copy c maps back to the real items, ids shifted
        for base, copy in zip(sequences[:2], seqs[2 * c:2 * c + 2], strict=True):
            assert np.array_equal(source[copy], base)
            assert copy.min() >= c * len(used) and copy.max() < (c + 1) * len(used)
    whole, whole_source = synthetic_sequences(sequences, 10, 2)
    assert np.array_equal(whole_source, np.tile(np.arange(10), 2)) and np.array_equal(whole[3], sequences[0] + 10)


def test_readme_section_replaced_only_between_markers(tmp_path):
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(payload()))
    readme = tmp_path / "README.md"
    head, tail = "# Title\n\n## Measured performance\n\n", "\nText after the section.\n"
    readme.write_text(f"{head}{readme_section.BEGIN}\nold hand-typed figures\n{readme_section.END}{tail}")
    assert readme_section.update_readme(readme, results, check=True) is True
    assert "old hand-typed" in readme.read_text()            # --check changes nothing
    assert readme_section.update_readme(readme, results) is True
    text = readme.read_text()
    assert text.startswith(head + readme_section.BEGIN + "\n") and text.endswith(readme_section.END + tail)
    assert "old hand-typed" not in text
    for key in KEYS:
        assert f"| `{key}` |" in text
    assert "[extrapolated from 3 steps]" in text
    assert readme_section.update_readme(readme, results) is False   # idempotent


@pytest.mark.parametrize("text, problem", [
    ("no markers here\n", "found 0 and 0"),
    (f"{readme_section.END}\nx\n{readme_section.BEGIN}\n", "comes before"),
    (f"{readme_section.BEGIN}\n{readme_section.END}\n{readme_section.BEGIN}\n", "found 2 and 1"),
])
def test_readme_section_fails_clearly_without_markers(tmp_path, text, problem):
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(payload()))
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(readme_section.MarkerError, match=problem):
        readme_section.update_readme(readme, results)
    assert readme.read_text() == text


class FakeEvent:
    """A CUDA event stand-in: record() stamps a clock the test advances; elapsed_time() is in milliseconds."""

    clock_ms = 0.0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing, "CudaClock must ask for timing events"
        self.at: float | None = None

    def record(self) -> None:
        self.at = FakeEvent.clock_ms

    def synchronize(self) -> None:
        assert self.at is not None, "synchronize() on an event never recorded"

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


def test_cuda_clock_records_event_time_and_peak_memory(monkeypatch):
    """The GPU branch of `make bench` (no GPU here): CUDA event time and max allocated memory of the block, peak
    statistics reset on entry; on a CPU device the clock records nothing."""
    import torch

    from benchmarks.run import CudaClock

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.clock_ms = 100.0
    with CudaClock("cuda:0") as clock:
        FakeEvent.clock_ms = 350.0
    assert calls == ["synchronize", "reset"]
    assert clock.result() == {"event_seconds": 0.25, "max_memory_allocated_mb": 3.0}
    with CudaClock("cpu") as cpu_clock:
        pass
    assert cpu_clock.result() is None


def test_tensor_memory_peak_counts_torch_allocations_from_the_block_start(tmp_path):
    import torch

    before = torch.ones(2**20)                          # 4 MiB allocated before the block: not counted
    with TensorMemoryPeak(tmp_path) as probe:
        big = torch.ones(2 * 2**20)                     # 8 MiB
        del big
        small = torch.ones(2**18)                       # 1 MiB, after the 8 MiB were freed
        del before
    assert 8.0 <= probe.peak_mb < 8.5
    assert probe.events >= 2 and small.numel() == 2**18
    assert not list(tmp_path.iterdir())                 # the profiler's trace is not left behind


def test_tensor_memory_peak_refuses_a_block_that_allocated_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="no CPU allocation events"):
        with TensorMemoryPeak(tmp_path):
            pass


def test_profiled_runs_take_each_epochs_heaviest_batches_first():
    from tests.synthetic import catalogue_walks
    from train import leave_one_out

    split = leave_one_out(catalogue_walks(80, 60, 3, 20), 60)
    shuffled = list(split.train.batches(8, np.random.default_rng(0)))
    with heaviest_batches_first():
        ordered = list(split.train.batches(8, np.random.default_rng(0)))
    weights = [batch_weight(b) for b in ordered]
    assert weights == sorted(weights, reverse=True) and weights != [batch_weight(b) for b in shuffled]
    key = lambda b: tuple(b.users.tolist())  # noqa: E731
    assert sorted(map(key, ordered)) == sorted(map(key, shuffled))     # the same batches, only reordered
    again = list(split.train.batches(8, np.random.default_rng(0)))     # and only inside the block
    assert [key(b) for b in again] == [key(b) for b in shuffled]


def child_row(spec: dict) -> dict:
    """What a training child reports for SPEC: a whole run's epochs (a cold first one on CUDA), or a bounded one."""
    whole = not spec.get("steps")
    epochs = spec["epochs"] if whole else 1
    times = [34.0] + [8.0 + i for i in range(epochs - 1)] if spec["device"] == "cuda" else [9.0] * epochs
    return {"method": spec["method"], "device": spec["device"], "epochs": epochs, "epoch_seconds": times,
            "warmup_epochs": spec.get("warmup_epochs", 0), "extrapolated": not whole, "steps": spec.get("steps") or 134,
            "batches_measured": 134 if whole else 80, "batches_per_epoch": 134 if spec["method"] != "lora" else 1066,
            "seconds_per_epoch": float(np.median(times[spec.get("warmup_epochs", 0):])), "batch_size": 256,
            "grad_accum": 1, "peak_rss_mb": 1.0, "baseline_rss_mb": 0.5, "fit_peak_memory_mb": 10.0,
            "trainable_params": 1, "unique_items_per_batch": 1.0, "cuda": None, "tensor_peak_mb": 5.0,
            "feature_table_mb": 1.0, "max_unique_items": 1}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_whole_epoch_runs_leave_a_cold_gpu_epoch_out(device):
    """On a GPU the SSNA/TMoE runs get one more epoch, left out of the median and said so; on CPU none."""
    from types import SimpleNamespace

    from benchmarks.run import FULL, group_train

    specs = []
    ctx = SimpleNamespace(plan=FULL, device=device, autocast="bf16", hardware=HARDWARE,
                          child=lambda spec: specs.append(spec) or child_row({**spec, "device": device}))
    entries = {e["key"]: e for e in group_train(ctx)}
    ssna = next(s for s in specs if s["method"] == "ssna")
    warm = int(device == "cuda")
    assert ssna["epochs"] == FULL.train_epochs + warm and ssna["warmup_epochs"] == warm
    seconds = entries["ssna_epoch_seconds_sci"]
    assert seconds["value"] == (8.5 if warm else 9.0)          # the median of the epochs after the cold one
    assert ("warm-up epoch left out" in seconds["measured"]) == bool(warm)
    assert ("cold start" in entries["lora_over_ssna_epoch_ratio"]["measured"]) == bool(warm)
