"""Bad inputs, as users give them: each through the command line, as a user runs it.

Every one ends with a non-zero exit and one line (no traceback) that names the file, key or row at
fault and what to do, and nothing on disk is lost: a checkpoint, a data set or an output folder that
was there is there, byte for byte, after the refusal. The classes:
- settings: an unknown key (with the closest known one), a key given twice (the shell's brace
  expansion of an unquoted --train_data), a value outside its range or choices, a model size of 0
  or less, malformed YAML;
- outputs: an output folder that cannot be written, checked before any work;
- data: a resume on other or broken data (files, counts, votes), a step that would train on
  nothing, a writer asked to write over a data set, THINGS trial files with a short and a long
  line, classnames.txt shorter than the labels, an unreadable image in a stage-1 source, a text
  file named .tar;
- models: --init from a checkpoint of another size than the config's;
- processes: an exception inside a loader worker ends the run within seconds (not a hang).
`--help` is tested in tests/test_cli_help.py. Each of these runs the kit's commands end to end: the
slow tier (`-m slow`, README.md), but for the settings, which are refused at once.
"""
import dataclasses
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import create_model
from world.make_data import make_nights, write_benchmark_task, write_shards
from world.scenes import demo_pairs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
STAGE2 = ["--batch_size=8", "--accum_steps=1", "--workers=0", "--shuffle_buffer=8",
          "--log_every=1", "--save_every=2", "--epochs=1"]


