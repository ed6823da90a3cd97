"""Training speed and memory of bug.py and fixed.py, default and --fast: one Markdown table.

Each row (recipe x mode) is the script's own build() under `--dummy --no-pretrained --device
DEV --workers W [--fast]` (random weights: speed and memory do not depend on them), compiled
as training.run compiles it and stepped by the run's own training.train and validate. model:
one batch already on the device, stepped over and over (the ceiling). e2e, eval: the real
batches at the steady rate a run's epoch line shows (Meter.rate(), after --fast's compile and
CUDA-graph steps). peak GiB: once warmed up (with CUDA graphs reserved, else allocated).
warm-up s: the untimed first steps (--fast: both compiles). est. s/epoch: 50,000 train +
10,000 test images at the e2e rates. The JSON (--json) is rewritten after every row.

  python bench.py                     bug and fixed, and fixed with --fast
  python bench.py --only all          and bug with --fast: one more compile
  python bench.py --only fixed:fast   RECIPE:MODE, a recipe, a mode, or all; comma-separated
  python bench.py --device cpu --tiny --only all    CPU smoke: 32 px, batch 4, 3 steps

Estimated from the README's H200 step rates, not measured with this file: the three default
rows take 3 to 4 minutes on an H100 or H200, ~20-30 s each default row, ~2-2.5 min the --fast
row, compiling a training and a test graph (less with inductor's on-disk cache warm).
"""
import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

import bug, fixed
import training
from training.cli import TEST_IMAGES, TRAIN_IMAGES, RunError, default_workers
from training.data import batches
from training.loop import describe, rate, speed_up
from training.rundir import atomic_write

