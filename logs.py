"""What a training run writes down: its header (config, code version, libraries, hardware), one
JSON line per interval in out_dir/metrics.jsonl with a readable line beside it, and the same numbers
to TensorBoard and / or W&B when asked.

  log = open_log(out_dir, is_main, "tensorboard,wandb", config)  # "" for metrics.jsonl alone
  log.write({"step": 50, "loss": 4.1, ...}, "a readable line")    # each number of a stepped record
  log.close()

TensorBoard and W&B get the same scalars as metrics.jsonl, under the same names, at the record's
step (the run header, which has no step, goes to W&B as the run's config). Each library is imported
only when asked for, and only once something is written (a finished run rerun creates no W&B run).
  - tensorboard: torch.utils.tensorboard's SummaryWriter into out_dir/tensorboard
    (`tensorboard --logdir runs`); needs `pip install tensorboard`.
  - wandb: a run in out_dir/wandb, OFFLINE unless WANDB_MODE says otherwise (nothing leaves the
    machine by default; `wandb sync out_dir/wandb/offline-run-*` uploads later, or set
    WANDB_MODE=online); the run id is kept in out_dir/wandb_id.txt, so a resumed run continues the
    same W&B run. The PI authors log to W&B (github cheesepuff90/Brain_Initialization
    config/trainingconfig/*.json, "wandb"). WANDB_PROJECT names the project (default
    "perceptual-init"); needs `pip install wandb`.
"""
import dataclasses
import datetime
import json
import os
import platform
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UserError

def run_header(config):
    """What produced a run: config, code version, libraries, hardware (modded-nanogpt's habit)."""
    root = Path(__file__).resolve().parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=5).stdout.strip()
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
        "hardware": (torch.cuda.get_device_name() if torch.cuda.is_available()
                     else f"CPU ({platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads)"),
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



KINDS = ("tensorboard", "wandb")


def check(log_to):
    """-> the destinations asked for; an unknown one is an error naming it."""
    kinds = [k.strip() for k in log_to.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"log_to: unknown {', '.join(unknown)}; "
                        f"expected a comma-separated choice of {', '.join(KINDS)}")
    return kinds


def open_log(out_dir, enabled, log_to, config):
    """MetricsLog(out_dir, enabled) that also writes to the trackers in `log_to`."""
    return TrackedLog(out_dir, enabled, check(log_to), config)


class TrackedLog(MetricsLog):
    def __init__(self, out_dir, enabled, kinds, config):
        super().__init__(out_dir, enabled)
        self.out_dir, self.kinds, self.config = Path(out_dir), kinds if enabled else [], config
        self.tensorboard = self.wandb = None

    def _open(self):
        if "tensorboard" in self.kinds and self.tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("log_to=tensorboard needs the tensorboard package: "
                                f"pip install tensorboard ({e})") from e
            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))
        if "wandb" in self.kinds and self.wandb is None:
            try:
                import wandb
            except ImportError as e:
                raise UserError("log_to=wandb needs the wandb package: "
                                f"pip install wandb ({e})") from e
            id_file = self.out_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4))  # W&B ids: a few random letters and digits
            self.wandb = wandb.init(dir=str(self.out_dir), id=id_file.read_text().strip(),
                                    resume="allow",
                                    project=os.environ.get("WANDB_PROJECT", "perceptual-init"),
                                    name=self.out_dir.name, config=self.config,
                                    mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, record, line=None):
        super().write(record, line)
        if not self.kinds or "step" not in record:
            return
        self._open()
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None