def run(*argv, timeout=120, **kwargs):
    """`python ARGV...` from the kit's root, as a user runs it."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def refused(result, *needles):
    """A non-zero exit whose last line is one `script: error: ...` line holding every needle."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert ": error: " in last, result.stderr
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def fingerprint(folder):
    """{relative path: sha256} of every file under `folder` (a run's metrics.jsonl only grows: its
    content is compared as a prefix by `kept`)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.suffix != ".jsonl"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, demo_pairs(48, 0, 32), per_shard=16)
    return folder


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nights") / "nights"
    make_nights(folder, 120, 0, 32)
    return folder


# ---- settings -----------------------------------------------------------------------------------


SLOW = pytest.mark.slow  # each case starts a Python with torch (~5 s); two stay in the fast tier


@pytest.mark.parametrize("argv, needles", [
    (["--warmup-step=3"], ["unknown key --warmup_step", "did you mean --warmup_steps?"]),
    pytest.param(["--batch_size=-4"], ["batch_size must be >= 1, got -4"], marks=SLOW),
    pytest.param(["--batch_size=0"], ["batch_size must be >= 1, got 0"], marks=SLOW),
    pytest.param(["--epochs=0"], ["epochs must be >= 1, got 0"], marks=SLOW),
    pytest.param(["--lr=-1"], ["lr must be >= 0.0, got -1.0"], marks=SLOW),
    pytest.param(["--augment=mocov2"], ["augment must be one of moco, train, eval, got 'mocov2'"],
                 marks=SLOW),
    pytest.param(["--model_settings=vision_width=-3"],
                 ["vision_width=-3 must be a whole number >= 1"], marks=SLOW),
    pytest.param(["--init=/nonexistent/ckpt.pt"],
                 ["init: checkpoint /nonexistent/ckpt.pt does not exist"], marks=SLOW),
    # What an unquoted --train_data=/d/{00000..00001}.tar becomes after the shell's expansion:
    (["--train_data=/d/00000.tar", "--train_data=/d/00001.tar"],
     ["--train_data is given twice in a row", "quote it"]),
], ids=["unknown", "negative-batch", "zero-batch", "zero-epochs", "negative-lr", "choice",
        "negative-width", "missing-init", "brace-expansion"])
def test_bad_settings_are_refused_by_name_before_anything_is_written(tmp_path, shards, argv,
                                                                     needles):
    out = tmp_path / "run"
    result = run("train_clip.py", "configs/clip_tiny.yaml",
                 f"--train_data={shards}/{{00000..00002}}.tar", f"--out_dir={out}", *argv)
    refused(result, *needles)
    assert not out.exists()  # refused before the output folder was made


@pytest.mark.slow
def test_stage1_settings_name_the_key_and_where_it_came_from(tmp_path, nights):
    config = tmp_path / "mine.yaml"
    config.write_text("data_format: nite\n")
    refused(run("train_triplet.py", str(config), f"--out_dir={tmp_path / 'run'}"),
            f"{config}: data_format must be one of nights, bapps")
    refused(run("train_triplet.py", "configs/nights_tiny.yaml", "--min_votes=-1",
                f"--out_dir={tmp_path / 'run'}"), "command line: min_votes must be >= 0")


def test_malformed_yaml_is_one_line_naming_the_place(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("lr: 1.0e-3\nepochs 3\nbatch_size: 8\n")
    refused(run("train_clip.py", str(config)), f"{config}: not valid YAML at line 2",
            "`key: value`")


# ---- outputs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_output_folders_that_cannot_be_written_are_refused_before_work(tmp_path, shards):
    blocked = tmp_path / "a-file"  # a file where the folder should go: no one can write in it
    blocked.write_text("keep me\n")
    refused(run("train_clip.py", "configs/clip_tiny.yaml",
                f"--train_data={shards}/00000.tar", f"--out_dir={blocked}/run"),
            "--out_dir: cannot write in", "choose a writable folder")
    refused(run("train_triplet.py", "configs/nights_tiny.yaml", f"--out_dir={blocked}/run"),
            "--out_dir: cannot write in")
    refused(run("evaluate.py", "--ckpt", str(tmp_path / "none.pt"), "--out",
                f"{blocked}/results.json"), "--out: cannot write in")
    assert blocked.read_text() == "keep me\n"


# ---- data ---------------------------------------------------------------------------------------


def _captionless(path):
    """The same shard with its captions gone: same name, same samples, no .txt."""
    members = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".txt"):
                members.append((member, tar.extractfile(member).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


@pytest.mark.slow
def test_a_resume_on_broken_data_never_replaces_the_good_checkpoint(tmp_path, shards):
    """A run stopped cleanly at a checkpoint, then resumed on shards of the same names and counts
    whose captions are gone: refused (the files changed); allowed by the user, refused again at
    the first step that holds no usable sample. ckpt.pt is the good one throughout."""
    data = tmp_path / "data"
    data.mkdir()
    for shard in sorted(shards.iterdir()):
        (data / shard.name).write_bytes(shard.read_bytes())
    out = tmp_path / "run"
    command = ["train_clip.py", "configs/clip_tiny.yaml",
               f"--train_data={data}/{{00000..00002}}.tar", f"--out_dir={out}", *STAGE2,
               "--max_steps=4"]
    first = run(*command, "--stop_after_steps=2")  # stopped cleanly, with its checkpoint
    assert first.returncode == 0, first.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    good = fingerprint(out)
    for shard in data.glob("*.tar"):
        _captionless(shard)
    # Same names and counts (sizes.json), other bytes: the data changed.
    refused(run(*command), "was trained on other data", "differ in name or size",
            "--allow_data_change=true")
    assert fingerprint(out) == good
    last = refused(run(*command, "--allow_data_change=true"),
                   "steps 3-4: no sample of their batches could be used", "no_caption")
    assert "still holds step 2" in last and fingerprint(out) == good


@pytest.mark.slow
def test_steps_on_no_usable_sample_are_an_error_and_save_nothing(tmp_path, shards):
    data = tmp_path / "data"
    data.mkdir()
    for shard in sorted(shards.iterdir()):
        (data / shard.name).write_bytes(shard.read_bytes())
    for shard in data.glob("*.tar"):
        _captionless(shard)
    out = tmp_path / "run"
    last = refused(run("train_clip.py", "configs/clip_tiny.yaml",
                       f"--train_data={data}/{{00000..00002}}.tar", f"--out_dir={out}", *STAGE2,
                       "--max_steps=4"), "steps 1-2: no sample of their batches could be used",
                   "no_caption", "check the data")
    assert "was not written" in last and not (out / "ckpt.pt").exists()


@pytest.mark.slow
def test_a_resume_on_other_votes_is_refused(tmp_path, nights):
    data = tmp_path / "nights"
    make_nights(data, 120, 0, 32)
    out = tmp_path / "run"
    command = ["train_triplet.py", "configs/nights_tiny.yaml", f"--data_root={data}",
               f"--out_dir={out}", "--batch_size=16", "--epochs=2", "--workers=0"]
    first = run(*command, "--stop_after_steps=2")
    assert first.returncode == 0, first.stderr
    good = fingerprint(out)
    csv = data / "data.csv"  # every vote flipped: the same rows, the other answer
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    left, right = header.index("left_vote"), header.index("right_vote")
    flipped = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[left], cells[right] = cells[right], cells[left]
        flipped.append(",".join(cells))
    csv.write_text("\n".join(flipped) + "\n")
    refused(run(*command), "was trained on other data", "train_digest")
    assert fingerprint(out) == good


@pytest.mark.slow
def test_writers_never_write_over_a_data_set(tmp_path):
    folder = tmp_path / "nights"
    make_nights(folder, 30, 0, 32)
    before = fingerprint(folder)
    refused(run("-m", "world.make_data", "--nights", str(folder), "--triplets", "10"),
            f"{folder} already holds a NIGHTS data set", "--overwrite")
    assert fingerprint(folder) == before
    demo = tmp_path / "demo"
    (demo / "nights").mkdir(parents=True)
    (demo / "nights" / "mine.txt").write_text("not the writer's\n")
    refused(run("-m", "world.make_data", "--out", str(demo), "--triplets", "10"),
            "holds data not made by this writer", "--overwrite")
    assert (demo / "nights" / "mine.txt").read_text() == "not the writer's\n"


@pytest.mark.slow
def test_things_trials_of_two_and_four_indices_are_named_by_line(tmp_path):
    """A short line and a long one add up to whole trials: reshaped, they would be wrong trials."""
    root = tmp_path / "things"
    (root / "triplet_dataset").mkdir(parents=True)
    (root / "unique_id.txt").write_text("".join(f"c{i}\n" for i in range(6)))
    for name in ("trainset", "validationset", "testset1"):
        (root / "triplet_dataset" / f"{name}.txt").write_text("0 1 2\n3 4\n5 0 1 2\n")
    refused(run("train_triplet.py", "configs/nights_tiny.yaml", "--data_format=things",
                f"--data_root={root}", f"--out_dir={tmp_path / 'run'}"),
            "trainset.txt line 2: expected three 0-based concept indices, got '3 4'")


def tiny_checkpoint(path, preset="tiny"):
    model = create_model(preset)
    torch.save({"state_dict": model.state_dict(),
                "model_config": dataclasses.asdict(model.config)}, path)
    return path


@pytest.mark.slow
def test_classnames_shorter_than_the_labels_is_refused(tmp_path):
    tasks = tmp_path / "tasks"
    images = [(Image.new("RGB", (32, 32), c), i) for i, c in enumerate(["red", "blue", "green"])]
    write_benchmark_task(tasks / "wds_three", images, classnames=["red", "blue"],
                         templates=["a photo of {c}."])
    refused(run("evaluate.py", "--ckpt", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--suite",
                "three", "--data-root", str(tasks), "--workers", "0", "--out",
                str(tmp_path / "r.json")), "has label '2'", "classnames.txt lists 2 classes")


@pytest.mark.slow
def test_an_unreadable_image_names_its_row_and_the_flags_that_skip_it(tmp_path):
    root = tmp_path / "nights"
    make_nights(root, 60, 0, 32)
    image = root / "ref" / "000" / "000.png"
    image.write_bytes(image.read_bytes()[:100])  # truncated
    refused(run("train_triplet.py", "configs/nights_tiny.yaml", f"--data_root={root}",
                f"--out_dir={tmp_path / 'run'}"),
            "data.csv line 2: cannot read image", "000.png", "--skip_missing=true")
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    alignment = ["evaluate.py", "--alignment", "--ckpt", str(checkpoint), "--nights", str(root),
                 "--workers", "0", "--out", str(tmp_path / "alignment.json")]
    refused(run(*alignment), "data.csv line 2: cannot read image", "--skip-missing")
    assert run(*alignment, "--skip-missing").returncode == 0


@pytest.mark.slow
def test_a_text_file_named_tar_is_not_a_tar_archive(tmp_path):
    (tmp_path / "00000.tar").write_text("these are my notes\n")
    refused(run("train_clip.py", "configs/clip_tiny.yaml", f"--train_data={tmp_path}/00000.tar",
                f"--out_dir={tmp_path / 'run'}"), "00000.tar: not a tar archive")


# ---- models -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_init_from_a_checkpoint_of_another_size_is_refused(tmp_path, nights):
    refused(run("train_triplet.py", "configs/nights_tiny.yaml", f"--data_root={nights}",
                f"--init={tiny_checkpoint(tmp_path / 'small.pt', 'small')}",
                f"--out_dir={tmp_path / 'run'}"),
            "is a CLIP of another size than model=tiny", "Set --model")


# ---- processes ----------------------------------------------------------------------------------

PLANTED = """
import runpy, sys
sys.path.insert(0, {root!r})
from stage2 import formats

