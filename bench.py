"""Training speed and memory of bug.py and fixed.py, default and --fast, on --dummy data.

For each row (recipe x mode) bench.py runs the script itself up to training.run, with
`--dummy --no-pretrained --device DEV --workers W [--fast]`, so that it measures the
script's own model, freezing, optimizer and transforms, then times:

  model only   one real batch already on the device, stepped with training.train_step
               and training.eval_step through training.Engine: the ceiling;
  end to end   training.train and training.validate on the real loaders (workers, pinned
               memory, the script's transforms), timed from a batch after the warm-up to
               a later one, with the workers busy at both ends.

and prints one table last (also written as JSON, atomically, after every row, so that a
run cut short keeps its finished rows): images/s and ms/step of both, end-to-end over
model-only (the goal: 90 % or more), eval images/s, peak GPU memory over the row once
cuDNN has picked its algorithms (torch.cuda.max_memory_allocated; with --fast's CUDA
graphs, max_memory_reserved, which alone counts the graphs' memory pool), warm-up (the
untimed steps: for --fast, torch.compile and CUDA-graph capture, reported apart) and an
estimated epoch: 50,000 train + 10,000 test images at the end-to-end rates, warm-up left
out. The JSON also counts the graphs compiled and any run without CUDA graphs.
Weights are random: speed and memory do not depend on their values.

  python bench.py                  three rows: bug and fixed by default, fixed with --fast
  python bench.py --only all       the fourth too, bug with --fast: one more compile
  python bench.py --only bug:fast  that one alone
  python bench.py --device cpu --tiny --only all   CPU smoke: 32 px, batch 4, 2 steps

Times estimated, not measured with this file: from a reference benchmark on one H100 (step
times below; 89 s to compile one --fast training graph), a default row takes ~15 s and a
--fast row, which compiles a training and a test graph, ~1.5-2 min: about 3 min for the
three default rows.
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
from torch.utils.data import default_collate

import training

REPO = Path(__file__).resolve().parent
RECIPES = {"bug": "bug.py", "fixed": "fixed.py"}
MODES = {"default": [], "fast": ["--fast"]}
# Measured (and shown) in this order: the rows without a compile first, then the fix's --fast
# row, the one the README needs most; the bug's 1024 px graphs compile last.
ROWS = [("bug", "default"), ("fixed", "default"), ("fixed", "fast"), ("bug", "fast")]
# By default all but the last: bug.py's --fast compiles its 1024 px graphs for a mode whose
# memory is not the bug's, and would take the run past ~3 minutes.
DEFAULT_ROWS = "bug:default,fixed:default,fixed:fast"
DEFAULT_JSON = Path("results") / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"  # never an old one
GOAL = 0.90  # end-to-end images/s over model-only images/s

WARMUP_STEPS = 10  # untimed steps before each timed loop: compile, cuDNN autotuning, workers
# Timed steps per loop. On the reference H100 (not this file) a bug step took ~50 ms (1024 px,
# batch 4), a fixed one ~55 ms eager and ~14 ms with --fast (224 px, batch 64): so each default
# row should take ~15 s, each --fast row ~1.5-2 min, nearly all of it compiling.
TIMED_STEPS = {
    "bug": dict(model_train=30, model_eval=30, train=60, eval=30),
    "fixed": dict(model_train=30, model_eval=30, train=120, eval=30),
}
TINY_FLAGS = ["--image-size", "32", "--batch-size", "4"]
TINY_WARMUP, TINY_STEPS = 1, 2


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--workers", type=int,
                        help="data loading processes (default: the scripts' default, one less "
                             "than the CPUs available, at most 16; 0 with --tiny)")
    parser.add_argument("--only", metavar="ROWS", default=DEFAULT_ROWS,
                        help="comma-separated rows to measure: RECIPE:MODE, a bare recipe (bug, "
                             "fixed) or mode (default, fast) for all its rows, or all "
                             f"(default: {DEFAULT_ROWS})")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="timed steps of every loop (default: model-only 30, eval 30, "
                             "end-to-end training 60 for bug and 120 for fixed). A row fails "
                             "if an end-to-end loop would reach its data's last, partial "
                             "batch: for fixed with 15 workers, past 95")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke sizes: {' '.join(TINY_FLAGS)}, {TINY_WARMUP} warm-up and "
                             f"{TINY_STEPS} timed steps, workers 0")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help="where the results go (default: results/bench-DATE-TIME.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the --json file of an earlier benchmark")
    options = parser.parse_args(argv)
    try:
        options.device = resolve_device(options.device)
    except ValueError as error:
        parser.error(f"--device {options.device}: {error}")
    if options.json.exists() and not options.overwrite:
        parser.error(f"--json {options.json}: holds an earlier benchmark: pass --overwrite to "
                     "replace it, or another --json")
    try:
        options.rows = select_rows(options.only)
    except ValueError as error:
        parser.error(f"--only {options.only}: {error}")
    if options.steps is not None and options.steps < 1:
        parser.error("--steps must be 1 or more")
    if options.workers is not None and options.workers < 0:
        parser.error("--workers must be 0 or more")
    if options.workers is None:
        options.workers = 0 if options.tiny else training.default_workers()
    return options


def select_rows(only):
    """The rows of ROWS that `only` names, in ROWS' order."""
    wanted = set()
    for item in filter(None, (part.strip() for part in only.split(","))):
        matches = [(r, m) for r, m in ROWS if item in ("all", r, m, f"{r}:{m}")]
        if not matches:
            raise ValueError(f"unknown row {item!r}; rows are "
                             + ", ".join(f"{r}:{m}" for r, m in ROWS))
        wanted.update(matches)
    if not wanted:
        raise ValueError("no rows selected")
    return [row for row in ROWS if row in wanted]