RECIPES = {"bug": bug, "fixed": fixed}
ROWS = [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
DEFAULT_ROWS = "bug:default,fixed:default,fixed:fast"
# Steps of each loop, warm-up (--fast: compile, CUDA-graph capture at the 2nd call) then timed:
# at the README's H200 rates (~42 ms a default step, ~12 ms --fast), ~10 s of steps a row.
WARMUP, STEPS = 3, dict(model=50, train=150, eval=50)
TINY_WARMUP, TINY_STEPS = 1, dict(model=2, train=2, eval=2)
TINY_FLAGS = ["--image-size", "32", "--batch-size", "4"]
COLUMNS = ["recipe", "mode", "px", "batch", "model img/s", "e2e img/s", "e2e/model",
           "eval img/s", "peak GiB", "warm-up s", "est. s/epoch"]


class Repeat(list):
    """One batch, n times: what train() and validate() iterate for the model-only ceiling."""
    def set_epoch(self, epoch):
        pass


def script_args(recipe, argv):
    """The script's own args, or ValueError holding its parser's one-line refusal."""
    module = RECIPES[recipe]
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            return training.parse_args(module.__file__, module.__doc__, epochs=module.EPOCHS,
                                       batch_size=module.BATCH_SIZE, lr=module.LR,
                                       image_size=module.IMAGE_SIZE, argv=argv)
        except SystemExit:
            raise ValueError(stderr.getvalue().strip().splitlines()[-1].split("error: ")[-1])


def measure(recipe, args, warmup, steps):
    """One row: the recipe's build(), then its training and test loops, timed."""
    started, device, batch, quiet = time.perf_counter(), args.device, args.batch_size, io.StringIO()
    with contextlib.redirect_stdout(quiet):  # build prints in_features
        model, criterion, optimizer, train_data, test_data = RECIPES[recipe].build(args)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    compiled = speed_up(model, args)  # exactly as run() does, before its batches
    one = argparse.Namespace(**{**vars(args), "limit_train_batches": 1, "workers": 0})
    with contextlib.redirect_stdout(quiet):  # --fast's batches say where the data set went
        first = [next(iter(batches(train_data, one, train=True)))]  # whatever --workers

    def loop(n, train):  # the run's own loop over the one batch, n times: synced seconds
        sync()
        start = time.perf_counter()
        if train:
            training.train(model, Repeat(first * n), criterion, optimizer, 1, args, compiled)
        else:
            training.validate(model, Repeat(first * n), criterion, 1, args, compiled)
        sync()
        return time.perf_counter() - start

    warmup_seconds = loop(warmup, True) + loop(warmup, False)  # both graphs compiled here
    if device.type == "cuda":  # the peak from here on, less what the warm-up left cached
        if compiled:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model_train = batch * steps["model"] / loop(steps["model"], True)
    model_eval = batch * steps["model"] / loop(steps["model"], False)
    first.clear()
    # End to end: --limit-*-batches = warm-up + timed steps, read as the epoch line reads it.
    with contextlib.redirect_stdout(quiet):
        trains, tests = batches(train_data, args, train=True), batches(test_data, args, train=False)
    e2e = training.train(model, trains, criterion, optimizer, 1, args, compiled).rate()
    e2e_eval = training.validate(model, tests, criterion, 1, args, compiled).rate()
    # CUDA graphs' tensors live in a pool that is reserved, not allocated: one_epoch's rule.
    peak = torch.cuda.max_memory_reserved if compiled else torch.cuda.max_memory_allocated
    return dict(image_size=args.image_size, batch_size=batch, workers=args.workers,
                compiled=compiled, model_train_images_per_second=model_train,
                model_eval_images_per_second=model_eval, end_to_end_train_images_per_second=e2e,
                end_to_end_eval_images_per_second=e2e_eval, end_to_end_over_model=e2e / model_train,
                peak_gpu_memory_gib=peak(device) / 2**30 if device.type == "cuda" else None,
                warmup_seconds=warmup_seconds,
                epoch_seconds_estimate=TRAIN_IMAGES / e2e + TEST_IMAGES / e2e_eval,
                warmup_steps=warmup, timed_steps=steps, row_seconds=time.perf_counter() - started)


def table(doc):
    lines = [COLUMNS] + [[r["recipe"], r["mode"]] + (["failed"] + ["-"] * 8 if "error" in r else [
        str(r["image_size"]), str(r["batch_size"]), rate(r["model_train_images_per_second"]),
        rate(r["end_to_end_train_images_per_second"]), f"{r['end_to_end_over_model']:.0%}",
        rate(r["end_to_end_eval_images_per_second"]), "-" if r["peak_gpu_memory_gib"] is None
        else f"{r['peak_gpu_memory_gib']:.2f}" + " reserved" * r["compiled"],
        f"{r['warmup_seconds']:.1f}", f"{r['epoch_seconds_estimate']:,.0f}"]) for r in doc["rows"]]
    widths = [max(map(len, column)) for column in zip(*lines)]
    lines.insert(1, ["-" * width for width in widths])
    return "\n".join([f"bench.py on {doc['device']}, torch {doc['torch']}, {doc['date']}, "
                      f"{doc['cpus']} CPUs, --workers {doc['workers']}, --dummy data, "
                      "random weights",
                      *(f"{r['recipe']}:{r['mode']} failed: {r['error']}" for r in doc["rows"]
                        if "error" in r), ""]
                     + ["| " + " | ".join(map(str.ljust, line, widths)) + " |" for line in lines])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="DataLoader processes (default: the scripts' own; 0 with --tiny)")
    parser.add_argument("--only", default=DEFAULT_ROWS, help=f"default: {DEFAULT_ROWS}")
    parser.add_argument("--tiny", action="store_true", help=f"smoke: {' '.join(TINY_FLAGS)}, "
                        f"{TINY_WARMUP} warm-up and {TINY_STEPS['train']} timed steps, workers 0")
    parser.add_argument("--json", type=Path, help="default: results/bench-DATE-TIME.json",
                        default=Path("results") / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    options = parser.parse_args(argv)
    picks = [[row for row in ROWS if item.strip() in ("all", *row, ":".join(row))]
             for item in options.only.split(",")]
    if not all(picks):
        parser.error(f"--only {options.only}: rows are all, bug, fixed, default, fast, or "
                     + ", ".join(":".join(row) for row in ROWS))
    rows = [row for row in ROWS if any(row in pick for pick in picks)]
    if options.json.exists() and not options.overwrite:
        parser.error(f"--json {options.json} exists: pass --overwrite to replace it")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: --device cpu --tiny is the CPU smoke")
    workers = options.workers
    workers = (0 if options.tiny else default_workers()) if workers is None else workers
    warmup, steps = (TINY_WARMUP, TINY_STEPS) if options.tiny else (WARMUP, STEPS)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:  # nothing is written there
        argv = ["--dummy", "--no-pretrained", "--device", options.device, "--workers",
                str(workers), "--output-dir", scratch, "--limit-train-batches",
                str(warmup + steps["train"]), "--limit-eval-batches", str(warmup + steps["eval"])]
        try:  # every row's command line checked, by its script, before any is measured
            args = {row: script_args(row[0], argv + TINY_FLAGS * options.tiny
                                     + ["--fast"] * (row[1] == "fast")) for row in rows}
        except ValueError as error:
            parser.error(str(error))
        device = args[rows[0]].device
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        doc = dict(device=describe(device), torch=str(torch.__version__), cpus=cpus,
                   date=f"{datetime.now():%Y-%m-%d %H:%M}", workers=workers, tiny=options.tiny,
                   command=" ".join(["python", *sys.argv]), status="running", rows=[])

        def save(status):
            doc["status"] = status
            options.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(options.json, json.dumps(doc, indent=2).encode())
        try:  # a path that cannot be written fails now, not after the first row
            save("running")
        except (OSError, RunError) as error:
            parser.error(f"--json {options.json}: {error}")
        for recipe, mode in rows:
            print(f"{recipe}:{mode}: measuring ...", flush=True)
            row = dict(recipe=recipe, mode=mode)
            try:
                row.update(measure(recipe, args[recipe, mode], warmup, steps))
            except Exception as error:  # one failed row (a compile, out of memory) of several
                traceback.print_exc()
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            finally:
                torch._dynamo.reset()  # the row's compiled graphs and CUDA-graph pools
                gc.collect()  # its model, optimizer, data, batches and their workers
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            doc["rows"].append(row)
            save("running")  # a run cut short keeps the rows it finished
    save("failed" if any("error" in row for row in doc["rows"]) else "finished")
    print(f"\nwritten: {options.json}\n\n{table(doc)}", flush=True)
    return 1 if doc["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
