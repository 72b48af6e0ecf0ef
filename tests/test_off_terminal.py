"""The scripts as users run them: the trainer's ckpt.pt in open_clip, and logs off a terminal.

Proves:
- open_clip 3.3.0 loads the ckpt.pt that `train_clip.py` writes, as it is, through its own public
  call `open_clip.create_model_and_transforms(name, pretrained=path)` (a tiny architecture
  registered with open_clip.add_model_config, the way a user adds a custom size), and its features
  equal the kit's on the same inputs; with the other activation's config the kit's own loader
  refuses the file by name (--init of a QuickGELU model from a GELU checkpoint).
- With stderr going to a file (a scheduler's log), train_clip.py and evaluate.py write whole lines:
  no carriage return anywhere, and the progress lines still say how far each stage got.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints as kit_checkpoints  # noqa: E402
import data  # noqa: E402
import model as kit_model  # noqa: E402
import train_clip  # noqa: E402
from world.make_data import write_benchmark_task, write_shards  # noqa: E402
from tests.test_evaluate import register_open_clip_config  # noqa: E402
from tests.stage2.test_formats import photo_jpeg  # noqa: E402

COFFEE = skdata.coffee()

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short train_clip.py run (4 steps of the tiny preset) with stdout and stderr to files."""
    root = tmp_path_factory.mktemp("run")
    write_shards(root / "shards",
                 ((f"{i:05d}", {"jpg": photo_jpeg(i, photo=COFFEE), "txt": f"a cup of coffee {i}"})
                  for i in range(32)), 16)
    command = [sys.executable, str(ROOT / "train_clip.py"),
               str(ROOT / "configs" / "clip_tiny.yaml"),
               f"--train_data={root}/shards/{{00000..00001}}.tar", f"--out_dir={root / 'out'}",
               "--max_steps=4", "--batch_size=8", "--save_every=4", "--log_every=2", "--workers=0",
               "--shuffle_buffer=8"]
    with open(root / "stderr.txt", "w") as err, open(root / "stdout.txt", "w") as out:
        subprocess.run(command, env=ENV, stdout=out, stderr=err, check=True, timeout=300)
    return root


def test_open_clip_loads_the_trainers_checkpoint_as_it_is(run, tmp_path):
    import open_clip

    ckpt = run / "out" / "ckpt.pt"
    ours = kit_checkpoints.load_checkpoint(ckpt)
    register_open_clip_config(ours.config, tmp_path, "pi-tiny")
    theirs, _, preprocess = open_clip.create_model_and_transforms("pi-tiny", pretrained=str(ckpt))
    theirs.eval()
    images = torch.stack([preprocess(Image.fromarray(skdata.chelsea())),
                          preprocess(Image.fromarray(skdata.astronaut()))])
    tokens = data.tokenize(["a photo of a cat", "an astronaut"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images),
                                   theirs.encode_image(images, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens),
                                   theirs.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)
    with pytest.raises(ValueError,
                       match="ckpt.pt records the GELU activation .* but QuickGELU was asked for"):
        train_clip.load_init(kit_model.create_model("tiny", quickgelu=True), ckpt,
                             include_text=False)


def test_logs_off_a_terminal_hold_whole_lines(run, tmp_path):
    log = (run / "stderr.txt").read_text()
    assert "\r" not in log
    assert any(line.startswith("train: 100%") and "4/4" in line
               for line in log.splitlines()), log[-2000:]

    digits = [(Image.fromarray(skdata.camera()).resize((32, 32)).rotate(15 * i), i % 3)
              for i in range(40)]
    write_benchmark_task(tmp_path / "wds_three", digits, ["zero", "one", "two"],
                         ["a photo of {c}."], per_shard=20)
    command = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(run / "out" / "ckpt.pt"),
               "--suite", "three", "--data-root", str(tmp_path), "--batch-size", "8",
               "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "results.json")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True,
                            timeout=300)
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert any(line.startswith("wds_three: 100%") and "5/5" in line
               for line in result.stderr.splitlines()), result.stderr
    assert (tmp_path / "results.png").exists()