def broken(sample, context_length=77):  # runs inside the loader's worker process
    raise RuntimeError("planted failure in a loader worker")

formats.caption_tokens = broken
sys.argv = ["train_clip.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_crash_inside_a_loader_worker_ends_the_run_within_seconds(tmp_path, shards):
    """The worker's exception reaches the main process, which used to hang at exit waiting for
    its workers (they ignore SIGTERM, so that a scheduler's signal reaches the loop instead)."""
    planted = tmp_path / "planted.py"
    planted.write_text(PLANTED.format(root=str(ROOT), script=str(ROOT / "train_clip.py")))
    started = time.monotonic()
    result = run(str(planted), "configs/clip_tiny.yaml", f"--train_data={shards}/00000.tar",
                 f"--out_dir={tmp_path / 'run'}", *STAGE2, "--workers=1", timeout=90,
                 start_new_session=True)
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert "planted failure in a loader worker" in result.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_worker_processes_do_not_outlive_their_run(tmp_path, shards):
    """After the crash above, no loader worker of the run is left behind."""
    planted = tmp_path / "planted.py"
    planted.write_text(PLANTED.format(root=str(ROOT), script=str(ROOT / "train_clip.py")))
    result = run(str(planted), "configs/clip_tiny.yaml", f"--train_data={shards}/00000.tar",
                 f"--out_dir={tmp_path / 'run'}", *STAGE2, "--workers=2", timeout=90)
    assert result.returncode != 0
    leftover = subprocess.run(["pgrep", "-f", str(planted)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
