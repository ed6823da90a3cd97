"""Compare training runs side by side from their results files (results/NAME.json, written
by bug.py and fixed.py after every epoch): one table of recipe, progress, accuracy, loss,
speed and memory per run, then each run's ratios against the first. Runs in progress,
interrupted, on the CPU or on --dummy data are fine; --epochs adds the per-epoch history,
--plot draws a figure."""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import schema

NO_EPOCH = "no epoch yet"
DUMMY_NOTE = "* dummy run: synthetic data, accuracy only says whether the model can learn at all"
PLOT_FORMATS = (".png", ".pdf", ".svg")


class RunFileError(Exception):
    """A results file that cannot be compared; the message names the file and the problem."""


def load_run(path) -> dict:
    """Read and validate one results file (schema.py); raises RunFileError in one line."""
    try:
        run = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"{path}: cannot read: {error}") from None
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path}: not JSON ({error})") from None
    problem = (schema.problem(run, schema.RESULTS, "the top level")
               or schema.problem(run["config"], schema.CONFIG, "config")
               or next(filter(None, (schema.problem(entry, schema.EPOCH, f"epochs[{i}]")
                                     for i, entry in enumerate(run["epochs"]))), None))
    if problem:
        raise RunFileError(f"{path}: not a results file: {problem}")
    return run


def _count(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def summarize(run) -> dict:
    """Every number the table and the plot show, computed once per run; None where the run
    has no finished epoch yet."""
    config, epochs = run["config"], sorted(run["epochs"], key=lambda e: e["epoch"])
    final, done = (epochs[-1] if epochs else {}), len(epochs)
    recipe = (f"{config['image_size']}px bs{config['batch_size']} lr{config['lr']:g} "
              f"{_count(config['trainable_params'])}/{_count(config['total_params'])}")
    updated = config.get("updated_params")
    if isinstance(updated, int) and updated != config["trainable_params"]:
        # parameters that require grad yet are never stepped: the silent bug itself
        recipe += f" ({_count(updated)} in optimizer)"
    if run["status"] == "finished" and done >= config["epochs"]:
        progress = f"{done}/{config['epochs']}"
    else:  # a killed process leaves "running" behind
        label = {"running": "running/crashed", "finished": "stopped early"}.get(run["status"],
                                                                                run["status"])
        progress = f"{done}/{config['epochs']} ({label})"
    memories = [e["peak_gpu_memory_gib"] for e in epochs if e["peak_gpu_memory_gib"] is not None]
    return {
        "name": run["run_name"] + ("*" if config.get("dummy") else ""),
        "dummy": bool(config.get("dummy")),
        "device": str(config.get("device", "?")),
        "recipe": recipe, "progress": progress,
        "final_acc": final.get("test_acc"),
        "best_acc": max((e["test_acc"] for e in epochs), default=None),
        "final_test_loss": final.get("test_loss"), "final_train_loss": final.get("train_loss"),
        # medians: epoch 1 carries cudnn autotuning / compile warm-up and would skew a mean
        "seconds_per_epoch": _median([e["epoch_seconds"] for e in epochs]),
        "images_per_second": _median([e["train_images_per_second"] for e in epochs]),
        "peak_memory_gib": max(memories) if memories else None,
        # --fast where it compiled (its epochs have a warm-up): reserved memory
        "memory_reserved": bool(memories) and any(e["warmup_seconds"] is not None
                                                  for e in epochs),
        "history": {e["epoch"]: (e["test_acc"], e["train_loss"], e["test_loss"]) for e in epochs},
    }


def _median(values):
    return statistics.median(values) if values else None


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def _ratio(value):
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1f}x" if value >= 1 else f"{value:.2g}x"  # .2g: 0.0033x stays non-zero


def ratios(baseline, other) -> dict:
    """Symptom ratios, always other / baseline, so every column reads the same way."""
    def divide(a, b):
        return a / b if a is not None and b else None
    return {"img/s": _ratio(divide(other["images_per_second"], baseline["images_per_second"])),
            "s/epoch": _ratio(divide(other["seconds_per_epoch"], baseline["seconds_per_epoch"])),
            "peak GiB": _ratio(divide(other["peak_memory_gib"], baseline["peak_memory_gib"])),
            "final acc": "-" if None in (other["final_acc"], baseline["final_acc"])
            else f"{other['final_acc'] - baseline['final_acc']:+.1f} pts"}


