"""bench.py's CPU smoke (four tiny rows, table last on stdout) and a one-line refusal."""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import one_error_line, run_script

ROWS = [["bug", "default"], ["fixed", "default"], ["fixed", "fast"], ["bug", "fast"]]
NUMBERS = ["model img/s", "e2e img/s", "e2e/model", "eval img/s", "warm-up s",
           "est. s/epoch"]


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_cpu_smoke_and_refusal(tmp_path):
    # the refusal runs while the smoke does: less wall time
    with ThreadPoolExecutor() as pool:
        smoke = pool.submit(run_script, "bench.py", "--device", "cpu", "--tiny",
                            "--only", "all", cwd=tmp_path)
        assert "--only bug,nonsense" in one_error_line(
            run_script("bench.py", "--only", "bug,nonsense", cwd=tmp_path), 2)
        done = smoke.result()
    assert done.returncode == 0, done.stderr[-3000:]

    # The table last: the header line, a blank line, the column names, a rule, four rows.
    header, blank, names, rule, *table = done.stdout.rstrip().splitlines()[-8:]
    assert header.startswith(f"bench.py on cpu, torch {torch.__version__}, ")
    assert header.endswith("CPUs, --workers 0, --dummy data, random weights")
    assert not blank
    assert names.startswith("| recipe | mode ") and set(rule) <= set("| -")
    assert [cells(line)[:2] for line in table] == ROWS
    for line in table:
        shown = dict(zip(cells(names), cells(line)))
        # the CPU
        assert (shown["px"], shown["batch"], shown["peak GiB"]) == ("32", "4", "-")
        value = {key: float(shown[key].replace(",", "").rstrip("%")) for key in NUMBERS}
        assert all(math.isfinite(number) and number > 0
                   for number in value.values()), shown
        # Rates are shown to 2 significant digits at worst (5%), the ratio to 1%.
        assert value["e2e/model"] / 100 == pytest.approx(
            value["e2e img/s"] / value["model img/s"], rel=0.15, abs=0.01), shown
        assert value["est. s/epoch"] == pytest.approx(
            50_000 / value["e2e img/s"] + 10_000 / value["eval img/s"], rel=0.1), shown
