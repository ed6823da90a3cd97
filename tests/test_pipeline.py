"""The input pipeline and the training paths, end to end on the CPU:

- equivalence: the default path (workers stop at uint8, normalisation on the device) gives
  the very batches of the plain torchvision pipeline, the script's own Compose on the same
  per-image seed, whatever --workers;
- the loop's parts: a new order every epoch, evaluation in eval mode without autograd,
  accuracy in percent, no gradient kept from one step to the next (CUDA graphs overwrite
  it), what --fast sets (bf16, channels_last, fused Adam on CUDA), pinned memory,
  persistent workers and the current device on CUDA, the GPU memory figure reported;
- --fast falls back where it cannot compile (the CPU; a GPU without Triton or native bf16)
  with a one-line notice, and learns, as the default path does;
- --fast's compiled path, with an eager backend in place of CUDA graphs, compiles one graph
  per mode and batch shape, in the first epoch only, its time left out of images/s;
- bug.py learns nothing: not one parameter changes."""
import json
from types import SimpleNamespace

import pytest
import torch
from torchvision import transforms

import training
from conftest import run_script

BATCH, BATCHES = 4, 2
SMALL = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0",
         "--batch-size", str(BATCH)]
# Small enough for a 2-core CPU (a step ~0.5 s, plus ~8 s of oneDNN set-up on the first),
# yet the loss falls reliably: batch 128 gives BatchNorm steady statistics and Adam a steady
# gradient (at batch 16 or 64, or with 2 batches an epoch, it does not always fall), and 3
# epochs leave a wide margin (measured: 4.95, 4.49, 4.19). Deterministic: fixed seed,
# workers 0.
LEARN = ["--dummy", "--device", "cpu", "--no-pretrained", "--workers", "0", "--seed", "0",
         "--image-size", "32", "--batch-size", "128", "--lr", "0.005",
         "--limit-train-batches", "3", "--limit-eval-batches", "1"]
LEARN_EPOCHS = 3
BUG_EPOCHS = 1  # one epoch is enough to show that nothing is updated
FALLBACK = "--fast: torch.compile with CUDA graphs needs CUDA, not cpu; without torch.compile"


@pytest.fixture
def script(build):
    """script("fixed.py", *argv): what the script would train (the `build` fixture), plus
    the report's original Compose objects at its image size (train_transforms,
    test_transforms): the plain pipeline its data must equal."""
    def built(name, *argv):
        result = build(name, *argv)
        result.train_transforms, result.test_transforms = training.report_transforms(
            result.args.image_size)
        return result
    return built


def loader_batches(view, args, train, workers, epoch=1):
    """The first BATCHES batches of training.make_loader, through Engine.to_device, and the
    (epoch, index) keys they were made from."""
    args = SimpleNamespace(**{**vars(args), "workers": workers})
    loader = training.make_loader(view, args, train)
    if train:
        loader.sampler.epoch = epoch
    keys = list(loader.sampler)[:BATCHES * BATCH]
    engine = training.Engine(args, torch.nn.Identity())
    batches = []
    for images, labels in loader:
        batches.append(engine.to_device(view, images, labels))
        if len(batches) == BATCHES:
            break
    del loader  # stops its persistent workers
    return batches, keys


def plain_batches(view, compose, seed, keys):
    """What the plain torchvision pipeline gives for these keys: each PIL image through the
    script's original Compose, with torch's default generator seeded as SeededView seeds it."""
    images, labels = [], []
    for epoch, index in keys:
        image, label = view.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(training.mix_seed(seed, epoch, index))
            images.append(compose(image))
        labels.append(label)
    return [(torch.stack(images[i:i + BATCH]), torch.tensor(labels[i:i + BATCH]))
            for i in range(0, len(keys), BATCH)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected) == BATCHES
    for (images, labels), (plain_images, plain_labels) in zip(got, expected):
        assert images.dtype == plain_images.dtype == torch.float32
        assert images.shape == plain_images.shape
        assert torch.equal(images, plain_images)  # bit for bit, not approximately
        assert torch.equal(labels, plain_labels)


