"""compare.py on small hand-made results files: each table cell, its notes, the plot,
a run with no epoch yet, and one stderr line and exit 2 per bad results file or --plot."""
import json
import re

import pytest

import compare
from conftest import run_script

# acc, train loss, test loss, seconds, images/s, GiB (None on the CPU), one tuple an epoch
BUG_EPOCHS = [(1.0, 4.61, 4.60, 620.0, 80.0, 10.00),
              (1.2, 4.59, 4.58, 600.0, 82.0, 10.24),
              (1.1, 4.58, 4.59, 610.0, 83.0, 10.10)]
FIXED_EPOCHS = [(40.0, 2.50, 2.20, 60.0, 1160.0, 3.00),
                (52.5, 1.80, 1.75, 50.0, 1180.0, 3.20)]
CPU_EPOCHS = [(5.0, 4.40, 4.30, 100.0, 10.0, None),
              (9.0, 4.00, 3.90, 120.0, 8.0, None),
              (8.0, 3.80, 3.95, 90.0, 11.0, None)]
DUMMY_EPOCHS = [(30.0, 3.00, 3.10, 2.0, 500.0, None)]


def write_run(tmp_path, run_name, epochs, *, script="fixed", status="finished", total=3,
              image_size=224, batch_size=64, lr=0.005, trainable=4135648, updated=4135648,
              dummy=False, device="NVIDIA H100 80GB HBM3", fast=False):
    config = dict(script=script, weights=None, image_size=image_size,
                  batch_size=batch_size, lr=lr, optimizer="Adam", epochs=total, seed=0,
                  total_params=4135648, trainable_params=trainable,
                  updated_params=updated, pretrained="imagenet",
                  dummy=dummy, fast=fast, device=device, torch="2.14.1",
                  workers=8, limit_train_batches=None, limit_eval_batches=None)
    entries = [dict(epoch=i, train_loss=train, train_acc=acc / 2, test_loss=test,
                    test_acc=acc, epoch_seconds=seconds, train_images_per_second=speed,
                    peak_gpu_memory_gib=gib, warmup_seconds=90.0 if fast else 2.5)
               for i, (acc, train, test, seconds, speed, gib) in enumerate(epochs, 1)]
    path = tmp_path / f"{run_name}.json"
    # epochs newest first: compare.py puts them in order
    path.write_text(json.dumps(dict(script=script, run_name=run_name, status=status,
                                    config=config, epochs=entries[::-1])))
    return path


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path, "bug", BUG_EPOCHS, script="bug", image_size=1024,
                      batch_size=4, lr=0.01, trainable=42016, updated=0),
            write_run(tmp_path, "fixed", FIXED_EPOCHS, status="running"),
            write_run(tmp_path, "cpu-run", CPU_EPOCHS, status="interrupted", total=5,
                      device="cpu"),
            write_run(tmp_path, "smoke", DUMMY_EPOCHS, total=1, dummy=True, device="cpu",
                      fast=True),  # --fast on the CPU: no GPU memory to note
            write_run(tmp_path, "fast", FIXED_EPOCHS, fast=True)]


def table_rows(out):
    """{run: [its other cells]} for the output's opening table (cells 2+ spaces apart)."""
    header, _, *lines = out.split("\n\n")[0].splitlines()
    assert re.split(r"\s{2,}", header) == [
        "run", "recipe (trainable/total params)", "epochs", "final acc %", "best acc %",
        "test loss", "train loss", "s/epoch", "img/s", "peak GiB"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines]
    assert all(len(row) == 10 for row in rows), lines
    return {row[0]: row[1:] for row in rows}


