"""run() trains to --epochs with the script's own train() and validate(), which iterate
a Progress (an epoch's batches, its progress bar and running figures), then tests and
saves after every epoch."""
import shlex
import sys
import time
from contextlib import suppress

import torch
from tqdm import tqdm

import schema

from . import fast, rundir
from .data import LoaderBatches, mix_seed
from .errors import DiskFull, RunError, ignore_stops
from .model import WEIGHTS_URL, count_params

# A loop's first steps are its warm-up, timed apart and left out of the images/s: cuDNN
# tries algorithms for each new shape, and --fast compiles its model (fast.py).
WARMUP_STEPS = 2


def run(args, model, criterion, optimizer, train_data, test_data, *, train, validate):
    """Train to --epochs with the script's train() and validate(). A failure or a stop
    leaves every finished epoch and a true status, then goes up to the one handler."""
    cuda = args.device.type == "cuda"
    own = dict(optimizer=type(optimizer).__name__, **count_params(model, optimizer),
               weights=None if args.no_pretrained else str(args.weights or WEIGHTS_URL),
               device=torch.cuda.get_device_name(args.device) if cuda else "cpu",
               torch=str(torch.__version__))
    # The rest of the config is the command line's, under the same names, in schema order.
    config = {key: own[key] if key in own else getattr(args, key)
              for key in schema.CONFIG}
    print(f"{args.script}: {config['trainable_params']:,} of {config['total_params']:,} "
          f"parameters require grad, {config['updated_params']:,} of them in the "
          f"optimizer; {args.image_size} px, batch {args.batch_size}, lr {args.lr}, "
          f"{config['device']}", flush=True)
    if args.dummy:
        print("--dummy: synthetic images, whose accuracy says nothing of CIFAR-100")

    with rundir.sole_writer(args):
        history = []
        if args.resume:
            state = rundir.load_checkpoint(args, config)
            model.module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]
            config["epochs"] = max(args.epochs, len(history))  # what it holds, if more
            if len(history) >= args.epochs:
                print(f"{args.checkpoint_path} already holds {len(history)} epoch(s): "
                      "nothing to train (raise --epochs to extend it)", flush=True)
        else:  # the old JSON first: it must never sit beside the new run's checkpoint
            args.results_path.unlink(missing_ok=True)
            rundir.save_checkpoint(args, model, optimizer, config, history)
        try:
            rundir.save_results(args, config, history, "running")
            network, *batches = prepare(model, train_data, test_data, args)
            for epoch in range(len(history) + 1, args.epochs + 1):
                entry = one_epoch(epoch, network, criterion, optimizer, batches, train,
                                  validate, args)
                rundir.save_checkpoint(args, model, optimizer, config, history + [entry])
                history.append(entry)
                rundir.save_results(args, config, history, "running")
                print(epoch_line(entry, args), flush=True)
            ignore_stops()  # all saved: a stop now could only break the clean-up
            rundir.save_results(args, config, history, "finished")
        except (KeyboardInterrupt, Exception) as error:
            replacement = ending(error, args, config, history)
            if replacement is None:  # unexpected: its own traceback says what happened
                raise
            raise replacement from None
    print(f"done: {args.results_path} and {args.checkpoint_path}", flush=True)


def ending(error, args, config, history):
    """Saves the status; returns the one line to end with, or None if `error` is a bug."""
    stopped = isinstance(error, KeyboardInterrupt)  # Ctrl-C, or SIGTERM (Terminated)
    with suppress(RunError):  # the full disk that failed the run may refuse this too
        rundir.save_results(args, config, history, "interrupted" if stopped else "failed")
    epoch = len(history) + 1
    kept = f"{args.results_path} keeps {len(history)} finished epoch(s)"
    if stopped:  # the same command resumes it, without --overwrite
        argv = [a for a in sys.argv if a != "--overwrite"]
        argv += [] if "--resume" in argv else ["--resume"]
        return type(error)(f"stopped in epoch {epoch}; {kept}. Resume with:\n"
                           f"  python {shlex.join(argv)}")
    gpu = torch.OutOfMemoryError in (type(error), type(error.__cause__))
    if gpu or "DefaultCPUAllocator: can't allocate memory" in str(error):
        where = f"{'GPU ' if gpu else ''}memory in epoch {epoch} ({config['device']})"
        return RunError(f"out of {where}; {kept}. A smaller --batch-size or --image-size "
                        "needs less, as a new run (--overwrite, or another --run-name)")
    if isinstance(error, RunError):
        resume = ", and --resume continues it" if isinstance(error, DiskFull) else ""
        return RunError(f"{error}; {kept}{resume}")
    return None


def prepare(model, train_data, test_data, args):
    """The step's `model`, and the training and test batches: as built, or --fast's."""
    torch.backends.cudnn.benchmark = args.device.type == "cuda"  # the fastest algorithms
    if args.fast:
        return fast.prepare(model, train_data, test_data, args)
    return (model, LoaderBatches(train_data, args, train=True),
            LoaderBatches(test_data, args, train=False))


