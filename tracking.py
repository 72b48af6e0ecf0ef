"""Experiment tracking beside metrics.jsonl: TensorBoard event files and / or a W&B run.

  log = open_log(out_dir, is_main, "tensorboard,wandb", config)   # a common.MetricsLog that also sends
  log.write({"step": 50, "loss": 4.1, ...}, "a readable line")     # every number of a record with a "step"
  log.close()

The same scalars as metrics.jsonl, under the same names, at the record's step (the run header, which
has no step, goes to W&B as the run's config). Each library is imported only when asked for, and only
once something is written (a finished run rerun creates no W&B run).
  - tensorboard: torch.utils.tensorboard's SummaryWriter into out_dir/tensorboard (`tensorboard --logdir
    runs`); needs `pip install tensorboard`.
  - wandb: a run in out_dir/wandb, OFFLINE unless WANDB_MODE says otherwise (nothing leaves the machine
    by default; `wandb sync out_dir/wandb/offline-run-*` uploads later, or set WANDB_MODE=online); the
    run id is kept in out_dir/wandb_id.txt, so a resumed run continues the same W&B run. The PI authors
    log to W&B (github cheesepuff90/Brain_Initialization config/trainingconfig/*.json, "wandb").
    WANDB_PROJECT names the project (default "perceptual-init"); needs `pip install wandb`.

Why a file of its own: two optional libraries and their quirks stay out of the trainer and common.py.
"""
import os
import secrets
from pathlib import Path

import common

KINDS = ("tensorboard", "wandb")


def check(log_to):
    """-> the destinations asked for; an unknown one is an error naming it."""
    kinds = [k.strip() for k in log_to.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise common.UserError(f"log_to: unknown {', '.join(unknown)}; expected a comma-separated choice of {', '.join(KINDS)}")
    return kinds


def open_log(out_dir, enabled, log_to, config):
    """common.MetricsLog(out_dir, enabled) that also writes to the trackers in `log_to`."""
    return TrackedLog(out_dir, enabled, check(log_to), config)


class TrackedLog(common.MetricsLog):
    def __init__(self, out_dir, enabled, kinds, config):
        super().__init__(out_dir, enabled)
        self.out_dir, self.kinds, self.config = Path(out_dir), kinds if enabled else [], config
        self.tensorboard = self.wandb = None

    def _open(self):
        if "tensorboard" in self.kinds and self.tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise common.UserError(f"log_to=tensorboard needs the tensorboard package: pip install tensorboard ({e})") from e
            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))
        if "wandb" in self.kinds and self.wandb is None:
            try:
                import wandb
            except ImportError as e:
                raise common.UserError(f"log_to=wandb needs the wandb package: pip install wandb ({e})") from e
            id_file = self.out_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4))  # W&B ids: a few random letters and digits
            self.wandb = wandb.init(dir=str(self.out_dir), id=id_file.read_text().strip(), resume="allow",
                                    project=os.environ.get("WANDB_PROJECT", "perceptual-init"), name=self.out_dir.name,
                                    config=self.config, mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, record, line=None):
        super().write(record, line)
        if not self.kinds or "step" not in record:
            return
        self._open()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
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