def test_every_cell_and_note(runs, capsys):
    assert compare.main([str(p) for p in runs]) == 0
    out = capsys.readouterr().out
    # final acc is the last epoch's, best acc the highest; s/epoch and img/s medians;
    # peak GiB the highest; bug's recipe: BN weights require grad, 0 in the optimizer
    assert table_rows(out) == {
        "bug": ["1024px bs4 lr0.01 42.0K/4.14M (0 in optimizer)", "3/3",
                "1.10", "1.20", "4.590", "4.580", "610.0", "82.0", "10.24"],
        "fixed": ["224px bs64 lr0.005 4.14M/4.14M", "2/3 (running/crashed)",
                  "52.50", "52.50", "1.750", "1.800", "55.0", "1170.0", "3.20"],
        "cpu-run": ["224px bs64 lr0.005 4.14M/4.14M", "3/5 (interrupted)",
                    "8.00", "9.00", "3.950", "3.800", "100.0", "10.0", "-"],
        "smoke*": ["224px bs64 lr0.005 4.14M/4.14M", "1/1",
                   "30.00", "30.00", "3.100", "3.000", "2.0", "500.0", "-"],
        "fast": ["224px bs64 lr0.005 4.14M/4.14M", "2/3 (stopped early)",
                 "52.50", "52.50", "1.750", "1.800", "55.0", "1170.0", "3.20"]}
    assert compare.DUMMY_NOTE in out
    # --fast's CUDA graphs keep a pool: its peak is reserved memory, the others' allocated
    assert "note: peak GiB of fast is reserved memory" in out
    compare.main([str(runs[0])])
    assert "note" not in capsys.readouterr().out  # one plain GPU run: nothing to explain


def test_plot_is_a_readable_png(runs, tmp_path, capsys):
    import matplotlib.image
    png = tmp_path / "runs.png"
    assert compare.main([*map(str, runs), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000
    assert matplotlib.image.imread(png).shape[:2] == (500, 1200)  # 12x5 in at 100 dpi
    assert capsys.readouterr().out.endswith(f"\nplot: {png}\n")


def test_a_run_with_no_finished_epoch_yet_is_shown_not_refused(runs, tmp_path, capsys):
    """bug.py's first epoch takes hours: comparing it meanwhile shows it with dashes."""
    started = write_run(tmp_path, "started", [], status="running", total=40)
    figure = tmp_path / "figure.png"
    assert compare.main([str(started), str(runs[0]), "--plot", str(figure)]) == 0
    row = table_rows(capsys.readouterr().out)["started"]
    assert row[1:] == ["0/40 (running/crashed)"] + ["-"] * 7
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_one_epoch_and_two_runs_of_one_name(tmp_path, capsys):
    """Whole epochs on the x axis, even for one; runs of one name told apart by path."""
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(write_run(tmp_path / folder, "fixed", DUMMY_EPOCHS, total=1))
    assert compare.main([*map(str, paths), "--plot", str(tmp_path / "x.png")]) == 0
    names = [str(path.with_suffix("")) for path in paths]
    assert list(table_rows(capsys.readouterr().out)) == names
    runs = [compare.load_run(path) for path in paths]
    compare.name_runs(runs)
    figure = compare.plot(runs, tmp_path / "x.png")
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert ticks == [1.0], ticks
    assert [text.get_text() for text in figure.axes[1].get_legend().get_texts()] == names


@pytest.mark.parametrize("target", ["nowhere/x.png", "no-suffix", "folder.png"])
def test_a_plot_it_cannot_write_is_one_line(runs, tmp_path, capsys, target):
    """A missing folder, a name without a format, an existing folder: one line, exit 2,
    and never "plot: PATH" for a file that was not written."""
    (tmp_path / "folder.png").mkdir()
    target = tmp_path / target
    assert compare.main([str(runs[0]), "--plot", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(target) in captured.err
    assert "plot:" not in captured.out and not target.is_file()


# name: (the file's text, or a change to a good file; words the message must hold)
BAD = {
    "missing": (None, "No such file"),
    "not json": ("{not json", "cannot be read as JSON"),
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
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("compare.py: error: ")
    assert str(path) in captured.err and words in captured.err


def test_command_line_shows_no_traceback(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = run_script("compare.py", garbage, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    message = f"compare.py: error: {garbage}: cannot be read as JSON"
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
