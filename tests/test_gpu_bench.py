"""bench/gpu_bench.py: its FLOP counts against the published ViT-B/32, RN50 and RN101 figures, its
batch search, and a dry run of the whole script on the CPU (tiny ViT and tiny ResNet) through
train_clip.train_step, the trainer's step.

The reference numbers are open_clip's model profile (github mlfoundations/open_clip,
docs/model_profile.csv): ViT-B-32 gflops 14.78 per image-text pair forward, and three times
that, ~44, for a training step (the backward pass costs two forwards: Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", arXiv 2001.08361, section 2.1); RN50 18.18 and RN101
25.5, counted with open_clip's attention pool, which runs all 50 grid tokens as queries where
the kit runs the one it keeps.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402


@pytest.mark.slow
def test_flops_of_vit_b32_match_the_published_figures():
    forward = gpu_bench.forward_flops("ViT-B-32", 2) / 2
    assert forward == pytest.approx(14.78e9, rel=0.002)
    step = gpu_bench.step_flops("ViT-B-32", 2, 1, False) / 2
    assert step == pytest.approx(44e9, rel=0.01)
    # Accumulation adds its cached no-grad forward; checkpointing recomputes part of one
    # (which HFU counts).
    assert (gpu_bench.step_flops("ViT-B-32", 2, 2, False) / 2 - step
            == pytest.approx(forward, rel=0.01))
    recomputed = gpu_bench.step_flops("ViT-B-32", 2, 1, True) / 2 - step
    assert 0.5 * forward < recomputed < forward


@pytest.mark.parametrize("name, published, embed_dim",
                         [("RN50", 18.18e9, 1024), ("RN101", 25.5e9, 512)])
def test_flops_of_resnets_match_the_published_figures(name, published, embed_dim):
    forward = gpu_bench.forward_flops(name, 2) / 2
    # open_clip's pool also computes 49 more queries (q projection, scores and weighted values over
    # 50 keys, c_proj) of width C = 2048 and drops them: 2 FLOPs a multiply-add.
    channels, extra_queries, keys = 2048, 49, 50
    dropped = 2 * extra_queries * (channels * channels + 2 * keys * channels + channels * embed_dim)
    assert forward + dropped == pytest.approx(published, rel=0.002)


def test_largest_fitting_batch_search():
    probes = []

    def fits(n):
        probes.append(n)
        return n <= 1000

    assert gpu_bench.largest_fitting(fits, 256, 64) == 960
    assert len(probes) < 12
    assert gpu_bench.largest_fitting(lambda n: False, 256, 64) is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["", "RN50"])
def test_dry_run(tmp_path, model):
    torch.set_num_threads(1)  # tiny steps: threads only contend on a shared machine
    results = gpu_bench.main(["--dry-run", "--out", str(tmp_path / "bench.json")]
                             + (["--model", model] if model else []))
    assert results["model"] == ("tiny-rn" if model else "tiny")
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(results))
    runs = {(r["grad_checkpointing"], r["accum_steps"]): r for r in results["runs"]}
    assert set(runs) == {(False, 1), (False, 2), (True, 1), (True, 2)}
    peak = results["peak_tflops"] * 1e12
    # each figure from the step's time and the counted FLOPs
    for (checkpointing, accum), r in runs.items():
        assert r["batch"] == 4 * accum and r["step_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        model_flops = gpu_bench.step_flops(results["model"], r["batch"], accum, False)
        assert r["gflop_per_pair"] == pytest.approx(model_flops / r["batch"] / 1e9)
        assert r["mfu"] == pytest.approx(model_flops / r["step_s"] / peak)
        assert r["hfu"] == pytest.approx(gpu_bench.step_flops(results["model"], r["batch"], accum,
                                                              checkpointing) / r["step_s"] / peak)
    assert (runs[(True, 1)]["hfu"] > runs[(True, 1)]["mfu"]
            and runs[(False, 1)]["hfu"] == runs[(False, 1)]["mfu"])
    assert runs[(False, 2)]["gflop_per_pair"] > runs[(False, 1)]["gflop_per_pair"]
    # Issue 22: every result is a JSON line as it comes (a timeout loses only what was running), the
    # matmul ceiling is measured, and one fit probe ran the trainer's sequence (uint8 batch,
    # augmentation, step at accum_steps 2) without and with checkpointing.
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert "matmul_ceiling_tflops" in lines[1] and results["measured_tflops"] > 0
    assert [r for r in lines if "step_s" in r] == results["runs"]
    probes = [r for r in lines if r.get("probe") == "fit"]
    assert ([(p["grad_checkpointing"], p["accum_steps"], p["fits"]) for p in probes]
            == [(False, 2, True), (True, 2, True)])
    assert results["largest_micro_batch"] == {"plain": 4, "checkpointing": 4}
