"""model.py is OpenAI CLIP / open_clip's CLIP, written from scratch, and checkpoints.py reads the
files users hold.

Proved against open_clip (test-only reference): with the same state dict, encode_image and
encode_text agree to 1e-5 in fp32 for ViT-B-32, ViT-B-32-quickgelu, ViT-B-16 and a small custom
size; parameter counts agree (ViT-B-32: 151,277,313, as open_clip's docs/model_profile.csv lists
it: 151.28 M); state dicts move both ways with no conversion.
Also: gradient checkpointing gives the same gradients, checkpoints round-trip in every accepted
shape, and each bad checkpoint gets an error that says what is wrong. The files users hold load
with equal outputs, each made by its own producer: open_clip's hub files (open_clip's save_for_hf
writes the .safetensors, the .bin and open_clip_config.json), a safetensors file written by the
safetensors library, and a TorchScript archive traced from open_clip's model (OpenAI's key names
and QuickGELU modules, fp16, with OpenAI's scalar entries), read without torch.jit.load.
"""
import math

import pytest
import torch

import checkpoints as C
import model as M

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat.", "ein Foto eines Hundes", "ｓｐａｃｅ 🚀 1,234 &amp; more", ""]


def reference_tokens(context_length=77):
    return open_clip.tokenize(TEXTS, context_length=context_length)


def open_clip_tiny(quick_gelu=False):
    """open_clip's CLIP class built with the same numbers as the kit's `tiny` preset."""
    c = M.model_config("tiny")
    vision = dict(image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                  layers=c.vision_layers, head_width=64)
    text = dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                heads=c.text_heads, layers=c.text_layers)
    return open_clip.model.CLIP(c.embed_dim, vision, text, quick_gelu=quick_gelu)


def assert_same_features(ours, reference, image_size):
    torch.manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size)
    tokens = reference_tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images),
                                   reference.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens),
                                   reference.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu",
                                  pytest.param("ViT-B-16", marks=pytest.mark.slow)])
def test_equals_open_clip_presets(name):
    reference = open_clip.create_model(name, pretrained=None).eval()
    ours = M.create_model(name).eval()
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    if name.startswith("ViT-B-32"):
        assert ours.num_params() == 151_277_313  # open_clip's count (see the module docstring)
    # open_clip -> kit: identical keys and shapes, strict load.
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_features(ours, reference, 224)


def test_state_dict_moves_both_ways_small_custom_size():
    ours = M.create_model("tiny").eval()
    reference = open_clip_tiny().eval()
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    # kit -> open_clip
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert_same_features(ours, reference, 32)
    # open_clip -> kit, with a fresh reference init
    reference = open_clip_tiny(quick_gelu=True).eval()
    ours = M.create_model("tiny", quickgelu=True).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_features(ours, reference, 32)


def test_wrong_activation_is_visible():
    """GELU vs QuickGELU is a real difference: loading QuickGELU weights into GELU changes
    outputs."""
    reference = open_clip_tiny(quick_gelu=True).eval()
    ours = M.create_model("tiny", quickgelu=False).eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.encode_image(images)
                - reference.encode_image(images, normalize=True)).abs().max() > 1e-4


def test_initialisation():
    model = M.create_model("ViT-B-32")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    block = model.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx((2 * 512) ** -0.5, rel=0.02)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(512**-0.5 * 24**-0.5, rel=0.02)
    assert model.visual.proj.std().item() == pytest.approx(768**-0.5, rel=0.02)


def test_forward_returns_features_and_scale():
    model = M.create_model("tiny")
    image_features, text_features, scale = model(torch.randn(3, 3, 32, 32), reference_tokens()[:3])
    assert image_features.shape == text_features.shape == (3, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = M.create_model("tiny")
    images, tokens = torch.randn(4, 3, 32, 32), reference_tokens()

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return M.create_model("tiny", quickgelu=True).eval()


def features(model):
    torch.manual_seed(2)
    with torch.no_grad():
        return model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_text(reference_tokens())


def assert_loads_same(path, model, **kwargs):
    loaded = C.load_checkpoint(path, **kwargs)
    assert not loaded.training
    assert loaded.config == model.config
    for a, b in zip(features(loaded), features(model)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_kit_checkpoint_round_trip(tiny, tmp_path):
    from dataclasses import asdict

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": tiny.state_dict(), "model_config": asdict(tiny.config), "step": 3},
               path)
    assert_loads_same(path, tiny)  # the stored config keeps quickgelu=True


def test_raw_and_prefixed_state_dicts(tiny, tmp_path):
    raw = tmp_path / "raw.pt"
    sd = dict(tiny.state_dict(), input_resolution=torch.tensor(32),
              context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, raw)  # an OpenAI-style archive with its scalar keys
    assert_loads_same(raw, tiny, quickgelu=True)  # architecture inferred from shapes
    wrapped = tmp_path / "open_clip_train.pt"
    torch.save({"epoch": 1, "name": "run",
                "state_dict": {"module._orig_mod." + k: v for k, v in tiny.state_dict().items()}},
               wrapped)
    assert_loads_same(wrapped, tiny, quickgelu=True)
    # without quickgelu=True, a file that records no activation loads as GELU
    assert C.load_checkpoint(raw).config.quickgelu is False


@pytest.mark.slow
def test_open_clip_state_dict_loads(tmp_path):
    reference = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "b32.pt"
    torch.save(reference.state_dict(), path)
    ours = C.load_checkpoint(path)
    assert ours.config == M.model_config("ViT-B-32")
    assert_same_features(ours, reference, 224)


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "not a readable checkpoint"),
        ("text", "not a readable checkpoint.*Accepted: the kit's ckpt.pt"),
        ("list", "holds no CLIP state dict"),
        ("missing_key", "missing keys"),
        ("wrong_shape", "wrong shapes"),
        ("unexpected_key", "unexpected keys"),
        ("not_clip", "not a CLIP ViT or ResNet state dict"),
    ],
)
def test_bad_checkpoints_get_clear_errors(tiny, tmp_path, case, message):
    from dataclasses import asdict

    path = tmp_path / f"{case}.pt"
    sd = tiny.state_dict()
    if case == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "text":
        path.write_text("this is not a checkpoint")
    elif case == "list":
        torch.save([1, 2, 3], path)
    elif case == "not_clip":
        torch.save({"weight": torch.zeros(3)}, path)
    else:
        sd = dict(sd)
        if case == "missing_key":
            del sd["visual.ln_post.weight"]
        elif case == "wrong_shape":
            sd["visual.proj"] = torch.zeros(128, 32)
        else:
            sd["visual.extra"] = torch.zeros(1)
        torch.save({"state_dict": sd, "model_config": asdict(tiny.config)}, path)
    with pytest.raises(ValueError, match=message) as error:
        C.load_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown model 'ViT-X'"):
        M.create_model("ViT-X")
    with pytest.raises(ValueError, match="unknown model setting"):
        M.create_model("tiny", widht=3)


