"""What a results file (results/NAME.json) holds: the one definition that the training
scripts write, a resume checks, and compare.py reads. Plain Python, so compare.py needs no
torch."""
NUMBER = (int, float)
NONE = type(None)

# The settings that make a run what it is: a checkpoint resumes only under the same ones,
# so that two experiments are never spliced into one history.
RECIPE = {"script": str, "image_size": int, "batch_size": int, "lr": NUMBER,
          "optimizer": str, "pretrained": str, "dummy": bool, "fast": bool, "seed": int,
          "limit_train_batches": (int, NONE), "limit_eval_batches": (int, NONE)}
# ...and what may change between a run and its resumption, or follows from the recipe.
CONFIG = {**RECIPE, "epochs": int, "total_params": int, "trainable_params": int,
          "updated_params": int, "weights": (str, NONE), "device": str, "torch": str,
          "workers": int}
# One entry per finished epoch. Losses are mean cross-entropy, accuracies percent, memory
# the peak on the GPU (None on the CPU), warm-up the seconds of the first steps of
# training and testing, left out of the images/s (None in files from before it was).
EPOCH = {"epoch": int, "train_loss": NUMBER, "train_acc": NUMBER, "test_loss": NUMBER,
         "test_acc": NUMBER, "epoch_seconds": NUMBER, "train_images_per_second": NUMBER,
         "peak_gpu_memory_gib": (*NUMBER, NONE), "warmup_seconds": (*NUMBER, NONE)}
RESULTS = {"script": str, "run_name": str, "status": str, "config": dict, "epochs": list}
STATUSES = ("running", "finished", "interrupted", "failed")


def record(fields, **values):
    """`values` as a dict, if it has exactly the keys of `fields`: a writer that adds or
    forgets one fails at once, not in a reader months later."""
    if values.keys() != fields.keys():
        differ = sorted(values.keys() ^ fields.keys())
        raise KeyError(f"fields {differ} differ from the schema")
    return values


def problem(mapping, fields, where):
    """Why `mapping` does not hold `fields` with their types, or None."""
    if not isinstance(mapping, dict):
        return f"{where} is not an object"
    for key, kinds in fields.items():
        if key not in mapping:
            return f"{where} has no {key!r}"
        value = mapping[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # bool is an int, but true/false in a numeric field means a malformed file
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            names = " or ".join("null" if k is NONE else k.__name__ for k in kinds)
            return f"{where} {key!r} is {str(value)[:40]!r}, expected {names}"
    return None
