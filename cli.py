"""The command line every script shares: typed configs from YAML and `--key=value`, errors that name
what is wrong without a traceback, and progress bars that read well in a log file.

  cfg = load_config(Config, sys.argv[1:])  # dataclass defaults < CONFIG.yaml < --key=value
  run_cli(main)                            # a UserError prints one line; other errors, a traceback
  for item in progress(items, desc="...")  # tqdm on a terminal, a whole line per interval off one

It imports neither torch nor the model, so data writers and readers can use it.
"""
import contextlib
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import yaml
from tqdm import tqdm

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class UserError(ValueError):
    """A mistake of the user's that the kit itself detected (a config key or value, missing data, a
    resume that would splice two runs): run_cli prints its message as one line, without a traceback.
    Anything else, including a ValueError raised inside torch or numpy, keeps its traceback.
    (A ValueError, so that code catching the old ValueErrors keeps working.)"""


class UserFileNotFound(UserError, FileNotFoundError):
    """A file the user named (a config, data, a checkpoint) does not exist."""


@contextlib.contextmanager
def user_input():
    """Around a call into model.py or data.py that reads what the user named (a preset, a
    checkpoint, a data folder): its FileNotFoundError / ValueError is the user's mistake.
    model.py imports nothing of the kit, so it cannot raise UserError itself; the caller, which
    knows the input came from the user, converts. The original exception stays chained
    (PI_TRACEBACK=1 shows it)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserFileNotFound(str(e)) from e
    except ValueError as e:
        raise UserError(str(e)) from e


def _coerce(value, annotation, key, source):
    """Check / convert one value to the field's type; strings (from the command line) are parsed."""
    optional = (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                and type(None) in typing.get_args(annotation))
    base = (next(a for a in typing.get_args(annotation) if a is not type(None)) if optional
            else annotation)
    if value is None or (optional and isinstance(value, str)
                         and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{source}: {key} must be of type {base.__name__}, got nothing")
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
        raise UserError(f"{source}: {key} must be of type {base.__name__}, got {value!r}") from None
    raise TypeError(f"config field {key} has an unsupported type {annotation}")


def load_config(cls, argv, default_path=None, aliases=None):
    """Build dataclass `cls` from `[CONFIG.yaml] [--key=value | --key value ...]`.

    Values come, in increasing priority, from the dataclass defaults, the YAML file, the command
    line. An unknown key or a value of the wrong type is an error that names the key and where it
    came from. `aliases` maps extra flag spellings to keys (e.g. {"data-root": "data_root"}); `-`
    and `_` are interchangeable in flags anyway.
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
                    raise UserError(f"command line: --{key} needs a value")
                value, i = argv[i + 1], i + 1
            key = (aliases or {}).get(key, key).replace("-", "_")
            overrides.append((key, value))
        elif path is default_path and arg.endswith((".yaml", ".yml")):
            path = arg
        else:
            raise UserError(f"command line: unexpected argument {arg!r} "
                            "(expected CONFIG.yaml and --key=value)")
        i += 1
    values = {}
    if path is not None:
        if not os.path.exists(path):
            raise UserFileNotFound(f"config file {path} does not exist")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in loaded.items():
            if key not in names:
                raise UserError(f"{path}: unknown key {key!r}; "
                                f"known keys: {', '.join(sorted(names))}")
            values[key] = _coerce(value, hints[key], key, path)
    for key, value in overrides:
        if key not in names:
            raise UserError(f"command line: unknown key --{key}; "
                            f"known keys: {', '.join(sorted(names))}")
        values[key] = _coerce(value, hints[key], key, "command line")
    return cls(**values)


def run_cli(main):
    """A script's entry point: main(sys.argv[1:]). A UserError (a mistake of the user's that the
    kit detected: a missing file, a bad key or value, a resume that does not fit) prints one line
    naming it instead of a traceback; PI_TRACEBACK=1 shows the traceback. Any other error keeps
    its traceback."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if os.environ.get("PI_TRACEBACK"):
            raise
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")


# --------------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------------
# On a terminal, `progress(...)` is a plain tqdm bar redrawn in place. Off a terminal (a SLURM
# log, `2> log.txt`, a pipe), tqdm's in-place redraws would write a partial line with a carriage
# return at every refresh; instead each refresh becomes one whole line, at most one per
# LOG_INTERVAL seconds.

LOG_INTERVAL = 30.0  # seconds between lines off a terminal


class _Lines:
    """A file for tqdm that turns each in-place redraw ('\\r' + bar + padding) into one line and
    drops the cursor moves of nested bars ('\\n', ESC[A), so a log holds whole lines only."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\x1b[A", "").strip("\r\n").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, stream=None, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal; off one, a line per LOG_INTERVAL and one at the end
    of the stage (leave=True, so nested bars report too).

    `stream`: where to write (default stderr)."""
    stream = stream or sys.stderr
    if kwargs.get("disable") or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL,
                  leave=True, dynamic_ncols=False, ncols=100)
    return tqdm(iterable, **kwargs)
