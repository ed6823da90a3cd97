"""compare.py on small hand-made results files: the table's numbers, the per-epoch view,
the plot, and a one-line exit 2 for every kind of bad input."""
import json
import re
import subprocess
import sys

import pytest

import compare
from conftest import REPO

BUG_EPOCHS = [  # acc, train loss, test loss, seconds, images/s, GiB
    (1.0, 4.61, 4.60, 620.0, 80.0, 10.00),
    (1.2, 4.59, 4.58, 600.0, 82.0, 10.24),
    (1.1, 4.58, 4.59, 610.0, 83.0, 10.10),
]
FIXED_EPOCHS = [(40.0, 2.50, 2.20, 60.0, 1160.0, 3.00), (52.5, 1.80, 1.75, 50.0, 1180.0, 3.20)]
CPU_EPOCHS = [(5.0, 4.40, 4.30, 100.0, 10.0, None), (9.0, 4.00, 3.90, 120.0, 8.0, None),
              (8.0, 3.80, 3.95, 90.0, 11.0, None)]
DUMMY_EPOCHS = [(30.0, 3.00, 3.10, 2.0, 500.0, None)]


def write_run(tmp_path, run_name, epochs, *, script="fixed", status="finished", total=3,
              image_size=224, batch_size=64, lr=0.005, trainable=4135648, updated=None,
              dummy=False, device="NVIDIA H100 80GB HBM3", warmup=None):
    config = dict(script=script, weights=None, image_size=image_size, batch_size=batch_size,
                  lr=lr, optimizer="Adam", epochs=total, seed=0, total_params=4135648,
                  trainable_params=trainable,
                  updated_params=trainable if updated is None else updated,
                  pretrained="imagenet", dummy=dummy, fast=False, device=device,
                  torch="2.14.1", workers=8, limit_train_batches=None, limit_eval_batches=None)
    entries = [dict(epoch=i, train_loss=train, train_acc=acc / 2, test_loss=test, test_acc=acc,
                    epoch_seconds=seconds, train_images_per_second=speed, peak_gpu_memory_gib=gib,
                    warmup_seconds=warmup)
               for i, (acc, train, test, seconds, speed, gib) in enumerate(epochs, start=1)]
    path = tmp_path / f"{run_name}.json"
    path.write_text(json.dumps(dict(script=script, run_name=run_name, status=status,
                                    config=config, epochs=entries)))
    return path


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path, "bug", BUG_EPOCHS, script="bug", image_size=1024, batch_size=4,
                      lr=0.01, trainable=42016, updated=0),
            write_run(tmp_path, "fixed", FIXED_EPOCHS, status="running"),
            write_run(tmp_path, "cpu-run", CPU_EPOCHS, status="interrupted", total=5, device="cpu"),
            write_run(tmp_path, "smoke", DUMMY_EPOCHS, total=1, dummy=True, device="cpu")]


