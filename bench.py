"""Training speed and memory of bug.py and fixed.py, default and --fast: one Markdown table.

A row is the script's own build() with `--dummy --no-pretrained [--fast]` (speed and memory
do not depend on the weights), prepared as training.run prepares it and stepped by the
script's own train() and validate(). model img/s: one batch already on the device, over and
over (the ceiling); e2e and eval: the real batches, at the rate an epoch line shows; peak
GiB: after warm-up (reserved with --fast); warm-up s: the first steps (--fast: both
compiles); est. s/epoch: 50,000 + 10,000 images.

  python bench.py                     bug and fixed, and fixed with --fast
  python bench.py --only all          and bug with --fast: one more compile
  python bench.py --only fixed:fast   RECIPE:MODE, a recipe, a mode, or all; comma-separated
  python bench.py --device cpu --tiny --only all    CPU smoke: 32 px, batch 4, 3 steps
"""
import argparse
import contextlib
import gc
import sys
import tempfile
import time
import traceback

import torch

import bug
import fixed
import training
from training.data import CPUS, DEFAULT_WORKERS, TEST_IMAGES, TRAIN_IMAGES
from training.loop import Progress, describe, peak_memory_gib, prepare, rate

RECIPES = {"bug": bug, "fixed": fixed}
ROWS = [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
DEFAULT_ROWS = "bug:default,fixed:default,fixed:fast"
# Steps: warm-up (--fast: compile, then CUDA-graph capture), model, e2e, eval: ~10 s a row.
STEPS, TINY_STEPS = (3, 50, 150, 50), (1, 2, 2, 2)
COLUMNS = ["recipe", "mode", "px", "batch", "model img/s", "e2e img/s", "e2e/model",
           "eval img/s", "peak GiB", "warm-up s", "est. s/epoch"]


class Repeat(list):
    """One batch, n times: what the model-only ceiling iterates."""
    def set_epoch(self, epoch):
        pass


def measure(recipe, args, warmup, model_steps):
    """One row's cells after recipe and mode: its build(), then its loops, timed."""
    script = RECIPES[recipe]
    model, criterion, optimizer, train_data, test_data = script.build(args)
    network, train_batches, test_batches = prepare(model, train_data, test_data, args)
    train_batches.set_epoch(1)
    first = [next(iter(train_batches))]
    device = args.device

    def loop(batches, train=True):  # the script's own loop (a Progress syncs at its end)
        progress = Progress("bench", batches, 1, args)
        if train:
            script.train(network, progress, criterion, optimizer)
        else:
            script.validate(network, progress, criterion)
        return progress

    warmup_seconds = (loop(Repeat(first * warmup)).seconds  # --fast compiles both here
                      + loop(Repeat(first * warmup), train=False).seconds)
    if device.type == "cuda":  # the peak from here on, as one_epoch measures it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model_rate = loop(Repeat(first * model_steps)).rate()
    first.clear()  # not resident while the real batches run
    # End to end: --limit-*-batches = warm-up + timed steps, read as the epoch line reads it.
    e2e, e2e_eval = loop(train_batches).rate(), loop(test_batches, train=False).rate()
    gib = peak_memory_gib(args)
    peak = "-" if gib is None else f"{gib:.2f}" + " reserved" * args.fast
    return [str(args.image_size), str(args.batch_size), rate(model_rate), rate(e2e),
            f"{e2e / model_rate:.0%}", rate(e2e_eval), peak, f"{warmup_seconds:.1f}",
            f"{TRAIN_IMAGES / e2e + TEST_IMAGES / e2e_eval:,.0f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="DataLoader processes (default: the scripts' own; 0 with --tiny)")
    parser.add_argument("--only", default=DEFAULT_ROWS, help=f"default: {DEFAULT_ROWS}")
    parser.add_argument("--tiny", action="store_true", help="32 px, batch 4, 3 steps, workers 0")
    opts = parser.parse_args(argv)
    picks = [[row for row in ROWS if item.strip() in ("all", *row, ":".join(row))]
             for item in opts.only.split(",")]
    if not all(picks):
        parser.error(f"--only {opts.only}: rows are all, bug, fixed, default, fast, or "
                     + ", ".join(":".join(row) for row in ROWS))
    rows = [row for row in ROWS if any(row in pick for pick in picks)]
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: --device cpu --tiny is the CPU smoke")
    workers = (0 if opts.tiny else DEFAULT_WORKERS) if opts.workers is None else opts.workers
    warmup, model_steps, train_steps, eval_steps = TINY_STEPS if opts.tiny else STEPS
    table = [COLUMNS]
    # Nothing is written to scratch; progress and the scripts' own prints go to stderr.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        argv = ["--dummy", "--no-pretrained", "--device", opts.device, "--workers",
                str(workers), "--output-dir", scratch, "--limit-train-batches",
                str(warmup + train_steps), "--limit-eval-batches", str(warmup + eval_steps)]
        argv += ["--image-size", "32", "--batch-size", "4"] * opts.tiny
        args = {}  # every row's command line checked, by its script, before any is measured
        for recipe, mode in rows:
            module = RECIPES[recipe]
            args[recipe, mode] = training.parse_args(
                module.__file__, module.__doc__, epochs=module.EPOCHS, lr=module.LR,
                batch_size=module.BATCH_SIZE, image_size=module.IMAGE_SIZE,
                argv=argv + ["--fast"] * (mode == "fast"))
        for recipe, mode in rows:
            print(f"{recipe}:{mode}: measuring ...", flush=True)
            try:
                cells = measure(recipe, args[recipe, mode], warmup, model_steps)
            except Exception:  # one failed row (a compile, out of memory) of several
                traceback.print_exc()
                cells = ["failed"] + ["-"] * 8
            finally:
                torch._dynamo.reset()  # the row's compiled graphs and CUDA-graph pools
                gc.collect()  # its model, optimizer, data, batches and their workers
                torch.cuda.empty_cache()  # a no-op unless CUDA was used
            table.append([recipe, mode, *cells])
    widths = [max(map(len, column)) for column in zip(*table)]
    table.insert(1, ["-" * width for width in widths])
    print(f"bench.py on {describe(torch.device(opts.device))}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {CPUS} CPUs, --workers {workers}, --dummy data, "
          "random weights\n")
    print(*("| " + " | ".join(map(str.ljust, line, widths)) + " |" for line in table), sep="\n")
    return 1 if any(line[2] == "failed" for line in table) else 0


if __name__ == "__main__":
    sys.exit(main())