# --------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("name, size", [("fixed.py", 64), ("fixed.py", 224), ("bug.py", 64)])
def test_train_batches_are_the_plain_pipelines(script, name, size):
    built = script(name, *SMALL, "--image-size", size)
    view, args = built.train_set, built.args
    assert view.normalize is not None  # the uint8 path is the one under test
    compose = built.train_transforms  # the report's pipeline, as the script asked for it
    assert [type(t) for t in compose.transforms] == [
        transforms.Resize, transforms.RandomHorizontalFlip, transforms.RandomRotation,
        transforms.ToTensor, transforms.Normalize]
    assert tuple(compose.transforms[0].size) == (size, size)

    got, keys = loader_batches(view, args, train=True, workers=0)
    assert all(epoch == 1 for epoch, _ in keys)
    assert [index for _, index in keys] != list(range(len(keys)))  # shuffled
    expected = plain_batches(view, compose, args.seed, keys)
    assert got[0][0].shape == (BATCH, 3, size, size)
    assert_same_batches(got, expected)


def test_test_batches_are_the_plain_pipelines(script):
    built = script("fixed.py", *SMALL, "--image-size", 64)
    assert [type(t) for t in built.test_transforms.transforms] == [
        transforms.Resize, transforms.ToTensor, transforms.Normalize]
    got, keys = loader_batches(built.test_set, built.args, train=False, workers=0)
    assert [index for _, index in keys] == list(range(BATCHES * BATCH))  # in order
    expected = plain_batches(built.test_set, built.test_transforms, built.args.seed,
                             keys)
    assert_same_batches(got, expected)


def test_workers_give_the_same_batches(script):
    built = script("fixed.py", *SMALL, "--image-size", 64)
    for view, train in ((built.train_set, True), (built.test_set, False)):
        alone, keys = loader_batches(view, built.args, train, workers=0)
        with_workers, same_keys = loader_batches(view, built.args, train, workers=2)
        assert keys == same_keys
        assert_same_batches(with_workers, alone)


def test_the_fast_path_gives_the_same_values_in_channels_last(script):
    built = script("fixed.py", *SMALL, "--image-size", 64, "--fast")
    got, keys = loader_batches(built.train_set, built.args, train=True, workers=0)
    assert got[0][0].is_contiguous(memory_format=torch.channels_last)
    expected = plain_batches(built.train_set, built.train_transforms,
                             built.args.seed, keys)
    assert_same_batches(got, expected)


def test_each_epoch_draws_its_own_order_and_train_sets_the_epoch(build, tmp_path):
    """Shuffling and augmentation derive from the (epoch, index) keys: a new order every
    epoch (with batch limits, other images), and train() tells the sampler which epoch."""
    sampler = training.EpochSampler(1000, seed=0, shuffle=True, limit=8)
    orders = {}
    for epoch in (1, 2):
        sampler.epoch = epoch
        keys = list(sampler)
        assert {e for e, _ in keys} == {epoch}
        orders[epoch] = [index for _, index in keys]
    assert orders[1] != orders[2]
    sampler.epoch = 1
    assert [index for _, index in sampler] == orders[1]  # and the same again on replay

    built = build("fixed.py", *SMALL, "--image-size", "32", "--limit-train-batches", "1",
                  "--output-dir", tmp_path)
    loader = training.make_loader(built.train_set, built.args, train=True)
    engine = training.Engine(built.args, built.model)
    training.train(built.model, loader, built.criterion, built.optimizer, engine, 3,
                   SimpleNamespace(check=lambda: None))
    assert loader.sampler.epoch == 3


def test_validate_runs_in_eval_mode_without_autograd(build, tmp_path):
    """Test batches go through BatchNorm's running statistics, without dropout, and keep
    no activations for a backward pass (the GPU-memory symptom is the training step's)."""
    built = build("fixed.py", *SMALL, "--image-size", "32", "--limit-eval-batches", "1",
                  "--output-dir", tmp_path)
    seen = []

    def criterion(output, labels):
        seen.append((built.model.training, torch.is_grad_enabled(), output.requires_grad))
        return built.criterion(output, labels)

    built.model.train()
    loader = training.make_loader(built.test_set, built.args, train=False)
    training.validate(built.model, loader, criterion, training.Engine(built.args, built.model),
                      1, SimpleNamespace(check=lambda: None))
    assert seen == [(False, False, False)]


def test_accuracy_is_in_percent():
    """Chance on CIFAR-100 is 1 %: the results say 1.0, not 0.01."""
    meter = training.Meter(SimpleNamespace(set_postfix_str=print), where="test")
    output = torch.eye(4, 100)  # predicts classes 0, 1, 2, 3
    meter.update(1, torch.tensor(2.5), output, torch.tensor([0, 1, 2, 9]))
    assert meter.result() == (2.5, 75.0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "default"])