def table_rows(text, title=None):
    """{first cell: {header: cell}} for the table under the line starting with title
    (the first table when None); cells are split on runs of two or more spaces."""
    lines = text.splitlines()
    start = 0 if title is None else 1 + next(i for i, text_line in enumerate(lines)
                                            if text_line.startswith(title))
    headers = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(headers), line
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def test_summary_table_numbers(runs, capsys):
    assert compare.main([str(p) for p in runs]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ["bug", "fixed", "cpu-run", "smoke*"]
    bug, fixed, cpu, dummy = rows.values()
    # BN weights require grad but none reach the optimizer: the bug, shown in the recipe
    recipe = "recipe (trainable/total params)"
    assert bug[recipe] == "1024px bs4 lr0.01 42.0K/4.14M (0 in optimizer)"
    assert bug["epochs"] == "3/3"
    assert (bug["final acc %"], bug["best acc %"]) == ("1.10", "1.20")      # last vs max
    assert (bug["test loss"], bug["train loss"]) == ("4.590", "4.580")
    assert (bug["s/epoch"], bug["img/s"], bug["peak GiB"]) == ("610.0", "82.0", "10.24")
    assert fixed[recipe] == "224px bs64 lr0.005 4.14M/4.14M"
    assert fixed["epochs"] == "2/3 (running/crashed)"
    assert (fixed["final acc %"], fixed["best acc %"]) == ("52.50", "52.50")
    assert (fixed["s/epoch"], fixed["img/s"], fixed["peak GiB"]) == ("55.0", "1170.0", "3.20")
    assert cpu["epochs"] == "3/5 (interrupted)"
    assert (cpu["final acc %"], cpu["best acc %"]) == ("8.00", "9.00")
    assert (cpu["s/epoch"], cpu["img/s"], cpu["peak GiB"]) == ("100.0", "10.0", "-")
    assert dummy["epochs"] == "1/1"
    assert compare.DUMMY_NOTE in out
    assert "different devices" in out  # GPU and CPU speeds are not comparable


def test_ratios_against_first_run(runs, capsys):
    compare.main([str(p) for p in runs])
    ratios = table_rows(capsys.readouterr().out, "ratios vs bug")
    assert list(ratios) == ["fixed", "cpu-run", "smoke*"]
    # by hand: 1170/82 = 14.27, 55/610 = 0.090, 3.20/10.24 = 0.3125, 52.5 - 1.1 = 51.4
    assert ratios["fixed"] == {"run": "fixed", "img/s": "14.3x", "s/epoch": "0.09x",
                               "peak GiB": "0.31x", "final acc": "+51.4 pts"}
    # 10/82 = 0.12, 100/610 = 0.16; no GPU memory on the CPU run, so no memory ratio
    assert ratios["cpu-run"] == {"run": "cpu-run", "img/s": "0.12x", "s/epoch": "0.16x",
                                 "peak GiB": "-", "final acc": "+6.9 pts"}
    assert ratios["smoke*"]["s/epoch"] == "0.0033x"  # 2/610: tiny ratios must not print as 0


def test_a_compiled_fast_runs_memory_is_said_to_be_reserved(runs, tmp_path, capsys):
    """A compiled --fast run (its epochs have a warm-up) reports reserved memory: said so."""
    fast = write_run(tmp_path, "fast", FIXED_EPOCHS, warmup=90.0)
    compare.main([str(runs[0]), str(fast)])
    out = capsys.readouterr().out
    assert "note: peak GiB of fast is reserved memory" in out
    compare.main([str(runs[0]), str(runs[1])])
    assert "reserved" not in capsys.readouterr().out


def test_per_epoch_view(runs, capsys):
    assert compare.main([str(runs[0]), str(runs[1]), "--epochs"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("per epoch: test acc % / train loss / test loss")
    assert re.split(r"\s{2,}", lines[start + 1].strip()) == ["epoch", "bug", "fixed"]
    body = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 3:start + 6]]
    assert body == [["1", "1.00 / 4.610 / 4.600", "40.00 / 2.500 / 2.200"],
                    ["2", "1.20 / 4.590 / 4.580", "52.50 / 1.800 / 1.750"],
                    ["3", "1.10 / 4.580 / 4.590", "-"]]  # the partial run has no epoch 3
    compare.main([str(runs[0])])  # one run: no ratios, no notes, no history unasked
    out = capsys.readouterr().out
    assert not any(w in out for w in ("per epoch", "ratios", "dummy", "different devices"))


def test_plot_is_a_readable_png(runs, tmp_path, capsys):
    import matplotlib.image
    png = tmp_path / "out" / "runs.png"
    png.parent.mkdir()
    assert compare.main([*map(str, runs), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
    assert matplotlib.image.imread(png).shape[:2] == (700, 1200)  # 12x7 in at 100 dpi
    assert f"plot: {png}" in capsys.readouterr().out


@pytest.mark.parametrize("first", [True, False], ids=["as-baseline", "after-baseline"])
def test_a_run_with_no_finished_epoch_yet_is_shown_not_refused(runs, tmp_path, capsys, first):
    """bug.py's first epoch takes hours: comparing it meanwhile shows it with dashes."""
    started = write_run(tmp_path, "started", [], script="bug", status="running", total=40,
                        image_size=1024, batch_size=4, lr=0.01, trainable=42016, updated=0)
    paths = [started, runs[0]] if first else [runs[0], started]
    figure = tmp_path / "figure.png"
    assert compare.main([str(p) for p in paths] + ["--epochs", "--plot", str(figure)]) == 0
    out = capsys.readouterr().out
    row = table_rows(out)["started"]
    assert row["epochs"] == "0/40 (running/crashed)"
    assert [row[k] for k in ("final acc %", "best acc %", "test loss", "train loss", "s/epoch",
                             "img/s", "peak GiB")] == ["-"] * 7
    ratio = next(iter(table_rows(out, "ratios vs").values()))
    assert list(ratio.values())[1:] == ["-"] * 4
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("target", ["nowhere/x.png", "no-suffix", "folder.png"])
def test_a_plot_it_cannot_write_is_one_line(runs, tmp_path, capsys, target):
    """A missing folder, a name without a format, an existing folder: one line, exit 2, and
    never "plot: PATH" for a file that was not written."""
    (tmp_path / "folder.png").mkdir()
    target = tmp_path / target
    assert compare.main([str(runs[0]), "--plot", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(target) in captured.err
    assert "plot:" not in captured.out and not target.is_file()


BAD = {  # name: (the file's text, or a change to a good file; words the message must hold)
    "missing": (None, "no such file"),
    "not json": ("{not json", "not JSON"),
    "not an object": ("[1, 2]", "not a results file"),
    "no config": (lambda d: d.pop("config"), "'config'"),
    "epochs not a list": (lambda d: d.update(epochs="3"), "'epochs'"),
    "lr is text": (lambda d: d["config"].update(lr="fast"), "'lr'"),
    "epoch lacks a key": (lambda d: d["epochs"][1].pop("test_acc"), "epochs[1]"),
    "memory is bool": (lambda d: d["epochs"][0].update(peak_gpu_memory_gib=True),
                       "peak_gpu_memory_gib"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, runs, tmp_path, capsys):
    content, words = BAD[case]
    path = tmp_path / "bad.json"
    if callable(content):
        document = json.loads(runs[0].read_text())
        content(document)
        content = json.dumps(document)
    if content is not None:
        path.write_text(content)
    # a good file first: a bad one anywhere in the list stops the whole comparison
    assert compare.main([str(runs[0]), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("compare.py: error: ")
    assert str(path) in captured.err and words in captured.err


def test_command_line_shows_no_traceback(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = subprocess.run([sys.executable, str(REPO / "compare.py"), str(garbage)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(garbage) in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
