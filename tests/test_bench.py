"""bench.py's CPU smoke: all four rows at tiny size, the table printed last, the JSON;
and its refusals."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import hold_run_lock, run_script

ROWS = {("bug", "default"), ("fixed", "default"), ("bug", "fast"), ("fixed", "fast")}
RATES = ("model_train_images_per_second", "model_eval_images_per_second",
         "end_to_end_train_images_per_second", "end_to_end_eval_images_per_second")


def test_cpu_smoke_prints_the_table_and_writes_the_json(tmp_path):
    # results/ of the folder bench runs in holds a fixed.py run still going (a stand-in
    # process holding its lock): bench builds the scripts elsewhere, neither refused nor
    # touching it.
    results = tmp_path / "results"
    results.mkdir()
    (results / "fixed.json").write_text(json.dumps(dict(script="fixed", status="running")))
    running = hold_run_lock(results / ".fixed.lock")
    path = tmp_path / "out" / "bench.json"  # a folder that does not exist yet
    try:
        done = run_script("bench.py", "--device", "cpu", "--tiny", "--only", "all", "--json",
                          path, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in results.iterdir()) == [".fixed.lock", "fixed.json"]

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
        # The derived fields agree with the times they come from (to float rounding).
        batch, model_ms = row["batch_size"], row["model_ms_per_step"]
        e2e_ms, e2e_rate = row["end_to_end_ms_per_step"], row["end_to_end_train_images_per_second"]
        assert e2e_rate == pytest.approx(1000 * batch / e2e_ms, rel=1e-9)
        assert row["model_train_images_per_second"] == pytest.approx(1000 * batch / model_ms,
                                                                     rel=1e-9)
        # end to end over model only: a fraction, the model-only step time over the e2e one
        assert row["end_to_end_over_model"] == pytest.approx(model_ms / e2e_ms, rel=1e-9)
        assert row["end_to_end_over_model"] == pytest.approx(
            e2e_rate / row["model_train_images_per_second"], rel=1e-9)
        # an epoch: 50,000 training images and 10,000 test images at the end-to-end rates
        assert row["epoch_seconds_estimate"] == pytest.approx(
            50_000 / e2e_rate + 10_000 / row["end_to_end_eval_images_per_second"], rel=1e-9)
    # The scripts' own objects were measured: bug.py trains only BatchNorm's affine parameters.
    trainable = {row["recipe"]: row["trainable_params"] for row in rows}
    assert trainable == {"bug": 42_016, "fixed": 4_135_648}
    assert not list(tmp_path.glob("*.json"))  # the builds wrote nothing (results/ above)

    # One table, last: a header naming device and torch, then one line per row.
    lines = done.stdout.rstrip().splitlines()
    table = lines[-6:]
    assert table[0].startswith("| recipe") and set(table[1]) <= set("|-")
    assert [tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in table[2:]] \
        == [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
    header = "\n".join(lines[:-6])
    assert "bench.py on cpu" in header and str(torch.__version__) in header
    # The table's "e2e img/s" column holds each row's end-to-end training rate.
    names = [cell.strip() for cell in table[0].strip("|").split("|")]
    shown = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]):
             line.strip("|").split("|")[names.index("e2e img/s")].strip() for line in table[2:]}
    assert shown == {(row["recipe"], row["mode"]):
                     f"{row['end_to_end_train_images_per_second']:,.0f}" for row in rows}


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


def test_each_row_is_saved_as_it_ends_and_a_failed_row_fails_the_run(tmp_path, monkeypatch,
                                                                      capsys):
    """A benchmark cut short keeps its finished rows; a row that raises (a compile error,
    say) is recorded with its error, the others still run, and bench exits 1, "failed".
    (measure() stubbed: no model runs.)"""
    import bench
    path = tmp_path / "bench.json"
    rows_on_disk = []

    def measure(recipe, mode, options):
        rows_on_disk.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        if recipe == "fixed":
            raise RuntimeError("compile failed")
        return dict(recipe=recipe, mode=mode, model_train_images_per_second=1.0,
                    end_to_end_train_images_per_second=1.0, end_to_end_over_model=1.0,
                    warmup_seconds=0.0, compiled_graphs=0, cudagraph_skips=0, row_seconds=0.0)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "table", lambda document: "")
    code = bench.main(["--device", "cpu", "--only", "bug:default,fixed:default,bug:fast",
                       "--json", str(path)])
    document = json.loads(path.read_text())
    assert rows_on_disk == [0, 1, 2]  # each row on disk before the next one starts
    assert code == 1 and document["status"] == "failed"
    assert [row.get("error") for row in document["rows"]] == [
        None, "RuntimeError: compile failed", None]
    assert "RuntimeError: compile failed" in capsys.readouterr().err  # its traceback


@pytest.mark.parametrize("eval_steps, fits", [(95, True), (96, False)])
def test_no_end_to_end_loop_reaches_a_partial_batch(eval_steps, fits):
    """fixed.py on a 16-core host: 10,000 test images make 156 full batches of 64 and one
    of 16, another shape (a compile with --fast) that must stay out of the timed window.
    With 15 workers the loop draws 30 warm-up batches, the timed ones, one that stops the
    clock and 30 in the workers' hands."""
    import bench
    r = SimpleNamespace(args=SimpleNamespace(batch_size=64, workers=15),
                        train_set=range(50_000), test_set=range(10_000))
    steps = dict(train=120, eval=eval_steps)
    if fits:
        bench.check_full_batches(r, 30, steps)
    else:
        with pytest.raises(bench.TooManySteps, match="eval loop needs 157 full batches of "
                           "64, and 10,000 images make 156: lower --steps or --workers"):
            bench.check_full_batches(r, 30, steps)