def test_fast_means_bf16_autocast_and_a_channels_last_model(fast):
    """What --fast changes even where it cannot compile (here, the CPU); the default path
    stays float32 and contiguous."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    engine = training.Engine(SimpleNamespace(device=torch.device("cpu"), fast=fast), model)
    layout = torch.channels_last if fast else torch.contiguous_format
    assert model[0].weight.is_contiguous(memory_format=layout)
    with engine.autocast():
        output = model(torch.zeros(1, 3, 8, 8))
    assert output.dtype == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (8, 7), (17, 16), (64, 16)])
def test_default_workers_leave_the_main_process_a_cpu(monkeypatch, cpus, workers):
    """--workers' default: one less than the CPUs this process may use, at most 16."""
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(cpus)),
                        raising=False)
    assert training.default_workers() == workers


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "default"])
def test_on_cuda_the_loader_pins_memory_and_fast_fuses_adam(monkeypatch, tmp_path, fast):
    """The GPU's settings, checked without one: CUDA's presence is stubbed and nothing is
    run on it. Pinned batches (the copies to the GPU are non-blocking), workers kept between
    epochs; fused Adam with --fast only (None: PyTorch's default, as in the report)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    args = training.parse_args("fixed.py", "", epochs=1, batch_size=4, lr=0.005, image_size=32,
                               argv=["--dummy", "--device", "cuda", "--workers", "2",
                                     "--output-dir", str(tmp_path), *(["--fast"] if fast else [])])
    assert args.device == torch.device("cuda", 0)
    assert args.fused is (True if fast else None)
    for train in (True, False):
        loader = training.make_loader(range(100), args, train)  # never iterated
        assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2


# --------------------------------------------------------------------------- learning

def train_losses(tmp_path, name, epochs, *flags):
    done = run_script(name, *LEARN, "--epochs", epochs, "--output-dir", tmp_path, *flags,
                      timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / f"{name[:-3]}.json").read_text())
    assert results["status"] == "finished"
    assert [e["epoch"] for e in results["epochs"]] == list(range(1, epochs + 1))
    return [e["train_loss"] for e in results["epochs"]], done.stdout


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "default"])
def test_fixed_learns_on_the_cpu(tmp_path, fast):
    losses, stdout = train_losses(tmp_path, "fixed.py", LEARN_EPOCHS,
                                  *(["--fast"] if fast else []))
    notices = [line for line in stdout.splitlines() if line.startswith("--fast:")]
    if fast:
        assert len(notices) == 1 and FALLBACK in notices[0], stdout
    else:
        assert notices == []
    assert losses[-1] < losses[0] - 0.1, losses


def test_bug_changes_no_parameter(tmp_path, script):
    initial = script("bug.py", *LEARN).model.module
    train_losses(tmp_path, "bug.py", BUG_EPOCHS)
    checkpoint = torch.load(tmp_path / "bug.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == BUG_EPOCHS  # the final checkpoint, not the epoch-0 one
    final = checkpoint["model"]
    for name, parameter in initial.named_parameters():
        assert torch.equal(final[name], parameter.detach()), name
    # It did train: BatchNorm's running statistics (buffers, not parameters) moved.
    assert not torch.equal(final["_bn0.running_mean"], initial._bn0.running_mean)


@pytest.mark.parametrize("triton, capability, problem", [
    (True, (8, 0), None),
    (True, (8, 6), None),
    (True, (9, 0), None),
    (False, (8, 6), "torch.compile needs Triton, which is not installed"),
    (True, (7, 5), "native bf16 (compute capability 8.0 or newer); Tesla T4 is 7.5"),
], ids=["A100", "A40", "H100", "no-triton", "no-native-bf16"])
def test_fast_on_a_gpu_it_cannot_compile_for_falls_back(monkeypatch, capsys, triton,
                                                        capability, problem):
    """On CUDA, --fast compiles only where inductor can compile its bf16 graphs to Triton
    kernels; elsewhere one notice says why, instead of a traceback in the first step or, on
    a GPU without native bf16, inductor silently skipping the graph. (No GPU here: the
    checks' inputs are stubbed; nothing touches CUDA.)"""
    find_spec = training.importlib.util.find_spec
    monkeypatch.setattr(training.importlib.util, "find_spec",
                        lambda name: (object() if triton else None) if name == "triton"
                        else find_spec(name))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    gpu = torch.device("cuda", 0)
    found = training.compile_problem(gpu)
    if problem is None:
        assert found is None
        return
    assert problem in found
    engine = training.Engine(SimpleNamespace(device=gpu, fast=True), torch.nn.Linear(2, 2))
    notices = capsys.readouterr().out.splitlines()
    assert not engine.compiled and engine.memory_format == torch.channels_last
    assert notices == [f"--fast: {found}; without torch.compile, only bf16 autocast, "
                       "channels_last and fused Adam apply"]


def test_the_runs_gpu_becomes_the_current_device(monkeypatch, tmp_path):
    """--device cuda:1: the loader's pin-memory thread pins for the current device, which
    would otherwise stay GPU 0 and open a CUDA context there too. (CUDA stubbed.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    training.parse_args("fixed.py", "", epochs=1, batch_size=4, lr=0.005, image_size=32,
                        argv=["--dummy", "--device", "cuda:1", "--output-dir", str(tmp_path)])
    assert current == [torch.device("cuda", 1)]


@pytest.mark.parametrize("compiled", [True, False], ids=["cuda-graphs", "default"])
def test_peak_gpu_memory_counts_what_cuda_graphs_hold(monkeypatch, compiled):
    """The peak GPU memory of an epoch (and of a bench row): allocated, as the report
    counts it; with CUDA graphs, reserved, since a replayed graph's tensors live in a pool
    the allocator holds but does not count as allocated; what the eager warm-up left cached
    is released first, so that it does not count. (CUDA stubbed: nothing runs on it.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: ("allocated", device))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: ("reserved", device))
    gpu = torch.device("cuda", 0)
    engine = training.Engine(SimpleNamespace(device=gpu, fast=False), torch.nn.Identity())
    engine.compiled = compiled  # what --fast sets where it compiles
    engine.reset_peak_memory()
    assert calls == (["empty_cache"] if compiled else []) + [("reset", gpu)]
    assert engine.peak_memory() == ("reserved" if compiled else "allocated", gpu)


