"""Training speed and memory of bug.py and fixed.py, default and --fast: a Markdown table.

A row is the script's build() with `--dummy --no-pretrained [--fast]`, prepared as a run
is and stepped by the script's own train() and validate(). model img/s: one batch on the
device, over and over (the ceiling); e2e and eval: the real batches, at an epoch line's
rate; peak GiB: after warm-up (reserved with --fast); warm-up s: the first steps (--fast:
both compiles); est. s/epoch: 50,000 + 10,000 images.

  python bench.py --only fixed:fast   rows as RECIPE:MODE, comma-separated, or all
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
from training.loop import Progress, peak_memory_gib, prepare, rate

RECIPES = {"bug": bug, "fixed": fixed}
ROWS = [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
DEFAULT_ROWS = "bug:default,fixed:default,fixed:fast"
# Steps: warm-up (--fast: compile, CUDA-graph capture), model, e2e, eval: ~10 s a row.
STEPS, TINY_STEPS = (3, 50, 150, 50), (1, 2, 2, 2)
COLUMNS = ["recipe", "mode", "px", "batch", "model img/s", "e2e img/s", "e2e/model",
           "eval img/s", "peak GiB", "warm-up s", "est. s/epoch"]


def measure(script, args, warmup, model_steps):
    """One row's cells after recipe and mode: the script's build(), its loops, timed."""
    model, criterion, optimizer, train_data, test_data = script.build(args)
    network, train_batches, test_batches = prepare(model, train_data, test_data, args)
    train_batches.set_epoch(1)
    first = [next(iter(train_batches))]
    device = args.device

    def loop(batches, train=True):  # the script's own loop (a Progress syncs at its end)
        progress = Progress("bench", batches, args)
        if train:
            script.train(network, progress, criterion, optimizer)
        else:
            script.validate(network, progress, criterion)
        return progress

    warmup_seconds = (loop(first * warmup).seconds  # --fast compiles both here
                      + loop(first * warmup, train=False).seconds)
    if device.type == "cuda":  # the peak from here on, as one_epoch measures it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model_rate = loop(first * model_steps).images_per_second
    first.clear()  # not resident while the real batches run
    # End to end: --limit-*-batches = warm-up + timed steps, read as an epoch line is.
    e2e = loop(train_batches).images_per_second
    e2e_eval = loop(test_batches, train=False).images_per_second
    gib = peak_memory_gib(args)
    peak = "-" if gib is None else f"{gib:.2f}" + " reserved" * args.fast
    return [str(args.image_size), str(args.batch_size), rate(model_rate), rate(e2e),
            f"{e2e / model_rate:.0%}", rate(e2e_eval), peak, f"{warmup_seconds:.1f}",
            f"{TRAIN_IMAGES / e2e + TEST_IMAGES / e2e_eval:,.0f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda",
                        help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--only", default=DEFAULT_ROWS, help=f"default: {DEFAULT_ROWS}")
    parser.add_argument("--tiny", action="store_true",
                        help="32 px, batch 4, 3 steps, workers 0")
    opts = parser.parse_args(argv)
    rows = ROWS
    if opts.only != "all":
        rows = [tuple(row.split(":")) for row in opts.only.split(",")]
    if not set(rows) <= set(ROWS):
        parser.error(f"--only {opts.only}: all, or rows among "
                     + ", ".join(":".join(row) for row in ROWS))
    workers = 0 if opts.tiny else DEFAULT_WORKERS  # the scripts' own default
    warmup, model_steps, train_steps, eval_steps = TINY_STEPS if opts.tiny else STEPS
    table = [COLUMNS]
    # Nothing is written to scratch; progress and the scripts' own prints go to stderr.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        argv = ["--dummy", "--no-pretrained", "--device", opts.device,
                "--workers", str(workers), "--output-dir", scratch,
                "--limit-train-batches", str(warmup + train_steps),
                "--limit-eval-batches", str(warmup + eval_steps)]
        argv += ["--image-size", "32", "--batch-size", "4"] * opts.tiny
        for recipe, mode in rows:
            print(f"{recipe}:{mode}: measuring ...", flush=True)
            script = RECIPES[recipe]
            args = training.parse_args(  # a bad --device: refused in one line, here
                script.__file__, script.__doc__, epochs=script.EPOCHS, lr=script.LR,
                batch_size=script.BATCH_SIZE, image_size=script.IMAGE_SIZE,
                argv=argv + ["--fast"] * (mode == "fast"))
            try:
                cells = measure(script, args, warmup, model_steps)
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
    device = torch.cuda.get_device_name(opts.device) if opts.device != "cpu" else "cpu"
    print(f"bench.py on {device}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {CPUS} CPUs, --workers {workers}, --dummy "
          "data, random weights\n")
    for line in table:
        print("| " + " | ".join(map(str.ljust, line, widths)) + " |")
    return 1 if any(line[2] == "failed" for line in table) else 0


if __name__ == "__main__":
    sys.exit(main())
