"""model.py's other backbones are open_clip's: ModifiedResNet (RN50, RN101 and their -quickgelu
twins) and ViT-H-14, and checkpoints.py reads their files.

Proved against open_clip 3.3.0 (test-only reference), on the same weights:
- RN50 and RN101: equal parameter counts and identical keys and shapes; image and text features
  agree to 1e-5 in fp32 both ways (open_clip's weights in the kit's model, the kit's in
  open_clip's), in eval mode with every BatchNorm's gains, biases and running statistics randomised
  first (at init every block's last norm gain is 0, which would hide the blocks from the
  comparison).
- Train mode: the same batch statistics (equal outputs) and the same running statistics and batch
  counts after a forward; gradient checkpointing gives the same gradients AND the same running
  statistics (its recomputation in backward must not update them twice).
- Every RN preset and ViT-H-14 build open_clip's key -> shape map on the meta device (ViT-H-14 is
  986M parameters: 4 GB in fp32 for each model, too much for the shared CI machine); a ViT-H-wide
  model (its widths and 80-wide heads, one block per tower) agrees with open_clip in a forward.
- Files: an open_clip RN state dict, one without BatchNorm's batch counters, and an OpenAI-style
  TorchScript archive of a ResNet CLIP (traced from open_clip's, fp16, OpenAI's scalar entries)
  load with the architecture inferred from shapes and equal outputs; ViT-H's 16 heads are inferred.
"""
import pytest
import torch

import checkpoints as C
import model as M

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat.", "a diagram", ""]


def open_clip_twin(config):
    """open_clip's CLIP class built with the numbers of the kit's CLIPConfig (open_clip derives a
    ResNet's heads as 32 x width / head_width, a ViT's as width / head_width)."""
    c = config
    head_width = (32 * c.vision_width if c.resnet else c.vision_width) // c.vision_heads
    vision = dict(image_size=c.image_size,
                  layers=list(c.vision_layers) if c.resnet else c.vision_layers,
                  width=c.vision_width, patch_size=c.patch_size, head_width=head_width)
    text = dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                heads=c.text_heads, layers=c.text_layers)
    return open_clip.model.CLIP(c.embed_dim, vision, text, quick_gelu=c.quickgelu)


def randomise_batchnorm(model, seed):
    """Every BatchNorm's gain, bias and running statistics drawn at random (variances positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def assert_same_features(ours, reference, image_size, batch=2):
    torch.manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size)
    tokens = open_clip.tokenize(TEXTS, context_length=ours.config.context_length)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images),
                                   reference.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens),
                                   reference.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("name, params", [
    ("RN50", 102_007_137), pytest.param("RN101", 119_688_033, marks=pytest.mark.slow)])
def test_resnet_equals_open_clip_both_ways(name, params):
    reference = open_clip.create_model(name, pretrained=None).eval()
    ours = M.create_model(name).eval()
    assert ours.num_params() == sum(p.numel() for p in reference.parameters()) == params
    assert shapes(ours.state_dict()) == shapes(reference.state_dict())
    # open_clip -> kit
    ours.load_state_dict(randomise_batchnorm(reference, 0).state_dict(), strict=True)
    assert_same_features(ours, reference, 224, batch=1)  # one image: the CI machine has 2 cores
    # kit -> open_clip
    reference.load_state_dict(randomise_batchnorm(ours, 1).state_dict(), strict=True)
    assert_same_features(ours, reference, 224, batch=1)


@pytest.mark.parametrize("name", ["RN50", "RN50-quickgelu", "RN101", "RN101-quickgelu", "ViT-H-14"])
def test_presets_are_open_clips_configs(name):
    """Keys, shapes and parameter counts on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        # What open_clip's create_model builds.
        reference = open_clip.model.CLIP(**open_clip.get_model_config(name))
        ours = M.create_model(name)
    assert shapes(ours.state_dict()) == shapes(reference.state_dict())
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    if name == "ViT-H-14":
        assert ours.num_params() == 986_109_441
        assert ours.visual.transformer.resblocks[0].attn.heads == \
            reference.visual.transformer.resblocks[0].attn.num_heads == 16
    else:  # the activation is the text tower's: the ResNet's is ReLU either way
        text_activation = type(reference.transformer.resblocks[0].mlp.gelu).__name__
        assert text_activation == ("QuickGELU" if name.endswith("quickgelu") else "GELU")
        assert ours.config.quickgelu == name.endswith("quickgelu")