def _render(headers, rows, left=1):
    """Columns separated by at least two spaces; the first `left` columns are text."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _ratio_table(summaries) -> str:
    baseline, others = summaries[0], summaries[1:]
    compared = [ratios(baseline, s) for s in others]
    return (f"ratios vs {baseline['name']} (each run / {baseline['name']}; "
            "final acc: difference in points)\n"
            + _render(["run", *compared[0]], [[s["name"], *r.values()]
                                              for s, r in zip(others, compared)]))


def _epoch_table(summaries) -> str:
    epochs = sorted(set().union(*(s["history"] for s in summaries)))
    cells = [[e] + ["{:.2f} / {:.3f} / {:.3f}".format(*s["history"][e]) if e in s["history"]
                    else "-" for s in summaries] for e in epochs]  # "-": a partial run
    return ("per epoch: test acc % / train loss / test loss\n"
            + _render(["epoch"] + [s["name"] for s in summaries], cells, left=0))


def format_table(summaries, per_epoch=False) -> str:
    """The run table, the ratios against the first run, optionally the epochs, the notes."""
    headers = ["run", "recipe (trainable/total params)", "epochs", "final acc %",
               "best acc %", "test loss", "train loss", "s/epoch", "img/s", "peak GiB"]
    rows = [[s["name"], s["recipe"], s["progress"], _cell(s["final_acc"], ".2f"),
             _cell(s["best_acc"], ".2f"), _cell(s["final_test_loss"], ".3f"),
             _cell(s["final_train_loss"], ".3f"), _cell(s["seconds_per_epoch"], ".1f"),
             _cell(s["images_per_second"], ".1f"), _cell(s["peak_memory_gib"], ".2f")]
            for s in summaries]
    parts = [_render(headers, rows, left=3)]
    if len(summaries) > 1:
        parts.append(_ratio_table(summaries))
    if per_epoch:
        parts.append(_epoch_table(summaries))
    if any(s["dummy"] for s in summaries):
        parts.append(DUMMY_NOTE)
    reserved = [s["name"] for s in summaries if s["memory_reserved"]]
    if reserved:
        parts.append(f"note: peak GiB of {', '.join(reserved)} is reserved memory (--fast's "
                     "CUDA graphs keep their tensors in a pool not counted as allocated); "
                     "the other runs' is allocated")
    devices = sorted({s["device"] for s in summaries})
    if len(devices) > 1:
        parts.append(f"note: runs used different devices ({', '.join(devices)}); "
                     "speed and memory ratios compare the hardware too")
    return "\n\n".join(parts)


def plot(summaries, path):
    """One figure: losses, test accuracy, median s/epoch, peak GPU memory."""
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure, ((losses, accuracy), (speed, memory)) = plt.subplots(2, 2, figsize=(12, 7), dpi=100)
    colours = [f"C{i % 10}" for i in range(len(summaries))]
    labels = [s["name"] + (" (dummy data)" if s["dummy"] else "") for s in summaries]
    for summary, colour, label in zip(summaries, colours, labels):
        epochs = sorted(summary["history"])
        if not epochs:  # no finished epoch yet: a bar labelled so, no line
            continue
        acc, train_loss, test_loss = zip(*(summary["history"][e] for e in epochs))
        losses.plot(epochs, train_loss, "-o", color=colour, markersize=3)
        losses.plot(epochs, test_loss, "--s", color=colour, markersize=3)
        accuracy.plot(epochs, acc, "-o", color=colour, markersize=3, label=label)
    losses.set(title="loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    losses.legend(handles=[Line2D([], [], color="k", ls="-", label="train"),
                           Line2D([], [], color="k", ls="--", label="test")], fontsize=8)
    accuracy.set(title="test accuracy per epoch", xlabel="epoch", ylabel="%")
    if accuracy.get_lines():
        accuracy.legend(fontsize=8)
    for axes in (losses, accuracy):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)

    names = [s["name"] for s in summaries]
    slots = range(len(names))  # positions, not names: two files may share a run_name
    bars = speed.bar(slots, [s["seconds_per_epoch"] or 0 for s in summaries], color=colours)
    speed.bar_label(bars, labels=[NO_EPOCH if s["seconds_per_epoch"] is None
                                  else f"{s['seconds_per_epoch']:.1f}" for s in summaries],
                    fontsize=8)
    speed.set(title="median seconds per epoch", ylabel="s")
    gib = [s["peak_memory_gib"] for s in summaries]
    bars = memory.bar(slots, [0 if g is None else g for g in gib], color=colours)
    memory.bar_label(bars, labels=[NO_EPOCH if not s["history"] else "n/a (CPU)" if g is None
                                   else f"{g:.2f}" for s, g in zip(summaries, gib)], fontsize=8)
    memory.set(title="peak GPU memory", ylabel="GiB")
    if all(g is None for g in gib):
        memory.set_ylim(0, 1)  # no GPU run: an axis around zero would suggest numbers
        memory.set_yticks([])
    for axes in (speed, memory):
        axes.set_xticks(slots, names, fontsize=8, rotation=15 if len(names) > 3 else 0)
        axes.margins(y=0.15)  # room for the value labels above the tallest bar
    title = "Training runs: " + " vs ".join(names)
    if any(s["dummy"] for s in summaries):
        title += "\n" + DUMMY_NOTE
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN.json",
                        help="results files; the first is the baseline for the ratios")
    parser.add_argument("--epochs", action="store_true",
                        help="also print the per-epoch history side by side")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="write a figure of the runs to this file (.png, .pdf or .svg)")
    args = parser.parse_args(argv)
    try:
        summaries = [summarize(load_run(path)) for path in args.runs]
    except RunFileError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(format_table(summaries, per_epoch=args.epochs))
    if args.plot:
        if Path(args.plot).suffix.lower() not in PLOT_FORMATS or Path(args.plot).is_dir():
            print(f"{parser.prog}: error: --plot {args.plot}: name a file ending in "
                  f"{', '.join(PLOT_FORMATS)}", file=sys.stderr)
            return 2
        try:
            plot(summaries, args.plot)
        except (OSError, ValueError) as error:  # missing folder, unknown image format
            print(f"{parser.prog}: error: {args.plot}: cannot write the plot: {error}",
                  file=sys.stderr)
            return 2
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