def test_no_gradient_outlives_its_step(build, tmp_path):
    """Each step's gradients are new: the last step's are dropped, for every parameter,
    not only the optimizer's. With --fast's CUDA graphs a gradient lives in memory the next
    replay overwrites, and adding to it fails on the GPU ("accessing gradient tensor output
    of CUDAGraphs that has been overwritten"). bug.py is the case: its BatchNorm parameters
    require grad and are in no optimizer. Here the last step's gradients are overwritten by
    hand, with NaN, as a replay would overwrite them."""
    built = build("bug.py", *SMALL, "--image-size", "32", "--output-dir", tmp_path)
    engine = training.Engine(built.args, built.model)
    images, labels = engine.to_device(
        built.train_set, *torch.utils.data.default_collate(
            [built.train_set[(1, index)] for index in range(BATCH)]))

    def step():
        training.train_step(built.model, built.criterion, built.optimizer, engine, images,
                            labels)
        return {name: p.grad for name, p in built.model.named_parameters()
                if p.grad is not None}

    built.model.train()
    stale = step()
    assert len(stale) == 98  # BatchNorm's weights and biases: trainable, not in the optimizer
    for grad in stale.values():
        grad.fill_(float("nan"))
    fresh = step()
    assert fresh.keys() == stale.keys()
    for name, grad in fresh.items():
        assert grad is not stale[name] and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "default"])
def test_only_fast_calls_past_a_one_device_data_parallel(fast):
    """--fast calls the module inside a one-device DataParallel directly (the same
    computation, without its per-call device check of every tensor); the default path goes
    through DataParallel, as the report's code does. Stand-in for cuda:0 on the CPU: a
    wrapper that believes it is on cuda:0 refuses a CPU module when it is called."""
    module = torch.nn.Linear(3, 2)
    parallel = torch.nn.DataParallel(module)
    parallel.device_ids, parallel.src_device_obj = [0], torch.device("cuda", 0)
    engine = training.Engine(SimpleNamespace(device=torch.device("cpu"), fast=fast), parallel)
    images = torch.ones(4, 3)
    if fast:
        assert torch.equal(engine.forward(parallel, images), module(images))
    else:
        with pytest.raises(RuntimeError, match="module must have its parameters"):
            engine.forward(parallel, images)


