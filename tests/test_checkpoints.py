"""Sharing a model as people share CLIP models: `python checkpoints.py CKPT --out DIR` writes
open_clip's hub layout (open_clip_config.json beside open_clip_model.safetensors).

- open_clip 3.3 (the reference) loads the folder through `local-dir:` and its image and text
  features equal the kit's, for a ViT, a ResNet and the PI authors' bidirectional text tower;
- the kit's own reader loads the folder back into the same model (config and weights);
- a setting open_clip cannot express (the authors' mean pooling) is refused, naming it, and an
  exported folder is not written over without --overwrite.
"""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from checkpoints import load_checkpoint
from model import create_model

ROOT = Path(__file__).resolve().parents[1]


def saved(model, path):
    torch.save({"state_dict": model.state_dict(),
                "model_config": dataclasses.asdict(model.config)}, path)
    return path


def export(checkpoint, out, *flags):
    return subprocess.run([sys.executable, "checkpoints.py", str(checkpoint), "--out", str(out),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset, settings", [
    ("tiny", {}), pytest.param("tiny-rn", {}, marks=pytest.mark.slow),
    pytest.param("tiny", {"text_attention": "bidirectional"}, marks=pytest.mark.slow)],
    ids=["vit", "resnet", "bidirectional-text"])
def test_open_clip_loads_the_exported_folder_with_the_same_features(tmp_path, preset, settings):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ours = create_model(preset, **settings).eval()
    result = export(saved(ours, tmp_path / "ckpt.pt"), tmp_path / "hub")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors"]
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    theirs.eval()
    size = ours.config.image_size
    images = torch.randn(3, 3, size, size)
    tokens = data.tokenize(["a photo of a cat", "two red circles", "x"], ours.config.context_length)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images, normalize=True),
                                   ours.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.encode_text(tokens, normalize=True),
                                   ours.encode_text(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.logit_scale.exp(), ours.logit_scale.exp())
    # Their evaluation preprocessing is the kit's: resize the short side, centre crop, CLIP's mean.
    config = json.loads((tmp_path / "hub" / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == list(data.CLIP_MEAN)
    # The kit's own reader: the same model back, config and weights.
    back = load_checkpoint(tmp_path / "hub" / "open_clip_model.safetensors")
    assert back.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.slow
def test_a_setting_open_clip_cannot_express_is_refused_and_nothing_is_written_over(tmp_path):
    theirs = saved(create_model("tiny-authors"), tmp_path / "authors.pt")  # mean-pooled text
    result = export(theirs, tmp_path / "hub")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "text_pooling='mean'" in result.stderr and "no open_clip equivalent" in result.stderr
    assert not (tmp_path / "hub").exists()
    plain = saved(create_model("tiny"), tmp_path / "tiny.pt")
    assert export(plain, tmp_path / "hub").returncode == 0
    before = (tmp_path / "hub" / "open_clip_model.safetensors").read_bytes()
    again = export(saved(create_model("small"), tmp_path / "small.pt"), tmp_path / "hub")
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (tmp_path / "hub" / "open_clip_model.safetensors").read_bytes() == before