@pytest.mark.slow
def test_vit_h_widths_forward_equals_open_clip(tmp_path):
    """ViT-H-14 in all but depth and image size: 1280-wide vision blocks with 16 heads of 80,
    1024-wide text blocks; one block per tower, 56 px, so the forward takes a second."""
    config = M.model_config("ViT-H-14", vision_layers=1, text_layers=1, image_size=56)
    torch.manual_seed(0)
    reference = open_clip_twin(config).eval()
    ours = M.create_model(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_features(ours, reference, 56, batch=1)
    # From a bare state dict the head count is read from open_clip's head width for 1280-wide ViTs.
    torch.save(reference.state_dict(), tmp_path / "vit-h-shallow.pt")
    assert C.load_checkpoint(tmp_path / "vit-h-shallow.pt").config == config


def test_tiny_resnet_both_ways_and_train_mode_statistics():
    config = M.model_config("tiny-rn")
    torch.manual_seed(0)
    ours = randomise_batchnorm(M.create_model(config), 2).eval()
    reference = open_clip_twin(config).eval()
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert_same_features(ours, reference, 64)
    # Train mode: batch statistics in the forward, running statistics updated alike.
    ours.train(), reference.train()
    images = torch.randn(6, 3, 64, 64)
    torch.testing.assert_close(ours.visual(images), reference.visual(images), atol=1e-5, rtol=0)
    mine, theirs = ours.state_dict(), reference.state_dict()
    for key in mine:
        if "running_" in key or "num_batches_tracked" in key:
            torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert mine["visual.layer1.0.bn1.num_batches_tracked"].item() == 1
    assert not torch.equal(mine["visual.layer1.0.bn1.running_mean"],
                           randomise_batchnorm(M.create_model(config), 2)
                           .state_dict()["visual.layer1.0.bn1.running_mean"])


def test_resnet_grad_checkpointing_same_gradients_and_statistics():
    torch.manual_seed(0)
    start = randomise_batchnorm(M.create_model("tiny-rn"), 3).state_dict()
    images = torch.randn(4, 3, 64, 64)

    def run(checkpointing):
        model = M.create_model("tiny-rn")
        model.load_state_dict(start)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        model.visual(images).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return grads, buffers

    (plain_grads, plain_buffers), (ckpt_grads, ckpt_buffers) = run(False), run(True)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=name)
    for name in plain_buffers:  # a second update in the recomputation would move these
        torch.testing.assert_close(ckpt_buffers[name], plain_buffers[name], atol=0, rtol=0,
                                   msg=name)


def test_resnet_files_load(tmp_path):
    """An open_clip RN state dict, and one without the batch counters, load with inferred
    architecture."""
    config = M.model_config("tiny-rn", quickgelu=True)
    torch.manual_seed(4)
    reference = randomise_batchnorm(open_clip_twin(config), 5).eval()
    torch.save(reference.state_dict(), tmp_path / "rn.pt")
    ours = C.load_checkpoint(tmp_path / "rn.pt", quickgelu=True)
    assert ours.config == config
    assert_same_features(ours, reference, 64)
    counters = {k: v for k, v in reference.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    torch.save(counters, tmp_path / "no-counters.pt")
    assert_same_features(C.load_checkpoint(tmp_path / "no-counters.pt", quickgelu=True),
                         reference, 64)


def test_openai_style_resnet_archive_loads_without_running_it(tmp_path, monkeypatch):
    """OpenAI ships RN50.pt as a TorchScript archive: traced, fp16, with scalar entries; QuickGELU
    in its text tower. The kit reads its tensors and module names without torch.jit.load."""
    config = M.model_config("tiny-rn", quickgelu=True)
    torch.manual_seed(6)
    reference = randomise_batchnorm(open_clip_twin(config), 7).eval()
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        reference.__dict__.pop(name, None)
        reference.register_buffer(name, torch.tensor(value))
    tokens = open_clip.tokenize(TEXTS[:1])
    traced = torch.jit.trace(reference, (torch.randn(1, 3, 64, 64), tokens), check_trace=False)
    traced.half().save(str(tmp_path / "RN-tiny.pt"))
    reference = reference.half().float()  # the same rounded weights
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    ours = C.load_checkpoint(tmp_path / "RN-tiny.pt")
    # QuickGELU from the archive's module names, the ResNet from shapes.
    assert ours.config == config
    assert_same_features(ours, reference, 64)


def test_rn50_configs_load_and_hand_the_tower_over():
    """configs/rn50_nights.yaml's tower is what configs/rn50_yfcc15m.yaml's --init takes: the same
    preset. sync_batchnorm: on in stage 1 (the PI authors' setting), off in stage 2 (open_clip's
    default)."""
    from pathlib import Path

    import cli
    import train_clip
    import train_triplet

    configs = Path(__file__).resolve().parents[1] / "configs"
    stage1 = cli.load_config(train_triplet.Config, [str(configs / "rn50_nights.yaml")])
    stage2 = cli.load_config(train_clip.Config, [str(configs / "rn50_yfcc15m.yaml")])
    assert stage1.model == stage2.model == "RN50-quickgelu" and M.model_config(stage1.model).resnet
    assert stage1.sync_batchnorm and not stage2.sync_batchnorm
    assert (stage2.beta1, stage2.beta2, stage2.eps) == (0.9, 0.999, 1e-8)
