"""bench.py's CPU smoke: all four rows at tiny size, the table printed last, the JSON;
and its refusals."""
import json
import math

import pytest
import torch

from conftest import run_script

ROWS = {("bug", "default"), ("fixed", "default"), ("bug", "fast"), ("fixed", "fast")}
RATES = ("model_train_images_per_second", "model_eval_images_per_second",
         "end_to_end_train_images_per_second", "end_to_end_eval_images_per_second")


def test_cpu_smoke_prints_the_table_and_writes_the_json(tmp_path):
    path = tmp_path / "out" / "bench.json"  # a folder that does not exist yet
    done = run_script("bench.py", "--device", "cpu", "--tiny", "--only", "all", "--json", path,
                      cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    document = json.loads(path.read_text())
    assert document["status"] == "finished"
    assert document["device"] == "cpu" and document["torch"] and document["date"]
    rows = document["rows"]
    assert {(row["recipe"], row["mode"]) for row in rows} == ROWS and len(rows) == 4
    for row in rows:
        assert (row["image_size"], row["batch_size"], row["workers"]) == (32, 4, 0)
        for key in RATES + ("model_ms_per_step", "end_to_end_ms_per_step",
                            "epoch_seconds_estimate", "end_to_end_over_model"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["recipe"], row["mode"], key)
        assert row["peak_gpu_memory_gib"] is row["warmup_peak_gpu_memory_gib"] is None  # CPU
        # on the CPU --fast does not compile; a graph here would be a stray torch.compile
        assert (row["compiled_graphs"], row["cudagraph_skips"]) == (0, 0)
        steps = row["timed_steps"]
        assert row["end_to_end_ms_per_step"] > 0 and steps["train"] == steps["eval"] == 2
    # The scripts' own objects were measured: bug.py trains only BatchNorm's affine parameters.
    trainable = {row["recipe"]: row["trainable_params"] for row in rows}
    assert trainable == {"bug": 42_016, "fixed": 4_135_648}
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "results").exists()

    # One table, last: a header naming device and torch, then one line per row.
    lines = done.stdout.rstrip().splitlines()
    table = lines[-6:]
    assert table[0].startswith("| recipe") and set(table[1]) <= set("|-")
    assert [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in table[2:]] \
        == [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
    header = "\n".join(lines[:-6])
    assert "bench.py on cpu" in header and str(torch.__version__) in header


@pytest.mark.parametrize("argv, words", [
    (["--device", "tpu"], ["--device tpu", "unknown device"]),
    (["--device", "cuda"], ["--device cuda", "CUDA is not available", "--device cpu --tiny"]),
    (["--device", "cpu", "--json", "earlier.json"], ["--json earlier.json", "earlier benchmark",
                                                     "--overwrite"]),
], ids=["unknown-device", "no-cuda", "earlier-json"])
def test_refusals_are_one_line_exit_2_and_touch_nothing(tmp_path, argv, words):
    if argv[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    done = run_script("bench.py", *argv, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and all(word in error[0] for word in words), done.stderr
    assert earlier.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json"]


def test_the_clock_times_the_steps_between_two_busy_moments(monkeypatch):
    """End to end, the clock starts when batch warmup+1 arrives and stops when batch
    warmup+steps+1 arrives (the loop is cut there, the workers still busy): `steps` batches
    timed, none of the warm-up, none of the loader's wind-down."""
    import bench
    now = iter(range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(now)))
    clock = bench.BatchClock(torch.device("cpu"), warmup=2, steps=3)
    arrived = 0
    with pytest.raises(bench.Enough):
        for _ in range(10):
            arrived += 1
            clock.check()
    assert arrived == 2 + 3 + 1
    assert clock.seconds_per_batch() == 1 / 3  # two clock reads, one second apart, 3 batches


def test_rows_selected():
    import bench
    assert bench.select_rows(bench.DEFAULT_ROWS) == bench.ROWS[:3]
    assert bench.select_rows("all") == bench.select_rows("bug,fixed") == bench.ROWS
    assert bench.select_rows("fast") == [("fixed", "fast"), ("bug", "fast")]
    with pytest.raises(ValueError, match="unknown row 'fixed:slow'"):
        bench.select_rows("fixed:slow")
