"""The demo's steps, shared by demo.py and the follow-up studies (world/studies.py): its two sizes,
running one command unless its output says it finished, and the untrained tower it is compared with.
"""
import dataclasses
import json
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from model import create_model
from stage1 import nights, objective
from world.scenes import FORK_SAFE

ROOT = Path(__file__).resolve().parents[1]  # the kit: where the commands are run from

# The two demo sizes. `full` is tuned so that stage 1 clearly learns (val 2AFC well above 0.5, while
# pixel distance scores 0.55 on this world) and stage 2 is in the few-data regime where an
# initialisation can matter; `quick` only proves the pipeline end to end.
PLANS = {
    "full": dict(
        data=dict(size=64, triplets=6000, pairs=3000, per_class=40, retrieval=200, probe=200),
        stage1=[], stage2=[], posthoc=[],  # the config files hold the full settings
        linear_probe="demo",  # every demo task with a train split
    ),
    "quick": dict(
        data=dict(size=32, triplets=300, pairs=256, per_class=6, retrieval=30, probe=40),
        stage1=["--epochs", "2", "--batch_size", "32", "--warmup_steps", "2"],
        stage2=["--epochs", "1", "--max_steps", "6", "--batch_size", "32", "--warmup_steps", "2",
                "--eval_every", "6", "--save_every", "3"],
        posthoc=["--epochs", "1", "--batch_size", "32"],
        linear_probe="demo_colour,demo_size",
    ),
}


def run_step(title, command, done_file):
    """Run one script as a process of its own unless its output says it already finished.
    Finished means that `done_file` exists, not that the script exited 0: a trainer stopped by
    SIGTERM saves and exits 0 before it has finished."""
    if done_file.exists():
        print(f"== {title}: finished earlier ({done_file}), reused")
        return 0.0
    print(f"== {title}\n   {' '.join(command)}", flush=True)
    start = time.time()
    returncode = run_script(command)
    if returncode != 0:
        raise SystemExit(f"demo: {title} failed (exit code {returncode}); command:\n"
                         f"  {' '.join(command)}\nRerun demo.py to resume where it stopped.")
    if not done_file.exists():  # exit code 0, yet stopped early (SIGTERM)
        raise SystemExit(f"demo: {title} stopped before it finished ({done_file} was not written); "
                         "rerun demo.py to resume where it stopped.")
    return time.time() - start


# A step is `python SCRIPT ARGS`, run in a process forked from a server that imported the libraries
# once (multiprocessing's forkserver, before it computed anything, so no thread pool is inherited):
# each step then starts in a fraction of a second instead of ~3 s of importing torch and
# torchvision, 8 steps a seed. The script runs as __main__ with its argv, as `python` runs it.
PRELOAD = ["torch", "torchvision", "numpy", "PIL.Image", "yaml", "tqdm", "regex", "ftfy",
           "pyarrow.parquet", "matplotlib"]
_steps_cpu = [0.0]  # CPU seconds of the steps run from the server (not this process's children)
# Off Linux each step is a plain `python` subprocess: the same run, ~3 s slower a step.
STEP_SERVER = FORK_SAFE


def start_step_server():
    """Start the server now: its imports then overlap what the caller does next."""
    if STEP_SERVER:
        _server()
        multiprocessing.forkserver.ensure_running()


def _server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_script(command):
    """`python *command` in ROOT -> its exit code; a script from the server, anything else
    (`python -c ...`, or any step off Linux) as a plain subprocess."""
    if not (STEP_SERVER and command[0].endswith(".py")):
        return subprocess.run([sys.executable, *command], cwd=ROOT).returncode
    context = _server()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_as_main, args=(command, send))
    process.start()
    send.close()
    process.join()
    try:
        _steps_cpu[0] += receive.recv()
    except EOFError:  # the process died before it could say
        pass
    return process.exitcode


def _run_as_main(command, report):
    os.chdir(ROOT)
    sys.argv = list(command)
    sys.path[0] = str(ROOT)  # as `python script.py` puts the script's folder first
    try:
        runpy.run_path(str(ROOT / command[0]), run_name="__main__")
    finally:
        report.send(_own_cpu_seconds())


def _own_cpu_seconds():
    return sum(getattr(resource.getrusage(who), f)
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def cpu_seconds():
    """CPU seconds of this process, its children and every step it ran."""
    return _own_cpu_seconds() + _steps_cpu[0]


def shard_spec(shard_dir):
    """{00000..000NN}.tar brace spec of the shards make_data wrote (names from sizes.json)."""
    names = sorted(json.loads((shard_dir / "sizes.json").read_text()))
    first, last = Path(names[0]).stem, Path(names[-1]).stem
    return str(shard_dir / (f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"))


def untrained(seed, nights_root, folder):
    """The stage-1 model before any training (same preset, same seed), saved as a checkpoint for
    the probes, and its 2AFC: the floor that the shuffled-vote control should stay near. A random
    network is not at 0.5: like pixel distance, it already sees some of what the observers see."""
    if (folder / "ckpt.pt").exists() and (folder.parent / "untrained_2afc.json").exists():
        return
    preset = yaml.safe_load((ROOT / "configs" / "demo_nights.yaml").read_text())["model"]
    torch.manual_seed(seed)
    model = create_model(preset)
    test = nights.NightsDataset(nights_root, "test", model.config.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
               folder / "ckpt.pt")
    (folder.parent / "untrained_2afc.json").write_text(
        json.dumps({"test": objective.two_afc_by_triplet(model, test, "cpu")}) + "\n")


def drop_if_stale(result, checkpoints):
    """Delete `result` if a checkpoint it was computed from is newer (a run changed since)."""
    newest = max(c.stat().st_mtime for c in checkpoints)
    if result.exists() and result.stat().st_mtime < newest:
        result.unlink()
