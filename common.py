"""The plumbing both trainers share, so that neither copies it nor imports the other.

  config        typed dataclass configs from YAML + `--key=value` overrides, errors that name the key
  distributed   single process by default, DDP when torchrun sets RANK
  precision     one autocast path (bf16 / fp16 / fp32) and the GradScaler that fp16 alone needs
  optimiser     AdamW parameter groups with CLIP's weight-decay exclusions, warmup + cosine schedule
  checkpoints   atomic saves and RNG state capture for exact resume
  logging       run header (code version, libraries, hardware) and metrics.jsonl

Why a third shared file: model.py imports nothing of the kit and data.py holds only data helpers
(the house rules), yet the two trainers share ~200 lines of this; copying it would let them drift.
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(value, annotation, key, source):
    """Check / convert one value to the field's type; strings (from the command line) are parsed."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{source}: {key} must be of type {base.__name__}, got nothing")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ValueError:
        raise ValueError(f"{source}: {key} must be of type {base.__name__}, got {value!r}") from None
    raise TypeError(f"config field {key} has an unsupported type {annotation}")


def load_config(cls, argv, default_path=None, aliases=None):
    """Build dataclass `cls` from `[CONFIG.yaml] [--key=value | --key value ...]`.

    Values come, in increasing priority, from the dataclass defaults, the YAML file, the command line.
    An unknown key or a value of the wrong type is an error that names the key and where it came from.
    `aliases` maps extra flag spellings to keys (e.g. {"data-root": "data_root"}); `-` and `_` are
    interchangeable in flags anyway.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    path, overrides, i = default_path, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"command line: --{key} needs a value")
                value, i = argv[i + 1], i + 1
            key = (aliases or {}).get(key, key).replace("-", "_")
            overrides.append((key, value))
        elif path is default_path and arg.endswith((".yaml", ".yml")):
            path = arg
        else:
            raise ValueError(f"command line: unexpected argument {arg!r} (expected CONFIG.yaml and --key=value)")
        i += 1
    values = {}
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in loaded.items():
            if key not in names:
                raise ValueError(f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
            values[key] = _coerce(value, hints[key], key, path)
    for key, value in overrides:
        if key not in names:
            raise ValueError(f"command line: unknown key --{key}; known keys: {', '.join(sorted(names))}")
        values[key] = _coerce(value, hints[key], key, "command line")
    return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def setup_distributed(device=""):
    """One process on `device` (cuda when present, if empty), or DDP when torchrun set RANK:
    nccl on GPUs, gloo on the CPU. No process group is made for a single process."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA GPU is visible; use --device=cpu")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Dist(rank, world_size, local_rank, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Dist(rank, world_size, local_rank, torch.device("cpu"))


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------


def default_precision(device):
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device, precision):
    """The one mixed-precision path: autocast for bf16 / fp16, nothing for fp32."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device, precision):
    """fp16 needs loss scaling against underflow; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


# ---------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------------

_NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale")


def param_groups(model, weight_decay):
    """AdamW groups: decay on weight matrices only. Biases, LayerNorm gains, embeddings of position
    and the class token and logit_scale are not decayed (open_clip; the PI fork's stage-1 recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(n in name for n in _NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step, base_lr, warmup_steps, total_steps):
    """Linear warmup to base_lr over warmup_steps, then cosine to 0 at total_steps (open_clip)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


# ---------------------------------------------------------------------------------------------------
# Checkpoints and randomness
# ---------------------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG the loop draws from, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write never leaves a
    truncated checkpoint where the last good one was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_training_state(path):
    """A checkpoint written by a trainer, loaded safely (tensors and plain Python values only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot resume from {path}: {e}. Move it away to start afresh.") from e


# ---------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------


def run_header(config):
    """What produced a run: config, code version, libraries, hardware (modded-nanogpt's habit)."""
    root = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:
            return ""

    return {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
    }


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (main process only) and prints a
    readable line. On other ranks it does nothing, so the loop needs no `if rank == 0` around it."""

    def __init__(self, out_dir, enabled=True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record, line=None):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            tqdm.write(line)  # keeps progress bars intact


def run_cli(main):
    """A script's entry point: main(sys.argv[1:]). A mistake of the user's (a missing file, a bad key
    or value) prints one line naming it instead of a traceback; PI_TRACEBACK=1 shows the traceback."""
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("PI_TRACEBACK"):
            raise
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
