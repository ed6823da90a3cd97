"""run() trains to --epochs, testing and saving after every epoch; then train() and
validate(), the loops the report's user would have written."""
import importlib.util
import shlex
import sys
import time
from contextlib import suppress

import torch
from tqdm import tqdm

import schema
from . import rundir
from .cli import RunError
from .data import batches, mix_seed
from .model import WEIGHTS_URL, count_params


def run(args, model, criterion, optimizer, train_data, test_data):
    """Train to --epochs. A failure, Ctrl-C or SIGTERM leaves every finished epoch and a true
    status in the results, then goes up to the one handler (training.command_line)."""
    own = dict(optimizer=type(optimizer).__name__, **count_params(model, optimizer),
               weights=None if args.no_pretrained else str(args.weights or WEIGHTS_URL),
               device=describe(args.device), torch=str(torch.__version__))
    # The rest of the config is the command line's, under the same names, in schema order.
    config = {key: own[key] if key in own else getattr(args, key) for key in schema.CONFIG}
    print(f"{args.script}: {config['trainable_params']:,} of {config['total_params']:,} "
          f"parameters require grad, {config['updated_params']:,} of them in the optimizer; "
          f"{args.image_size} px, batch {args.batch_size}, lr {args.lr}, {config['device']}",
          flush=True)
    if args.dummy:
        print("--dummy: synthetic images; accuracy says nothing about CIFAR-100", flush=True)

    with rundir.sole_writer(args):
        history = []
        if args.resume:
            state = rundir.load_checkpoint(args, config)
            model.module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]
            config["epochs"] = max(args.epochs, len(history))  # what it holds, if more
        else:  # the old JSON first: it must never sit beside the new run's checkpoint
            args.results_path.unlink(missing_ok=True)
            rundir.save_checkpoint(args, model, optimizer, config, history)
        rundir.save_results(args, config, history, "running")
        try:
            compiled = speed_up(model, args)
            trains = batches(train_data, args, train=True)
            tests = batches(test_data, args, train=False)
            for epoch in range(len(history) + 1, args.epochs + 1):
                entry = one_epoch(model, criterion, optimizer, trains, tests, epoch, args, compiled)
                rundir.save_checkpoint(args, model, optimizer, config, history + [entry])
                history.append(entry)
                rundir.save_results(args, config, history, "running")
                print(epoch_line(entry, args.epochs), flush=True)
        except (KeyboardInterrupt, Exception) as error:
            stopped = isinstance(error, KeyboardInterrupt)  # Ctrl-C, or SIGTERM (Terminated)
            with suppress(RunError):  # the full disk that failed the run may refuse this too
                rundir.save_results(args, config, history, "interrupted" if stopped else "failed")
            kept = f"{args.results_path} keeps {len(history)} finished epoch(s)"
            if stopped:  # the same command resumes it, without --overwrite
                argv = [a for a in sys.argv if a != "--overwrite"]
                argv += [] if "--resume" in argv else ["--resume"]
                raise type(error)(f"stopped in epoch {len(history) + 1}; {kept}. Resume with:\n"
                                  f"  python {shlex.join(argv)}") from None
            if torch.OutOfMemoryError in (type(error), type(error.__cause__)):
                raise RunError(f"out of GPU memory in epoch {len(history) + 1} "
                               f"({config['device']}); {kept}. A smaller --batch-size or "
                               "--image-size needs less, as a new run (--overwrite, or another "
                               "--run-name): bug.py's recipe takes about 11 GB") from None
            if isinstance(error, RunError):
                raise RunError(f"{error}; {kept}") from None
            raise
        rundir.save_results(args, config, history, "finished")
    print(f"done: {args.results_path} and {args.checkpoint_path}")


def one_epoch(model, criterion, optimizer, train_batches, test_batches, epoch, args, compiled):
    # Dropout and drop-connect draw from (seed, epoch), as the data do: a resume replays.
    torch.manual_seed(mix_seed(args.seed, epoch, 1))
    cuda = args.device.type == "cuda"
    if cuda:
        if compiled:  # what the eager warm-up left cached would count as reserved
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    trained = train(model, train_batches, criterion, optimizer, epoch, args, compiled)
    tested = validate(model, test_batches, criterion, epoch, args, compiled)
    # Peak memory: allocated, as the report's figure counts. With CUDA graphs, reserved: a
    # replayed graph's tensors live in a pool the allocator holds but does not count.
    peak = (torch.cuda.max_memory_reserved if compiled else torch.cuda.max_memory_allocated)
    return schema.record(
        schema.EPOCH, epoch=epoch, train_loss=trained.loss(), train_acc=trained.accuracy(),
        test_loss=tested.loss(), test_acc=tested.accuracy(),
        epoch_seconds=time.perf_counter() - start, train_images_per_second=trained.rate(),
        peak_gpu_memory_gib=peak(args.device) / 2**30 if cuda else None,
        warmup_seconds=trained.warmup_seconds + tested.warmup_seconds if compiled else None)