def test_fast_counts_only_each_shapes_first_calls_as_warm_up(monkeypatch):
    """The compiled path's bookkeeping, on the CPU: the first COMPILED_WARMUP_CALLS calls of
    each (mode, batch shape) are timed as warm-up, later ones are not, and every call marks
    a new CUDA-graph step."""
    engine = training.Engine(SimpleNamespace(device=torch.device("cpu"), fast=False),
                             torch.nn.Identity())
    engine.compiled = True  # what --fast on CUDA sets; the CUDA-graph call is stubbed below
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    full, partial = torch.zeros(4, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    calls = [(True, full)] * 5 + [(True, partial)] + [(False, full)] * 4
    results = [engine.step(mode, images, lambda: "ran") for mode, images in calls]

    assert results == ["ran"] * len(calls) and len(marks) == len(calls)
    warm = training.COMPILED_WARMUP_CALLS
    assert engine.warmup_images == warm * 4 + 2  # training images only; eval is apart
    assert sum(engine.calls.values()) == len(calls)
    assert engine.calls[(True, tuple(full.shape))] == 5
    assert engine.warmup_seconds > 0


def test_the_compiled_path_compiles_each_mode_and_shape_once(build, tmp_path, monkeypatch,
                                                              capsys):
    """--fast's compiled path run for real on the CPU, with torch.compile's CUDA-graph mode
    swapped for the aot_eager backend (the same dynamo graphs and guards, the same autograd,
    no inductor, no CUDA graphs): one graph per mode and batch shape (training and test,
    full and last partial batch), all compiled in the first epoch and none in later ones,
    and the checkpoint keeps the bare EfficientNet's keys."""
    monkeypatch.setattr(training, "COMPILE", dict(backend="aot_eager", dynamic=False))
    monkeypatch.setattr(training, "COMPILE_ON", ("cuda", "cpu"))
    built = build("fixed.py", *SMALL, "--image-size", "32", "--fast", "--epochs", "3",
                  "--output-dir", tmp_path)
    images = 4 * BATCH + 2  # 4 full batches and a partial one
    for view in (built.train_set, built.test_set):
        view.images = torch.utils.data.Subset(view.images, range(images))
    graphs = torch._dynamo.utils.counters["stats"]
    compiled_before_epoch = []
    seed_epoch = training.seed_epoch  # called as each epoch starts

    def count_then_seed(seed, epoch):
        compiled_before_epoch.append(graphs["unique_graphs"])
        seed_epoch(seed, epoch)

    train, train_warmups = training.train, []  # the epoch's warm-up so far: training's

    def train_noting_its_warmup(model, loader, criterion, optimizer, engine, epoch, stop):
        trained = train(model, loader, criterion, optimizer, engine, epoch, stop)
        train_warmups.append(engine.warmup_seconds)
        return trained

    monkeypatch.setattr(training, "seed_epoch", count_then_seed)
    monkeypatch.setattr(training, "train", train_noting_its_warmup)
    torch._dynamo.reset()
    start = graphs["unique_graphs"]
    try:
        training.run(built.args, built.model, built.criterion, built.optimizer,
                     built.train_set, built.test_set)
        compiled = [n - start for n in compiled_before_epoch + [graphs["unique_graphs"]]]
    finally:
        torch._dynamo.reset()
    assert "--fast:" not in capsys.readouterr().out  # no fallback notice
    assert compiled == [0, 4, 4, 4]  # before epochs 1, 2, 3 and at the end

    results = json.loads((tmp_path / "fixed.json").read_text())
    assert results["status"] == "finished" and results["config"]["fast"] is True
    assert all("warmup_seconds" in entry for entry in results["epochs"])
    first = results["epochs"][0]
    assert first["warmup_seconds"] > 0
    # Epoch 1's images/s is its steady rate (its 3rd and 4th full batches), compiling left
    # out: counted in, the rate would be below all its images over the warm-up's time alone.
    assert first["train_images_per_second"] > images / train_warmups[0], (first, train_warmups)
    checkpoint = torch.load(tmp_path / "fixed.pth", map_location="cpu", weights_only=True)
    bare = training.EfficientNet.from_name("efficientnet-b0").state_dict()
    assert checkpoint["model"].keys() == bare.keys()