def test_too_many_steps_fail_the_row_in_one_line_before_any_timing(tmp_path):
    """At --tiny's batch of 4, 10,000 test images make 2,500 full batches: --steps 2500
    needs 2,502. The row fails in one line, without a traceback, before it measures."""
    path = tmp_path / "bench.json"
    done = run_script("bench.py", "--device", "cpu", "--tiny", "--only", "fixed:fast",
                      "--steps", "2500", "--json", path, cwd=tmp_path, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    message = ("the end-to-end eval loop needs 2,502 full batches of 4, and 10,000 images "
               "make 2,500: lower --steps or --workers")
    assert [line for line in done.stderr.splitlines() if "error" in line] == [
        f"fixed fast: error: {message}"], done.stderr
    assert "img/s" not in done.stdout.split("written:")[0]  # no measurement line
    row, = json.loads(path.read_text())["rows"]
    assert row == dict(recipe="fixed", mode="fast", error=f"TooManySteps: {message}")


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


def test_table_shows_the_end_to_end_columns_of_a_hand_made_document():
    """bench.table on two made-up rows, no model run: each number sits under its own header."""
    import bench
    base = dict(mode="default", image_size=224, batch_size=64, workers=8,
                peak_gpu_memory_gib=1.25, warmup_seconds=3.0,
                model_eval_images_per_second=12_800.0, end_to_end_eval_images_per_second=9_600.0)
    rows = [
        # model only 10 ms/step = 6,400 img/s; end to end 20 ms/step = 3,200 img/s: 50 %
        dict(base, recipe="fixed", model_ms_per_step=10.0, model_train_images_per_second=6_400.0,
             end_to_end_ms_per_step=20.0, end_to_end_train_images_per_second=3_200.0,
             end_to_end_over_model=0.5, epoch_seconds_estimate=50_000 / 3_200 + 10_000 / 9_600),
        # model only 40 ms/step = 1,600 img/s; end to end 50 ms/step = 1,280 img/s: 80 %
        dict(base, recipe="bug", model_ms_per_step=40.0,
             model_train_images_per_second=1_600.0, end_to_end_ms_per_step=50.0,
             end_to_end_train_images_per_second=1_280.0, end_to_end_over_model=0.8,
             epoch_seconds_estimate=50_000 / 1_280 + 10_000 / 9_600),
    ]
    document = dict(device="NVIDIA H100 80GB HBM3", torch="2.9.0", date="2025-01-02 03:04",
                    cpus=16, workers=8, rows=rows)
    lines = bench.table(document).splitlines()
    assert lines[0].startswith("bench.py on NVIDIA H100 80GB HBM3, torch 2.9.0, 2025-01-02 03:04")
    assert "est. s/epoch = 50,000 + 10,000 images at the e2e rates" in lines[1]
    assert "below it: fixed default, bug default" in lines[2]
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe"))
    names = [cell.strip() for cell in lines[start].strip("|").split("|")]
    assert set(lines[start + 1]) <= set("|-")
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:]]
    assert len(body) == 2
    column = {name: [line[i] for line in body] for i, name in enumerate(names)}
    assert column["recipe"] == ["fixed", "bug"]
    assert column["model img/s"] == ["6,400", "1,600"]
    assert column["e2e img/s"] == ["3,200", "1,280"]
    assert column["e2e ms/step"] == ["20.0", "50.0"]
    assert column["e2e/model"] == ["50%", "80%"]
    assert column["est. s/epoch"] == ["17", "40"]