def train(model, batches, criterion, optimizer, epoch, args, compiled=False):
    model.train()
    batches.set_epoch(epoch)
    meter = Meter(f"epoch {epoch} training", batches, args, compiled)
    for images, labels in meter:
        network = what_runs(model, args, compiled, len(labels))
        if compiled:  # CUDA graphs: a step's outputs and gradients live in memory that the
            # next replay overwrites, so nothing may outlive its step, not even a gradient
            # that no optimizer clears (bug.py's BatchNorm parameters). No number changes.
            torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
        optimizer.zero_grad()
        with torch.autocast(args.device.type, torch.bfloat16, enabled=args.fast):
            output = network(images)
            loss = criterion(output, labels)
        loss.backward()
        optimizer.step()
        meter.update(loss, output, labels)
    return meter


def validate(model, batches, criterion, epoch, args, compiled=False):
    model.eval()
    batches.set_epoch(epoch)
    meter = Meter(f"epoch {epoch} test", batches, args, compiled)
    with torch.no_grad():
        for images, labels in meter:
            network = what_runs(model, args, compiled, len(labels))
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(args.device.type, torch.bfloat16, enabled=args.fast):
                output = network(images)
                loss = criterion(output, labels)
            meter.update(loss, output, labels)
    return meter


def what_runs(model, args, compiled, batch):
    """--fast: past DataParallel (~0.5 ms of device checks a step); a last, smaller batch eager."""
    if not args.fast:
        return model
    return model.module.forward if compiled and batch < args.batch_size else model.module


class Meter:
    """Iterates the batches behind a progress bar and keeps the running loss and accuracy on
    the device, read (one sync) once a second: then a NaN or infinite loss stops the run.
    Its images/s are the steady state's: without --fast's first two steps (they compile
    and record the CUDA graph) and a last, smaller batch."""
    def __init__(self, where, batches, args, compiled):
        self.where, self.batches, self.args = where, batches, args
        self.warmup_steps = 2 if compiled else 0
        self.loss_sum = self.correct = self.images = 0
        self.marks = []  # (time, images) where the steady state starts, and where it ends

    def __iter__(self):
        start = last_read = time.perf_counter()
        with tqdm(self.batches, desc=self.where, unit="batch", leave=False,
                  dynamic_ncols=True) as bar:
            for step, (images, labels) in enumerate(bar):
                if step == self.warmup_steps or self.marks and len(labels) < self.args.batch_size:
                    self.mark()
                yield images, labels
                if time.perf_counter() - last_read >= 1.0:
                    last_read = time.perf_counter()
                    self.read(bar, last_read - start)
            self.read(bar, time.perf_counter() - start)
        self.mark()
        self.seconds = time.perf_counter() - start
        (start, first), (end, last) = self.marks[0], self.marks[min(1, len(self.marks) - 1)]
        self.steady_images, self.warmup_seconds = last - first, self.seconds - (end - start)

    def update(self, loss, output, labels):
        # float64: an epoch adds up to 12,500 batch losses
        self.loss_sum = self.loss_sum + loss.detach().double() * len(labels)
        self.correct = self.correct + (output.argmax(1) == labels).sum()
        self.images += len(labels)

    def mark(self):
        if self.args.device.type == "cuda":
            torch.cuda.synchronize(self.args.device)
        self.marks.append((time.perf_counter(), self.images))

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

    def rate(self):
        """Images a second in the steady state, or over the whole loop if it had none."""
        steady = self.seconds - self.warmup_seconds
        return self.steady_images / steady if self.steady_images else self.images / self.seconds


def speed_up(model, args):
    """cuDNN's autotuner on CUDA; with --fast also channels_last, and torch.compile with CUDA
    graphs (no launch overhead, which bounds the eager step) where it can. True if compiled."""
    torch.backends.cudnn.benchmark = args.device.type == "cuda"
    if not args.fast:
        return False
    model.to(memory_format=torch.channels_last)
    if args.device.type != "cuda":
        problem = f"torch.compile with CUDA graphs needs CUDA, not {args.device.type}"
    elif importlib.util.find_spec("triton") is None:  # (Windows) it would fail mid-run
        problem = "torch.compile needs Triton, which is not installed"
    elif torch.cuda.get_device_capability(args.device) < (8, 0):  # a T4, a V100: no bf16
        problem = f"torch.compile here needs native bf16, which {describe(args.device)} lacks"
    else:  # in place: the state_dict's keys stay those of the bare EfficientNet
        model.module.compile(mode="reduce-overhead", dynamic=False)
        return True
    print(f"--fast: {problem}; the rest of --fast applies, without torch.compile", flush=True)
    return False


def describe(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def rate(images_per_second):
    """82, 1,170, and on a CPU 0.21 rather than 0."""
    return f"{images_per_second:,.0f}" if images_per_second >= 10 else f"{images_per_second:.2g}"


def epoch_line(entry, epochs):
    memory, warmup = entry["peak_gpu_memory_gib"], entry["warmup_seconds"]
    peak = ("" if memory is None  # the CPU
            else f", peak {memory:.2f} GiB" + ("" if warmup is None else " reserved"))
    return (f"epoch {entry['epoch']}/{epochs}: train loss {entry['train_loss']:.4f} "
            f"acc {entry['train_acc']:.2f}% | test loss {entry['test_loss']:.4f} "
            f"acc {entry['test_acc']:.2f}% | {entry['epoch_seconds']:.1f} s, "
            f"{rate(entry['train_images_per_second'])} train img/s{peak}"
            + ("" if warmup is None else f", compile warm-up {warmup:.0f} s"))
