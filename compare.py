"""Compare runs from their results files (results/NAME.json, written every epoch; a run
in progress, stopped, on the CPU or on --dummy data is fine): a table of recipe, accuracy,
loss, speed and memory; --plot draws loss and accuracy."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import schema

DUMMY_NOTE = "* dummy run: synthetic data; accuracy only says whether the model learns"
HEADERS = ["run", "recipe (trainable/total params)", "epochs", "final acc %",
           "best acc %", "test loss", "train loss", "s/epoch", "img/s", "peak GiB"]


class Refused(Exception):
    """What compare.py cannot use (a results file, a --plot path): one line naming it."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="results files")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="write a figure of the runs to this file (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    try:
        if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise Refused(f"--plot {args.plot}: name a file ending in .png, .pdf or .svg")
        runs = [load_run(path) for path in args.runs]
        name_runs(runs)
        print(table(runs))
        if args.plot:
            plot(runs, args.plot)
            print(f"\nplot: {args.plot}")  # only once it is written
    except Refused as error:  # one line, no usage: a file is wrong, not the command line
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def load_run(path) -> dict:
    """One results file, validated (schema.py), its epochs in order."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # missing, unreadable, not JSON
        raise Refused(f"{path}: cannot be read as JSON ({error})") from None
    problem = (schema.problem(run, schema.RESULTS, "the top level")
               or schema.problem(run["config"], schema.CONFIG, "config")
               or next(filter(None, (schema.problem(entry, schema.EPOCH, f"epochs[{i}]")
                                     for i, entry in enumerate(run["epochs"]))), None))
    if problem:
        raise Refused(f"{path}: not a results file: {problem}")
    run["epochs"].sort(key=lambda e: e["epoch"])
    run["path"] = Path(path)
    return run


def name_runs(runs):
    """Each run's run name, or its path where runs share one; "*" marks dummy data."""
    names = [run["run_name"] for run in runs]
    for run in runs:
        shared = names.count(run["run_name"]) > 1
        name = str(run["path"].with_suffix("")) if shared else run["run_name"]
        run["name"] = name + ("*" if run["config"]["dummy"] else "")


def table(runs) -> str:
    """One row per run ("-" where it has no epoch yet), then the notes it needs."""
    def count(n):
        if n >= 1e6:
            return f"{n / 1e6:.2f}M"
        return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

    rows = []
    for run in runs:
        config, epochs = run["config"], run["epochs"]
        recipe = (f"{config['image_size']}px bs{config['batch_size']} lr{config['lr']:g} "
                  f"{count(config['trainable_params'])}/{count(config['total_params'])}")
        if config["updated_params"] != config["trainable_params"]:  # the bug: no step
            recipe += f" ({count(config['updated_params'])} in optimizer)"
        progress = f"{len(epochs)}/{config['epochs']}"
        if run["status"] != "finished" or len(epochs) < config["epochs"]:
            # a killed process leaves "running" behind
            status = {"running": "running/crashed", "finished": "stopped early"}
            progress += f" ({status.get(run['status'], run['status'])})"
        rows.append([run["name"], recipe, progress, *figures(epochs)])

    widths = [max(len(cell) for cell in column) for column in zip(HEADERS, *rows)]
    lines = ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)  # text, numbers
                       for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
             for cells in [HEADERS, ["-" * w for w in widths], *rows]]
    notes = [DUMMY_NOTE] if any(run["config"]["dummy"] for run in runs) else []
    reserved = [run["name"] for run in runs  # --fast on a GPU
                if run["config"]["fast"] and run["config"]["device"] != "cpu"]
    if reserved:
        notes.append(f"note: peak GiB of {', '.join(reserved)} is reserved memory "
                     "(--fast's CUDA graphs keep their tensors in a pool not counted as "
                     "allocated); the other runs' is allocated")
    return "\n\n".join(["\n".join(lines), *notes])


def figures(epochs):
    """A row's figures. Time and speed are medians: epoch 1 carries cuDNN's autotuning
    or a compile."""
    if not epochs:
        return ["-"] * 7
    final, gib = epochs[-1], max(e["peak_gpu_memory_gib"] or 0 for e in epochs)
    return [f"{final['test_acc']:.2f}", f"{max(e['test_acc'] for e in epochs):.2f}",
            f"{final['test_loss']:.3f}", f"{final['train_loss']:.3f}",
            f"{statistics.median(e['epoch_seconds'] for e in epochs):.1f}",
            f"{statistics.median(e['train_images_per_second'] for e in epochs):.1f}",
            f"{gib:.2f}" if gib else "-"]


def plot(runs, path):
    """Loss (train solid, test dashed) and test accuracy per epoch, one colour per run,
    written to `path`; returns the figure."""
    from matplotlib.figure import Figure  # not pyplot: Agg, no display, no global state
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(12, 5), dpi=100, layout="constrained")  # room for the title
    losses, accuracy = figure.subplots(1, 2)
    for i, run in enumerate(runs):
        epochs, style = run["epochs"], dict(color=f"C{i % 10}", markersize=3)
        x = [e["epoch"] for e in epochs]
        losses.plot(x, [e["train_loss"] for e in epochs], "-o", **style)
        losses.plot(x, [e["test_loss"] for e in epochs], "--s", **style)
        # A run with no epoch yet draws no line, but is in the legend.
        label = run["name"] + ("" if epochs else " (no epoch yet)")
        accuracy.plot(x, [e["test_acc"] for e in epochs], "-o", label=label, **style)
    losses.set(title="loss (train solid, test dashed)", xlabel="epoch",
               ylabel="cross-entropy")
    accuracy.set(title="test accuracy per epoch", xlabel="epoch", ylabel="%")
    accuracy.legend(fontsize=8)
    for axes in (losses, accuracy):
        # Whole epochs, even for a run of one: no tick at 0.96 or 1.5.
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
    dummy = "\n" + DUMMY_NOTE if any(run["config"]["dummy"] for run in runs) else ""
    figure.suptitle("Training runs: " + " vs ".join(run["name"] for run in runs) + dummy)
    try:
        figure.savefig(path)
    except OSError as error:  # a missing folder, an existing folder of that name
        raise Refused(f"{path}: cannot write the plot: {error}") from None
    return figure


if __name__ == "__main__":
    sys.exit(main())