def one_epoch(epoch, model, criterion, optimizer, batches, train, validate, args):
    """An epoch of the script's train() and validate(): its entry in the results."""
    train_batches, test_batches = batches
    for each in batches:
        each.set_epoch(epoch)
    # Dropout and drop-connect draw from (seed, epoch), as the data do: a resume replays.
    torch.manual_seed(mix_seed(args.seed, epoch, 1))
    if args.device.type == "cuda":
        torch.cuda.empty_cache()  # what an earlier epoch left cached is not this peak
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    trained = Progress(f"epoch {epoch} training", train_batches, args)
    train(model, trained, criterion, optimizer)
    tested = Progress(f"epoch {epoch} test", test_batches, args)
    validate(model, tested, criterion)
    return schema.record(
        schema.EPOCH, epoch=epoch, train_loss=trained.loss(),
        train_acc=trained.accuracy(), test_loss=tested.loss(),
        test_acc=tested.accuracy(), epoch_seconds=time.perf_counter() - start,
        train_images_per_second=trained.images_per_second,
        peak_gpu_memory_gib=peak_memory_gib(args),
        warmup_seconds=trained.warmup_seconds + tested.warmup_seconds)


class Progress:
    """An epoch's batches behind a progress bar, for the scripts' loops to iterate and to
    record() each step into. The running figures stay on the device, read (one sync) once
    a second, when a NaN loss stops the run. Its images/s leave out the warm-up."""

    def __init__(self, where, batches, args):
        self.where, self.batches, self.device = where, batches, args.device
        self.loss_sum = self.correct = self.images = 0

    def __iter__(self):
        start = last_read = time.perf_counter()
        warm = None  # (seconds, images) when the warm-up ended, if it did
        with tqdm(self.batches, desc=self.where, unit="batch", leave=False,
                  dynamic_ncols=True) as bar:
            for step, (images, labels) in enumerate(bar):
                if step == WARMUP_STEPS:
                    warm = (self.clock() - start, self.images)
                yield images, labels
                if time.perf_counter() - last_read >= 1.0:
                    last_read = time.perf_counter()
                    self.read(bar, last_read - start)
            self.seconds = self.clock() - start
            self.read(bar, self.seconds)
        # Images a second after the warm-up, or over the whole loop if it had no more.
        self.warmup_seconds, warm_images = warm or (self.seconds, 0)
        steady = self.seconds - self.warmup_seconds if warm else self.seconds
        self.images_per_second = (self.images - warm_images) / steady

    def record(self, loss, output, labels):
        # float64: an epoch adds up to 12,500 batch losses
        self.loss_sum = self.loss_sum + loss.detach().double() * len(labels)
        self.correct = self.correct + (output.argmax(1) == labels).sum()
        self.images += len(labels)

    def clock(self):  # once the device has done what was asked of it
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def read(self, bar, seconds):
        loss = self.loss()
        if loss != loss or abs(loss) == float("inf"):
            raise RunError(f"the loss became NaN or infinite in {self.where} (after "
                           f"{self.images} images): try a lower --lr, as a new run "
                           "(--overwrite, or another --run-name)")
        bar.set_postfix_str(f"loss {loss:.4f}  acc {self.accuracy():.2f}%  "
                            f"{rate(self.images / seconds)} img/s", refresh=False)

    def loss(self):
        return float(self.loss_sum) / self.images if self.images else float("nan")

    def accuracy(self):
        return 100.0 * float(self.correct) / self.images if self.images else float("nan")


def peak_memory_gib(args):
    """The GPU memory's peak since the last reset: allocated, as the report's figure
    counts it, or with --fast reserved (fast.FastModel says why); None on the CPU."""
    if args.device.type == "cuda":
        cuda = torch.cuda
        peak = cuda.max_memory_reserved if args.fast else cuda.max_memory_allocated
        return peak(args.device) / 2**30


def rate(images_per_second):
    """82, 1,170, and on a CPU 0.21 rather than 0."""
    if images_per_second >= 10:
        return f"{images_per_second:,.0f}"
    return f"{images_per_second:.2g}"


def epoch_line(entry, args):
    memory = entry["peak_gpu_memory_gib"]
    peak = "" if memory is None else f", peak {memory:.2f} GiB" + " reserved" * args.fast
    return (f"epoch {entry['epoch']}/{args.epochs}: train loss {entry['train_loss']:.4f} "
            f"acc {entry['train_acc']:.2f}% | test loss {entry['test_loss']:.4f} "
            f"acc {entry['test_acc']:.2f}% | {entry['epoch_seconds']:.1f} s, "
            f"{rate(entry['train_images_per_second'])} train img/s{peak}, "
            f"warm-up {entry['warmup_seconds']:.1f} s")
