"""What the first GPU session needs of the kit, checked on the CPU (docs/gpu-session.md):
- the kit imports and builds its trainers without ftfy (a GPU image may lack it), and text cleaning
  without it fails with the way out;
- TF32 is set so that both kinds of torch getter read it back (torch 2.11 - 2.14 raise on a mix of
  the per-backend `fp32_precision` setter and the older getters that inductor's autotuning reads);
- train_clip.list_units makes the other ranks wait on the CPU (gloo) control group, not on NCCL's
  default group and its 10-minute timeout;
- bench/gpu_session.sh goes on after a failing step and records each step as a JSON line.
(tests/test_gpu_bench.py runs bench/gpu_bench.py --dry-run; .ci/compat_stack.sh runs it and a few
training steps under the GPU image's torch 2.11 / torchvision 0.26 / numpy 2.5 without ftfy.)
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training  # noqa: E402
import train_clip  # noqa: E402

WITHOUT_FTFY = """
import sys
sys.modules["ftfy"] = None  # import ftfy now raises ImportError, as on a machine without it
sys.path[:0] = [{root!r}, {bench!r}]
import checkpoints, cli, data, demo, evaluate, logs, model, train_clip, train_triplet, training, \
gpu_bench
from stage1 import nights, objective, other_sources, triplets
from stage2 import augment, contrastive, formats, held_out, shards
from analysis import alignment, curves, probes, zero_shot
try:
    data.tokenize(["a photo"])
except ImportError as e:
    print(e)
"""


def test_the_kit_imports_without_ftfy_and_says_what_to_do_when_text_needs_it():
    code = WITHOUT_FTFY.format(root=str(ROOT), bench=str(ROOT / "bench"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ftfy" in result.stdout and "docs/gpu-session.md" in result.stdout


def test_tf32_reads_back_through_the_old_and_new_getters():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        training.enable_tf32()
        # the getter inductor's autotuning reads
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert (torch.backends.cudnn.allow_tf32 is True
                and torch.backends.cudnn.conv.fp32_precision == "tf32")
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_list_units_waits_on_the_cpu_control_group(monkeypatch, rank):
    control, waits = object(), []
    monkeypatch.setattr(train_clip.dist, "barrier", lambda group=None: waits.append(group))
    monkeypatch.setattr(train_clip.formats, "list_units", lambda *args, **kwargs: ["unit"])
    ranks = training.Ranks(rank=rank, world_size=2, control=control)
    cfg = types.SimpleNamespace(train_data="x.tar", image_column="images", text_column="texts")
    assert train_clip.list_units(cfg, [], ranks) == ["unit"]
    assert waits == [control]


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python3: the environment line, then every step fails (the fit part with its own \
code).
if [ "$1" = - ]; then cat >/dev/null; echo '{"python": "stub"}'; exit 0; fi
echo "stub: $*"
case "$*" in *fit*) exit 3;; *) exit 1;; esac
"""


def test_the_session_script_goes_on_after_a_failing_step(tmp_path):
    """Each bench part fails here (a stub stands in for python3, so no step costs a torch start-up):
    each is recorded as a JSON line with its exit status, and the next one runs."""
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "session"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "bench", str(out)],
                            env={**os.environ, "PYTHON": str(stub)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "session.jsonl").read_text().splitlines()]
    assert lines[0] == {"python": "stub"}
    steps = {line["step"]: line for line in lines if "step" in line}
    assert list(steps) == ["bench_eager", "bench_compiled", "bench_fit"]
    assert ([s["rc"] for s in steps.values()] == [1, 1, 3]
            and not any(s["timed_out"] for s in steps.values()))
    assert "--parts fit" in (out / "bench_fit.log").read_text()
