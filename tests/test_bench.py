"""bench.py's CPU smoke (four tiny rows, the table last, the JSON) and its one-line refusals."""
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import one_error_line, run_script
from training.loop import rate

ROWS = [["bug", "default"], ["fixed", "default"], ["fixed", "fast"], ["bug", "fast"]]
NUMBERS = ["model_train_images_per_second", "model_eval_images_per_second",
           "end_to_end_train_images_per_second", "end_to_end_eval_images_per_second",
           "warmup_seconds", "epoch_seconds_estimate", "row_seconds"]


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_cpu_smoke_and_refusals(tmp_path):
    path = tmp_path / "out" / "bench.json"  # in a folder that does not exist yet
    with ThreadPoolExecutor() as pool:  # the refusals run while the smoke does: less wall time
        smoke = pool.submit(run_script, "bench.py", "--device", "cpu", "--tiny", "--only", "all",
                            "--json", path, cwd=tmp_path)
        assert "--only bug,nonsense" in one_error_line(
            run_script("bench.py", "--only", "bug,nonsense", cwd=tmp_path), 2)
        while not (path.exists() or smoke.done()):  # written before the first row
            time.sleep(0.1)
        assert path.exists(), smoke.result().stderr[-3000:]
        again = run_script("bench.py", "--device", "cpu", "--tiny", "--json", path, cwd=tmp_path)
        assert f"--json {path} exists" in one_error_line(again, 2)
        done = smoke.result()
    assert done.returncode == 0, done.stderr[-3000:]

    document = json.loads(path.read_text())
    assert document["status"] == "finished" and document["device"] == "cpu"  # not clobbered
    assert document["torch"] == str(torch.__version__) and document["workers"] == 0
    rows = document["rows"]
    assert [[row["recipe"], row["mode"]] for row in rows] == ROWS
    for row in rows:
        assert (row["image_size"], row["batch_size"], row["compiled"]) == (32, 4, False)
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in NUMBERS), row
        assert 0 < row["end_to_end_over_model"] < 10  # a ratio, not a percentage
        assert row["end_to_end_over_model"] == pytest.approx(
            row["end_to_end_train_images_per_second"] / row["model_train_images_per_second"])
        assert row["epoch_seconds_estimate"] == pytest.approx(
            50_000 / row["end_to_end_train_images_per_second"]
            + 10_000 / row["end_to_end_eval_images_per_second"])
        assert row["peak_gpu_memory_gib"] is None  # the CPU

    # The table last: the header line, a blank line, the column names, a rule, four rows.
    lines = done.stdout.rstrip().splitlines()
    header, blank, names, rule, *table = lines[-8:]
    assert header.startswith(f"bench.py on cpu, torch {torch.__version__}, ")
    assert header.endswith("CPUs, --workers 0, --dummy data, random weights") and not blank
    assert names.startswith("| recipe | mode ") and set(rule) <= set("| -")
    assert [cells(line)[:2] for line in table] == ROWS
    column = cells(names)
    for line, row in zip(table, rows):
        shown = dict(zip(column, cells(line)))
        assert shown["e2e img/s"] == rate(row["end_to_end_train_images_per_second"])
        assert shown["px"] == "32" and shown["peak GiB"] == "-"