def open_clip_tiny_config(quick_gelu):
    c = M.model_config("tiny")
    return {"embed_dim": c.embed_dim, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": c.image_size, "layers": c.vision_layers,
                           "width": c.vision_width, "patch_size": c.patch_size, "head_width": 64},
            "text_cfg": {"context_length": c.context_length, "vocab_size": c.vocab_size,
                         "width": c.text_width, "heads": c.text_heads, "layers": c.text_layers}}


class _NoTokenizerFiles:
    """save_for_hf also writes the tokenizer's files; the kit reads none of them."""

    def save_pretrained(self, folder):
        pass


def test_open_clip_hub_files_load(tmp_path):
    from open_clip.push_to_hf_hub import save_for_hf

    import json

    (tmp_path / "pi-tiny-quickgelu.json").write_text(json.dumps(open_clip_tiny_config(True)))
    open_clip.add_model_config(tmp_path / "pi-tiny-quickgelu.json")
    torch.manual_seed(3)
    # What open_clip's hub export expects: a model it created.
    reference = open_clip.create_model("pi-tiny-quickgelu").eval()
    save_for_hf(reference, _NoTokenizerFiles(), open_clip_tiny_config(True), tmp_path / "hub")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        ours = C.load_checkpoint(tmp_path / "hub" / name)
        assert ours.config.quickgelu is True  # recorded in the open_clip_config.json beside it
        assert_same_features(ours, reference, 32)
        with pytest.raises(ValueError, match=f"{name} records the QuickGELU activation .* "
                                             "but GELU was asked for"):
            C.load_checkpoint(tmp_path / "hub" / name, quickgelu=False)


def test_safetensors_file_with_openai_keys(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    # A bare file records no activation: it is asked for.
    assert_loads_same(path, tiny, quickgelu=True)
    assert C.load_checkpoint(path).config.quickgelu is False
    save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors: not a CLIP ViT or ResNet state dict"):
        C.load_checkpoint(tmp_path / "other.safetensors")


def _openai_style_archive(path, quick_gelu):
    """A TorchScript archive as OpenAI ships: a traced CLIP with OpenAI's key names (open_clip's
    CLIP has them), fp16 weights, and the scalar entries OpenAI's archives carry. -> the fp32
    reference."""
    torch.manual_seed(4)
    reference = open_clip_tiny(quick_gelu=quick_gelu).eval()
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        reference.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        reference.register_buffer(name, torch.tensor(value))
    traced = torch.jit.trace(reference, (torch.randn(1, 3, 32, 32), reference_tokens()[:1]),
                             check_trace=False)
    traced.half().save(str(path))
    return reference.half().float()  # the same rounded weights


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archive_loads_without_running_it(tmp_path, monkeypatch, quick_gelu):
    path = tmp_path / "ViT-tiny.pt"
    reference = _openai_style_archive(path, quick_gelu)
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    ours = C.load_checkpoint(path)
    assert ours.config.quickgelu is quick_gelu  # from the archive's activation modules
    assert_same_features(ours, reference, 32)
    wrong = {True: "GELU", False: "QuickGELU"}[quick_gelu]
    with pytest.raises(ValueError, match=f"but {wrong} was asked for"):
        C.load_checkpoint(path, quickgelu=not quick_gelu)


def test_torchscript_archive_with_other_objects_is_refused(tmp_path):
    import os
    import pickle
    import zipfile

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        # A global that would run code.
        archive.writestr("evil/data.pkl", pickle.dumps(os.system, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(ValueError, match=r"evil.pt is a TorchScript archive "
                                         r".*(posix|os)\.system.*torch.jit.load runs the archive"):
        C.load_checkpoint(path)