# --------------------------------------------------------------------------- building a recipe

def build(script, flags):
    with contextlib.redirect_stdout(io.StringIO()):  # the scripts print in_features
        return training.build(REPO / script, flags)


def script_flags(mode, options):
    # An empty folder of bench's own: nothing is written (training.run is never called),
    # and an earlier run in results/, or one still going there, must not stop the build.
    flags = ["--dummy", "--no-pretrained", "--device", str(options.device),
             "--workers", str(options.workers), "--output-dir", str(options.empty_dir),
             *MODES[mode]]
    return flags + (TINY_FLAGS if options.tiny else [])


def loop_steps(recipe, options):
    """(warm-up steps, {loop: timed steps}) for this recipe."""
    if options.tiny:
        return TINY_WARMUP, {loop: options.steps or TINY_STEPS for loop in TIMED_STEPS[recipe]}
    return WARMUP_STEPS, {loop: options.steps or n for loop, n in TIMED_STEPS[recipe].items()}


# --------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, repeats):
    """Seconds per call of function(), over `repeats` calls, synced before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    sync(device)
    return (time.perf_counter() - start) / repeats


def first_batch(view, engine, batch_size):
    """The view's first `batch_size` images (epoch 1, the script's transforms), collated
    and put on the device by the engine, as the training loop does."""
    images, labels = default_collate([view[(1, index)] for index in range(batch_size)])
    return engine.to_device(view, images, labels)


def model_only(r, engine, warmup, steps):
    """Seconds per train step and per eval step on one batch resident on the device, the
    seconds spent warming up (compile and CUDA-graph capture with --fast), and the peak GPU
    bytes of the training warm-up (cuDNN's autotuning included; Engine.peak_memory)."""
    device = r.args.device
    images, labels = first_batch(r.train_set, engine, r.args.batch_size)

    def train():
        training.train_step(r.model, r.criterion, r.optimizer, engine, images, labels)

    def evaluate():
        with torch.no_grad():
            training.eval_step(r.model, r.criterion, engine, images, labels)

    r.model.train()
    warmup_seconds = timed(device, train, warmup) * warmup
    warmup_peak = engine.peak_memory() if engine.cuda else 0
    if engine.cuda:  # from here on, the steady state's peak
        engine.reset_peak_memory()
    train_seconds = timed(device, train, steps["model_train"])
    r.model.eval()
    warmup_seconds += timed(device, evaluate, warmup) * warmup
    eval_seconds = timed(device, evaluate, steps["model_eval"])
    r.model.train()
    return train_seconds, eval_seconds, warmup_seconds, warmup_peak


class Enough(Exception):
    pass


class BatchClock:
    """The `stop` object of training.train / validate. It starts the clock (after a sync)
    when batch `warmup + 1` arrives, so that worker start-up, the batches they prefetched
    meanwhile and any compile stay out of the timed part, and stops it (raising Enough) when
    batch `warmup + steps + 1` arrives, while the workers are still busy: both ends in the
    steady state, so the work the workers have in hand at the start, which the timed
    batches did not wait for, is matched by the work in hand at the end."""

    def __init__(self, device, warmup, steps):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.batches, self.start, self.seconds = 0, None, None

    def check(self):
        self.batches += 1
        if self.batches == self.warmup + 1:
            sync(self.device)
            self.start = time.perf_counter()
        elif self.batches == self.warmup + self.steps + 1:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
            raise Enough()

    def seconds_per_batch(self):
        if self.seconds is None:  # the loader ran out first (a small data set)
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
            return self.seconds / (self.batches - self.warmup)
        return self.seconds / self.steps


def loader_batches(args, warmup, steps):
    """The batches an end-to-end loop draws: the warm-up, the timed steps, the one that
    stops the clock, and those the workers then have in hand (prefetch_factor 2 each)."""
    return warmup + steps + 1 + 2 * args.workers


class TooManySteps(Exception):
    pass


def check_full_batches(r, warmup, steps):
    """Refuse, before anything is compiled, an end-to-end loop that would reach its data
    set's last, partial batch: another shape, so a compile (--fast) or cuDNN autotuning in
    the timed window, and fewer images than the batch size it is counted at."""
    batch = r.args.batch_size
    for loop, view in (("train", r.train_set), ("eval", r.test_set)):
        needed, full = loader_batches(r.args, warmup, steps[loop]), len(view) // batch
        if needed > full:
            raise TooManySteps(f"the end-to-end {loop} loop needs {needed:,} full batches "
                               f"of {batch}, and {len(view):,} images make {full:,}: lower "
                               "--steps or --workers")


def end_to_end(r, engine, train, warmup, steps):
    """Seconds per batch of training.train (train=True) or training.validate on the real
    loader: `steps` batches after `warmup`, with the workers kept busy past the last."""
    args = r.args
    limit = loader_batches(args, warmup, steps)
    if train:
        args.limit_train_batches = limit
    else:
        args.limit_eval_batches = limit
    view = r.train_set if train else r.test_set
    loader = training.make_loader(view, args, train)
    clock = BatchClock(args.device, warmup, steps)
    try:
        if train:
            training.train(r.model, loader, r.criterion, r.optimizer, engine, 1, clock)
        else:
            training.validate(r.model, loader, r.criterion, engine, 1, clock)
    except Enough:
        pass
    seconds = clock.seconds_per_batch()
    del loader  # shuts its persistent workers down
    return seconds


def measure(recipe, mode, options):
    """One row of the table."""
    started = time.perf_counter()
    device = options.device
    # What earlier rows left, in both of training.Engine.peak_memory's measures.
    left_allocated, left_reserved = ((torch.cuda.memory_allocated(device),
                                      torch.cuda.memory_reserved(device))
                                     if device.type == "cuda" else (0, 0))
    r = build(RECIPES[recipe], script_flags(mode, options))
    args = r.args
    warmup, steps = loop_steps(recipe, options)
    # Drain what the workers prefetch at start-up (2 batches each) before the clock starts.
    loader_warmup = max(warmup, 2 * args.workers)
    check_full_batches(r, loader_warmup, steps)
    # What training.run does before its epochs.
    engine = training.Engine(args, r.model)
    if engine.cuda:
        torch.backends.cudnn.benchmark = True
        engine.reset_peak_memory()
    training.seed_epoch(args.seed, 1)
    graphs_before, skips_before = compile_counts()

    train_seconds, eval_seconds, warmup_seconds, warmup_peak = model_only(r, engine, warmup,
                                                                          steps)
    e2e_train_seconds = end_to_end(r, engine, True, loader_warmup, steps["train"])
    e2e_eval_seconds = end_to_end(r, engine, False, loader_warmup, steps["eval"])

    batch = args.batch_size
    e2e_train_rate, e2e_eval_rate = batch / e2e_train_seconds, batch / e2e_eval_seconds
    leftover = left_reserved if engine.compiled else left_allocated
    peak = (engine.peak_memory() - leftover) / 2**30 if engine.cuda else None
    warmup_peak = (warmup_peak - leftover) / 2**30 if engine.cuda else None
    counts = training.count_params(r.model, r.optimizer)
    graphs, skips = compile_counts()
    return dict(
        recipe=recipe, script=RECIPES[recipe], mode=mode, image_size=args.image_size,
        batch_size=batch, workers=args.workers, trainable_params=counts["trainable_params"],
        model_ms_per_step=1e3 * train_seconds,
        model_train_images_per_second=batch / train_seconds,
        model_eval_images_per_second=batch / eval_seconds,
        end_to_end_ms_per_step=1e3 * e2e_train_seconds,
        end_to_end_train_images_per_second=e2e_train_rate,
        end_to_end_eval_images_per_second=e2e_eval_rate,
        end_to_end_over_model=train_seconds / e2e_train_seconds,
        peak_gpu_memory_gib=peak,
        warmup_peak_gpu_memory_gib=warmup_peak,  # cuDNN's autotuning workspaces included
        warmup_seconds=warmup_seconds,
        compile_seconds=engine.warmup_seconds if engine.compiled else None,
        # --fast: 2 graphs (train, eval), all captured as CUDA graphs; more means recompiles
        compiled_graphs=graphs - graphs_before, cudagraph_skips=skips - skips_before,
        epoch_seconds_estimate=training.TRAIN_IMAGES / e2e_train_rate
        + training.TEST_IMAGES / e2e_eval_rate,
        warmup_steps=dict(model=warmup, end_to_end=loader_warmup), timed_steps=steps,
        row_seconds=time.perf_counter() - started)


def compile_counts():
    """(graphs dynamo has compiled, graphs inductor ran without CUDA graphs) so far."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def release(device):
    """Free the previous row's compiled graphs, CUDA-graph pools and cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output

COLUMNS = [  # (header, row key, format)
    ("recipe", "recipe", "{}"),
    ("mode", "mode", "{}"),
    ("px", "image_size", "{}"),
    ("batch", "batch_size", "{}"),
    ("model img/s", "model_train_images_per_second", "{:,.0f}"),
    ("model ms/step", "model_ms_per_step", "{:,.1f}"),
    ("e2e img/s", "end_to_end_train_images_per_second", "{:,.0f}"),
    ("e2e ms/step", "end_to_end_ms_per_step", "{:,.1f}"),
    ("e2e/model", "end_to_end_over_model", "{:.0%}"),
    ("eval img/s model", "model_eval_images_per_second", "{:,.0f}"),
    ("eval img/s e2e", "end_to_end_eval_images_per_second", "{:,.0f}"),
    ("peak GiB", "peak_gpu_memory_gib", "{:.2f}"),
    ("warm-up s", "warmup_seconds", "{:,.1f}"),
    ("est. s/epoch", "epoch_seconds_estimate", "{:,.0f}"),
]


def cells(row):
    if "error" in row:
        return [row["recipe"], row["mode"], f"error: {row['error']}"] + [""] * (len(COLUMNS) - 3)
    return ["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]


def table(document):
    """The results as a Markdown table, under a header that says where they come from."""
    lines = [[header for header, _, _ in COLUMNS]] + [cells(row) for row in document["rows"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]

    def markdown(line):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |"

    below_goal = [f"{r['recipe']} {r['mode']}" for r in document["rows"]
                  if "error" not in r and r["end_to_end_over_model"] < GOAL]
    header = [
        f"bench.py on {document['device']}, torch {document['torch']}, {document['date']}, "
        f"{document['cpus']} CPUs, --workers {document['workers']}, --dummy data, random weights",
        f"model = one batch resident on the device; e2e = training.train/validate on the real "
        f"loaders; est. s/epoch = {training.TRAIN_IMAGES:,} + {training.TEST_IMAGES:,} images "
        f"at the e2e rates, warm-up excluded",
        f"e2e/model goal >= {GOAL:.0%}: "
        + (f"below it: {', '.join(below_goal)}" if below_goal else "met by every row"),
        "",
    ]
    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join(header + [markdown(lines[0]), separator] + [markdown(l) for l in lines[1:]])


def save(path, document):
    path.parent.mkdir(parents=True, exist_ok=True)
    training.atomic_write(path, lambda f: f.write(json.dumps(document, indent=2).encode()))


def resolve_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError("unknown device; use cuda, cuda:N or cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError("unsupported; use cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available here: use --device cpu --tiny")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def main(argv=None):
    options = parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    document = dict(
        device=training.describe_device(options.device), torch=str(torch.__version__),
        date=datetime.now().strftime("%Y-%m-%d %H:%M"), cpus=cpus, workers=options.workers,
        tiny=options.tiny, command="python " + " ".join(sys.argv), status="running", rows=[])
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-") as options.empty_dir:
        for recipe, mode in options.rows:
            print(f"{recipe} {mode}: measuring ...", flush=True)
            try:
                row = measure(recipe, mode, options)
                print(f"{recipe} {mode}: {row['model_train_images_per_second']:,.1f} img/s model "
                      f"only, {row['end_to_end_train_images_per_second']:,.1f} end to end "
                      f"({row['end_to_end_over_model']:.0%}), warm-up "
                      f"{row['warmup_seconds']:.1f} s, {row['compiled_graphs']} graph(s) "
                      f"compiled, {row['cudagraph_skips']} without CUDA graphs, row "
                      f"{row['row_seconds']:.0f} s", flush=True)
            except Exception as error:  # a failed row (a compile error) must not lose the others
                if isinstance(error, TooManySteps):  # the command line's, in one line
                    print(f"{recipe} {mode}: error: {error}", file=sys.stderr, flush=True)
                else:
                    traceback.print_exc()
                failed = True
                error = f"{type(error).__name__}: {error}"[:200]
                row = dict(recipe=recipe, mode=mode, error=error)
            document["rows"].append(row)
            save(options.json, document)  # a run cut short keeps its finished rows
            release(options.device)
    document["status"] = "failed" if failed else "finished"
    save(options.json, document)
    print(f"\nwritten: {options.json}\n")
    print(table(document), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
