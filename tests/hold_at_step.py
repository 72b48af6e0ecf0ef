"""Run a trainer's command line, held at the start of one optimiser step until the test lets it
go.

  python tests/hold_at_step.py STEP READY_FD GO_FD train_clip.py CONFIG --key=value ...

The trainer (train_clip.py or train_triplet.py, imported and run as its `__main__` runs it:
cli.run_cli(main) with the same arguments) calls its module's train_step once per optimiser step.
Before the STEP-th call of this process, everything of the steps before is done (their checkpoints
written, their log lines flushed); the helper writes one byte to READY_FD and blocks reading GO_FD.
The test reads READY_FD (a pipe: no polling), then kills or signals the process at a known step, and
for a signal writes to GO_FD so that the step runs and the trainer reaches the step boundary where
it stops. A signal that arrives while the helper is blocked runs its handler and the read resumes
(PEP 475). Tests call `start`, which does all of this and returns once the trainer is held.
"""
import importlib
import os
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(script, args, hold, timeout=180, **popen_kwargs):
    """Popen `python tests/hold_at_step.py hold ... script *args` in a session of its own (killpg
    reaches its loader workers) and wait until it is held before step `hold` -> (process, go): write
    a byte to `go` (a file descriptor) to let the step run; close it when done."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    process = subprocess.Popen([sys.executable, __file__, str(hold), str(ready_w), str(go_r),
                                script, *args],
                               pass_fds=(ready_w, go_r), start_new_session=True, **popen_kwargs)
    os.close(ready_w)
    os.close(go_r)
    readable, _, _ = select.select([ready_r], [], [], timeout)
    held = readable and os.read(ready_r, 1) == b"R"
    os.close(ready_r)
    if not held:
        process.kill()
        out, err = process.communicate()
        os.close(go_w)
        raise AssertionError(f"{script} never reached step {hold} "
                             f"(exit {process.returncode}): {err}")
    return process, go_w


def main():
    hold, ready, go, script, *args = sys.argv[1:]
    hold, ready, go = int(hold), int(ready), int(go)
    from cli import run_cli

    trainer = importlib.import_module(Path(script).stem)
    real_step, calls = trainer.train_step, 0

    def held_step(*step_args, **step_kwargs):
        nonlocal calls
        calls += 1
        if calls == hold:
            os.write(ready, b"R")
            os.read(go, 1)
        return real_step(*step_args, **step_kwargs)

    trainer.train_step = held_step
    sys.argv = [str(ROOT / script), *args]
    run_cli(trainer.main)


if __name__ == "__main__":
    main()
