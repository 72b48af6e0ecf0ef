"""The command line every script shares: typed configs from YAML and `--key=value`, errors that name
what is wrong without a traceback, and progress bars that read well in a log file.

  cfg = load_config(Config, sys.argv[1:])  # dataclass defaults < CONFIG.yaml < --key=value
  run_cli(main)                            # a UserError prints one line; other errors, a traceback
  for item in progress(items, desc="...")  # tqdm on a terminal, a whole line per interval off one

It imports neither torch nor the model, so data writers and readers can use it.
"""
import contextlib
import dataclasses
import difflib
import inspect
import io
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import textwrap
import tokenize
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
    line. An unknown key (with the closest known one), a value of the wrong type, a number outside
    the class's RANGES or a word outside its CHOICES is an error that names the key and where the
    value came from. `-h` / `--help` prints every key, grouped, and exits. `aliases` maps extra flag
    spellings to keys (e.g. {"data-root": "data_root"}); `-` and `_` are interchangeable in flags.
    """
    if "-h" in argv or "--help" in argv:
        try:
            print(config_help(cls), end="")
        except BrokenPipeError:  # `--help | head`: the rest is not wanted
            sys.stdout = None
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    path, overrides = _parse_command_line(argv, default_path, aliases or {})
    values, source = {}, {}
    for key, value in _read_yaml(path).items():
        values[key] = _coerce(value, hints[_known(key, cls, path)], key, path)
        source[key] = path
    for key, value in overrides:
        values[key] = _coerce(value, hints[_known(key, cls, "command line", "--")], key,
                              "command line")
        source[key] = "command line"
    config = cls(**values)
    _check_values(config, source)
    if hasattr(config, "check"):  # what the class itself checks (a model preset, a pairing)
        with user_input():
            config.check()
    return config


def _parse_command_line(argv, default_path, aliases):
    """-> (the YAML path or default_path, [(key, value)] in order; of a key given twice, the last
    one wins). A key given twice in a row is refused: it is what the shell makes of an unquoted
    `--train_data=/d/{0..2}.tar` (three words after its brace expansion), and the last of them
    alone would be trained on."""
    path, overrides, i = default_path, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"command line: --{key} needs a value (--{key}=VALUE)")
                value, i = argv[i + 1], i + 1
            key = aliases.get(key, key).replace("-", "_")
            if overrides and overrides[-1][0] == key:
                raise UserError(
                    f"command line: --{key} is given twice in a row ({overrides[-1][1]!r}, "
                    f"{value!r}), as the shell writes an unquoted value with braces: quote it, "
                    f"e.g. --{key}='/path/{{00000..00099}}.tar'")
            overrides.append((key, value))
        elif path is default_path and arg.endswith((".yaml", ".yml")):
            path = arg
        else:
            raise UserError(f"command line: unexpected argument {arg!r} "
                            "(expected CONFIG.yaml and --key=value; --help lists the keys)")
        i += 1
    return path, overrides


def _read_yaml(path):
    """The config file's {key: value}; an error naming the file and the place it breaks."""
    if path is None:
        return {}
    if not os.path.exists(path):
        raise UserFileNotFound(f"config file {path} does not exist")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where}: {problem}. Each line of a config is "
                        "`key: value`") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of key: value at the top level")
    return loaded


def _known(key, cls, source, prefix=""):
    """`key` if cls has such a field; else an error naming the closest known key."""
    names = [f.name for f in dataclasses.fields(cls)]
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}?" if close else "--help lists every key"
    raise UserError(f"{source}: unknown key {prefix}{key}; {hint}")


def _check_values(config, source):
    """Numbers inside the class's RANGES {key: (lowest, highest)} (None: unbounded) and words among
    its CHOICES {key: (allowed, ...)}; the error names the key, where the value came from and what
    it may be."""
    for key, (low, high) in getattr(config, "RANGES", {}).items():
        value = getattr(config, key)
        if value is None or (low is None or value >= low) and (high is None or value <= high):
            continue
        allowed = (f"between {low} and {high}" if low is not None and high is not None
                   else f">= {low}" if low is not None else f"<= {high}")
        raise UserError(f"{source.get(key, 'the default')}: {key} must be {allowed}, "
                        f"got {value!r}")
    for key, allowed in getattr(config, "CHOICES", {}).items():
        if getattr(config, key) not in allowed:
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            raise UserError(f"{source.get(key, 'the default')}: {key} must be one of {shown}, "
                            f"got {getattr(config, key)!r}")


def config_help(cls):
    """`--help` of a script whose settings are dataclass `cls`: how to set them, then every key with
    its type, default and the comment written beside it in the class, grouped by the class's
    `# --- group ---` lines. Read from the class itself, so the two cannot drift."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "SCRIPT.py"
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")
    lines = [f"usage: python {script} [CONFIG.yaml] [--key=value ...]", "", doc[0], "",
             "\n".join(doc[1:2]), "",
             *textwrap.wrap("Each key's value comes from its default (below), then CONFIG.yaml "
                            "(`key: value` lines), then --key=value or --key value on the command "
                            "line, which wins (- and _ alike in keys). configs/ holds one YAML per "
                            "run, opening with its command, hardware, time and result.", 100), ""]
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for group, keys in _documented_fields(cls):
        lines.append(f"{group}:" if group else "settings:")
        for key, comment in keys:
            kind = getattr(hints[key], "__name__", str(hints[key]).replace("typing.", ""))
            shown = repr(defaults[key]) if isinstance(defaults[key], str) else defaults[key]
            lines.append(f"  --{key}  ({kind}, default {shown})")
            lines += [f"      {part}" for part in textwrap.wrap(comment, 94)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _documented_fields(cls):
    """[(group, [(field, comment)])] in the order of the class's source: a `# --- name ---` line
    opens a group; a field's comment is its trailing one, after the comment lines just above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    groups, above = [("", [])], []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        header = re.fullmatch(r"#\s*-+\s*(.*?)\s*-+", stripped)
        if header:
            groups.append((header.group(1), []))
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        field = re.match(r"(\w+)\s*:", stripped)
        if field and field.group(1) in names:
            comments = [tok.string.lstrip("#").strip() for tok in _tokens(stripped)
                        if tok.type == tokenize.COMMENT]
            groups[-1][1].append((field.group(1), " ".join(above + comments)))
        above = []
    return [(group, keys) for group, keys in groups if keys]


def _tokens(line):
    try:
        return list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError):
        return []


def writable_folder(folder, setting):
    """`folder`, made if missing, once a file could be written in it; else an error naming the
    setting to change. Checked before any work, so a long run does not fail at its first save."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{setting}: cannot write in {folder} ({e.strerror or e}); choose a "
                        f"writable folder with {setting}") from None
    return folder


def run_cli(main):
    """A script's entry point: main(sys.argv[1:]). A UserError (a mistake of the user's that the
    kit detected: a missing file, a bad key or value, a resume that does not fit) prints one line
    naming it instead of a traceback; PI_TRACEBACK=1 shows the traceback. Any other error keeps
    its traceback.

    However the script ends, its loader worker processes end with it. They ignore SIGTERM (the
    loop, not a scheduler's signal to every process, decides when to stop: training.StopSignal),
    so after an error the interpreter's own exit would wait on them for ever; they are killed
    instead, and the error ends the run within seconds with a non-zero exit (under torchrun,
    the launcher then stops the other ranks)."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if os.environ.get("PI_TRACEBACK"):
            raise
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    finally:
        children = multiprocessing.active_children()
        if children and hasattr(signal, "SIGCHLD"):  # torch's handler would report the kill
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()


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
