"""Progress bars that read well both on a terminal and in a log file.

On a terminal, `progress(...)` is a plain tqdm bar redrawn in place. Off a terminal (a SLURM log,
`2> log.txt`, a pipe), tqdm's in-place redraws would write a partial line with a carriage return
at every refresh; instead each refresh becomes one whole line, at most one per LOG_INTERVAL seconds,
plus the first and the last: the same information (count, total, rate, elapsed) a line per stage
or interval.

Its own file because every script uses it, the data side included: make_data.py must not import
common.py (that pulls torch.distributed and yaml into data writing), and this needs only tqdm.
"""
import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between lines off a terminal


class _Lines:
    """A file for tqdm that turns each in-place redraw ('\\r' + bar + padding) into one line and drops
    the cursor moves of nested bars ('\\n', ESC[A), so a log holds whole lines only."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\x1b[A", "").strip("\r\n").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, stream=None, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal; off one, a line per LOG_INTERVAL and one at the end of
    the stage (leave=True, so nested bars report too). `stream`: where to write (default stderr)."""
    stream = stream or sys.stderr
    if kwargs.get("disable") or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, leave=True,
                  dynamic_ncols=False, ncols=100)
    return tqdm(iterable, **kwargs)
