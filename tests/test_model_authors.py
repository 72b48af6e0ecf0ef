"""The PI authors' CLIP (model.py's -authors presets) is their code's model, and checkpoints.py
reads their files.

Their code (github cheesepuff90/Brain_Initialization src/model.py) cannot be installed here (it
imports their config module, transformers and Lightning), so the facts read from it are tested
directly:
- attention in their text tower is bidirectional: with the authors' preset a later token changes
  an earlier position's output, with OpenAI's it does not; token for token, the tower equals
  open_clip's text tower built with no_causal_mask=True (an independent implementation);
- text features are the mean over the positions whose id is not 0, computed here by hand from
  open_clip's per-position outputs;
- the initial weights have the standard deviations their initialize_parameters draws, within
  bounds set by each tensor's sample count (six standard errors: a false alarm about once in 10^8
  per check);
- a Lightning checkpoint in their layout (state_dict under "model.", their module names;
  hyper_parameters holding a dataclass of a module that does not exist here) loads into the
  authors' preset, and the kit's model then gives the same features as a model written here from
  their code's description (plain-softmax attention, their names and shapes); a partial or
  foreign file is an error naming the keys, in their names.
- their loss caps the logit scale (src/loss.py:285) and nothing clamps the parameter: above ln 100
  the authors' preset keeps it (no gradient through the cap) where OpenAI's clamps it back; a kit
  checkpoint from before the setting existed loads as OpenAI's, and its run is not switched;
- configs/nights_authors.yaml and configs/yfcc15m_authors.yaml hold their values as their code
  applies them (no clipping, their schedule), and the post-hoc control on their checkpoint trains
  the vision qkv weights and biases.
With every option at OpenAI's value the model is OpenAI's: tests/test_model.py's open_clip parity
tests.
"""
import dataclasses
import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as C
import model as M

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat.", "a red star above a small blue circle", "two dogs"]


def text_positions(model, tokens):
    """The text tower's output at every position, (B, T, D), before pooling."""
    x = model.token_embedding(tokens) + model.positional_embedding
    return model.ln_final(model.transformer(x))


def test_bidirectional_attention_lets_later_tokens_change_earlier_positions():
    tokens = open_clip.tokenize(TEXTS[:1])  # [SOT, a, photo, of, a, cat, ., EOT, 0, ...]
    changed = tokens.clone()
    changed[0, 5] = open_clip.tokenize(["dog"])[0, 1]  # "cat" -> "dog" at position 5
    for name, earlier_changes in (("tiny-authors", True), ("tiny", False)):
        torch.manual_seed(0)
        model = M.create_model(name).eval()
        with torch.no_grad():
            before, after = (text_positions(model, tokens)[0, :5],
                             text_positions(model, changed)[0, :5])
        difference = (before - after).abs().max().item()
        if earlier_changes:
            assert difference > 1e-2, (f"{name}: positions 0-4 ignore a change at position 5 "
                                       "(causal?)")
        else:
            assert difference < 1e-6, f"{name}: positions 0-4 see position 5 ({difference})"


def open_clip_text_tower_without_causal_mask(model):
    """open_clip's CLIP with the kit's tiny sizes, its text tower built without the causal mask and
    unpooled (pool_type 'none': the projected output of every position)."""
    c = model.config
    vision = dict(image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                  layers=c.vision_layers, head_width=64)
    text = dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                heads=c.text_heads, layers=c.text_layers, no_causal_mask=True, pool_type="none")
    reference = open_clip.model.CLIP(c.embed_dim, vision, text, quick_gelu=False).eval()
    # The same keys: the options change no name.
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def test_text_features_are_the_mean_over_non_padding_positions_of_a_bidirectional_tower():
    torch.manual_seed(0)
    model = M.create_model("tiny-authors").eval()
    reference = open_clip_text_tower_without_causal_mask(model)
    tokens = open_clip.tokenize(TEXTS)  # zero-padded, as the authors' training captions
    with torch.no_grad():
        per_position = reference.encode_text(tokens)  # (B, T, E)
        ours = model.encode_text(tokens)
    expected = []
    for row, ids in zip(per_position, tokens):
        real = ids != 0  # the authors' pad_id: SOT, the words and EOT count, the zeros after do not
        assert 3 <= real.sum() < 77
        expected.append(F.normalize(row[real].mean(0), dim=-1))
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)


def test_ids_padded_with_end_of_text_are_averaged_over_all_positions():
    """Their evaluation's prompts (Hugging Face's CLIPTokenizer pads with <|endoftext|>, 49407):
    nothing is 0."""
    torch.manual_seed(0)
    model = M.create_model("tiny-authors").eval()
    tokens = open_clip.tokenize(TEXTS)
    tokens[tokens == 0] = 49407
    with torch.no_grad():
        expected = F.normalize(
            open_clip_text_tower_without_causal_mask(model).encode_text(tokens).mean(1), dim=-1)
        torch.testing.assert_close(model.encode_text(tokens), expected, atol=1e-5, rtol=0)


def normal_within_bounds(tensor, std, name):
    """Sample std and mean of n iid N(0, std^2) draws, within six standard errors:
    sd(s)/std ~ 1/sqrt(2(n-1)), sd(mean) = std/sqrt(n)."""
    n = tensor.numel()
    s, mean = tensor.double().std().item(), tensor.double().mean().item()
    assert abs(s / std - 1) < 6 / math.sqrt(2 * (n - 1)), (
        f"{name}: std {s:.4g}, expected {std:.4g} (n={n})")
    assert abs(mean) < 6 * std / math.sqrt(n), f"{name}: mean {mean:.4g} (std {std:.4g}, n={n})"


def uniform_within_bounds(tensor, bound, name):
    """U(-b, b) (nn.Linear's default bias): every value within b, std b/sqrt(3) within six standard
    errors (relative sd of the sample std ~ sqrt(0.2 / n), from the uniform's fourth moment
    b^4/5)."""
    n = tensor.numel()
    assert tensor.abs().max().item() <= bound, f"{name}: a value beyond {bound:.4g}"
    s = tensor.double().std().item()
    assert abs(s / (bound / math.sqrt(3)) - 1) < 6 * math.sqrt(0.2 / n), (
        f"{name}: std {s:.4g}, expected U(-{bound:.4g}, {bound:.4g})")


def test_initial_statistics_are_the_authors():
    """Each std from their src/model.py (VisionTransformer.__init__ / initialize_parameters,
    TextTransformer.initialize_parameters); every block is checked, in both towers. The logit scale
    is config/modelconfig/vit_b_32.json's init_logit_scale."""
    assert M.PRESETS["ViT-B-32-authors"] == {**M.PRESETS["ViT-B-32"], **M.AUTHORS}
    torch.manual_seed(0)
    # The init is written for any width and depth; small is fast.
    model = M.create_model("small", **M.AUTHORS)
    c = model.config
    assert model.logit_scale.item() == pytest.approx(4.60517)
    assert math.exp(model.logit_scale.item()) == pytest.approx(100, rel=1e-6)
    visual = model.visual
    normal_within_bounds(visual.class_embedding, 1.0, "class embedding")  # torch.randn(width)
    normal_within_bounds(visual.positional_embedding, 0.01, "vision positional embedding")
    normal_within_bounds(visual.proj, c.vision_width**-0.5, "vision projection")
    normal_within_bounds(model.token_embedding.weight, 0.02, "token embedding")
    normal_within_bounds(model.positional_embedding, 0.01, "text positional embedding")
    normal_within_bounds(model.text_projection, c.text_width**-0.5, "text projection")
    for tower, width, layers in (("vision", c.vision_width, c.vision_layers),
                                 ("text", c.text_width, c.text_layers)):
        transformer = visual.transformer if tower == "vision" else model.transformer
        out_std = width**-0.5 * (2 * layers) ** -0.5
        for i, block in enumerate(transformer.resblocks):
            where = f"{tower} block {i}"
            # Their act_layer default; the json's quick_gelu is false.
            assert isinstance(block.mlp.gelu, nn.GELU)
            normal_within_bounds(block.attn.in_proj_weight, width**-0.5, f"{where} qkv")
            normal_within_bounds(block.attn.out_proj.weight, out_std,
                                 f"{where} attention out-projection")
            normal_within_bounds(block.mlp.c_fc.weight, (2 * width) ** -0.5, f"{where} MLP in")
            normal_within_bounds(block.mlp.c_proj.weight, out_std, f"{where} MLP out")
            # The biases: nn.Linear's defaults.
            uniform_within_bounds(block.attn.in_proj_bias, width**-0.5, f"{where} qkv bias")
            uniform_within_bounds(block.attn.out_proj.bias, width**-0.5,
                                  f"{where} out-projection bias")
            uniform_within_bounds(block.mlp.c_fc.bias, width**-0.5, f"{where} MLP in bias")
            uniform_within_bounds(block.mlp.c_proj.bias, (4 * width) ** -0.5,
                                  f"{where} MLP out bias")


def test_options_change_no_key_or_shape_and_bad_values_are_refused():
    openai, authors = (M.create_model("tiny").state_dict(),
                       M.create_model("tiny-authors").state_dict())
    assert [(k, v.shape) for k, v in openai.items()] == [(k, v.shape) for k, v in authors.items()]
    defaults = M.CLIPConfig()
    assert (defaults.text_attention, defaults.text_pooling, defaults.init) == \
        ("causal", "eot", "openai")
    assert defaults.init_logit_scale == math.log(1 / 0.07)
    assert defaults.logit_scale_clamp == "parameter"
    with pytest.raises(ValueError, match="text_pooling='avg'"):
        M.model_config("tiny", text_pooling="avg")
    with pytest.raises(ValueError, match="logit_scale_clamp='both'"):
        M.model_config("tiny", logit_scale_clamp="both")


def test_kit_checkpoint_of_the_authors_preset_round_trips(tmp_path):
    torch.manual_seed(0)
    model = M.create_model("tiny-authors").eval()
    torch.save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
               tmp_path / "ckpt.pt")
    loaded = C.load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.config == model.config
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens),
                                   atol=0, rtol=0)


def test_their_logit_scale_cap_keeps_a_scale_above_ln100_while_openais_comes_back():
    """Their src/loss.py:285 caps exp(logit_scale) at 100 where the loss uses it, and nothing clamps
    the parameter: pushed above ln 100, the scale gets no gradient through the cap and stays there
    (the loss sees 100). OpenAI's CLIP (and open_clip) clamps the parameter to ln 100 after each
    step, so it comes back. One train_clip.train_step each, on the same batch, from ln 100 + 0.5."""
    import train_clip
    import training

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.tokenize([f"a photo of {n} cats" for n in range(8)])
    cfg = train_clip.Config(batch_size=8, accum_steps=1, lr=1e-3)
    above = math.log(100) + 0.5
    for name, scale_seen, after_step in (("tiny-authors", 100.0, above),
                                         ("tiny", math.exp(above), math.log(100))):
        torch.manual_seed(0)
        model = M.create_model(name)
        with torch.no_grad():
            model.logit_scale.fill_(above)
            assert model(images, tokens)[2].item() == pytest.approx(scale_seen, rel=1e-6), name
        optimizer = training.make_optimizer(model, cfg, "cpu")
        train_clip.train_step(model, model, None, optimizer, training.grad_scaler("cpu", "fp32"),
                              training.autocast("cpu", "fp32"), images, tokens, cfg.lr, cfg)
        assert model.logit_scale.item() == pytest.approx(after_step, abs=1e-6), name
        assert (model.logit_scale.grad.item() == 0.0) == (name == "tiny-authors"), name


def test_a_checkpoint_from_before_the_cap_setting_loads_and_its_run_is_not_switched(tmp_path):
    """A kit checkpoint written before logit_scale_clamp existed loads with the default, OpenAI's
    parameter clamp (as the kit then ran every preset); resuming such a run of an -authors preset,
    whose preset now caps in the loss, is refused by name rather than switched midway."""
    import cli
    import train_clip

    model = M.create_model("tiny-authors")
    record = dataclasses.asdict(model.config)
    del record["logit_scale_clamp"]
    torch.save({"state_dict": model.state_dict(), "model_config": record}, tmp_path / "old.pt")
    assert C.load_checkpoint(tmp_path / "old.pt").config.logit_scale_clamp == "parameter"
    with pytest.raises(cli.UserError, match="logit_scale_clamp: 'parameter' -> 'loss'"):
        train_clip.check_same_model(model.config, record, tmp_path / "old.pt")
    train_clip.check_same_model(model.config, dataclasses.asdict(model.config), "ckpt.pt")


# ---- Their checkpoints ----
# A model with their module tree (src/model.py: TransformerBlock norm1, attn.qkv, attn.proj, norm2,
# mlp = Sequential(Linear, GELU, Dropout, Linear, Dropout); VisionTransformer; TextTransformer under
# `text`), written here from that description with plain-softmax attention, so its state dict has
# their names and shapes and its features are what their forward computes.


class TheirBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * width, width), nn.Dropout(0.0))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = (self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads)
                   .permute(2, 0, 3, 1, 4))
        # Plain softmax attention, no mask.
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class TheirCLIP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.visual, self.text = nn.Module(), nn.Module()
        v, t, grid = self.visual, self.text, c.image_size // c.patch_size
        v.conv1 = nn.Conv2d(3, c.vision_width, c.patch_size, c.patch_size, bias=False)
        v.class_embedding = nn.Parameter(torch.randn(c.vision_width))
        v.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, c.vision_width))
        v.ln_pre, v.ln_post = nn.LayerNorm(c.vision_width), nn.LayerNorm(c.vision_width)
        v.transformer = nn.ModuleList(TheirBlock(c.vision_width, c.vision_heads)
                                      for _ in range(c.vision_layers))
        v.proj = nn.Parameter(torch.randn(c.vision_width, c.embed_dim))
        t.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        t.positional_embedding = nn.Parameter(torch.randn(c.context_length, c.text_width))
        t.transformer = nn.ModuleList(TheirBlock(c.text_width, c.text_heads)
                                      for _ in range(c.text_layers))
        t.ln_final = nn.LayerNorm(c.text_width)
        t.text_projection = nn.Parameter(torch.randn(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.60517))
        # Every norm and bias away from (1, 0), so that a swapped name shows in the outputs.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:  # LayerNorm weights near 1, biases near 0
                    p.copy_(0.1 * torch.randn_like(p) + (1.0 if name.endswith(".weight") else 0.0))
                elif p.ndim > 1:
                    p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)

    def encode_image(self, images):
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer:
            x = block(x)
        return F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)

    def encode_text(self, tokens):
        t = self.text
        x = t.token_embedding(tokens) + t.positional_embedding
        for block in t.transformer:
            x = block(x)
        keep = (tokens != 0).unsqueeze(-1).float()  # their pad_id
        x = (t.ln_final(x) * keep).sum(1) / keep.sum(1)
        return F.normalize(x @ t.text_projection, dim=-1)


@dataclasses.dataclass
class TrainingConfig:
    """Stands for their config.TrainingConfig, which save_hyperparameters() pickles."""

    lr: float = 5e-4
    epochs: int = 32


def save_lightning_checkpoint(theirs, path, monkeypatch, edit=lambda state: None):
    """Lightning's checkpoint layout (Lightning docs, "Checkpointing: saving and loading": epoch,
    global_step, pytorch-lightning_version, state_dict, loops, callbacks, optimizer_states,
    lr_schedulers, hparams_name, hyper_parameters). Their LightningModule keeps the CLIP as
    self.model, hence the "model." prefix, and save_hyperparameters() keeps their TrainingConfig, a
    class of their `config` module, which exists only while the file is written: reading it must
    not need their code."""
    module = types.ModuleType("config")
    TrainingConfig.__module__ = "config"
    module.TrainingConfig = TrainingConfig
    monkeypatch.setitem(sys.modules, "config", module)
    state = {f"model.{k}": v for k, v in theirs.state_dict().items()}
    edit(state)
    torch.save({"epoch": 31, "global_step": 9770, "pytorch-lightning_version": "2.5.1",
                "state_dict": state, "loops": {},
                "callbacks": {"ModelCheckpoint{'monitor': 'val/cifar100/epoch_acc1'}":
                              {"best_model_score": torch.tensor(0.1)}},
                "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": {"training_config": TrainingConfig(), "train_dataset_size": 0}},
               path)
    monkeypatch.delitem(sys.modules, "config")


@pytest.fixture
def theirs():
    torch.manual_seed(0)
    return TheirCLIP(M.model_config("tiny")).eval()


def test_their_lightning_checkpoint_loads_into_the_authors_preset(theirs, tmp_path, monkeypatch):
    path = tmp_path / "epoch=31-step=9770.ckpt"
    save_lightning_checkpoint(theirs, path, monkeypatch)
    # What the reader gets past: plain weights_only refuses their config class.
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    model = C.load_checkpoint(path)
    assert {k: getattr(model.config, k) for k in M.AUTHORS} == M.AUTHORS
    assert model.config == M.model_config("tiny-authors")  # sized from the tensors' shapes
    torch.manual_seed(1)
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), theirs.encode_image(images),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), theirs.encode_text(tokens),
                                   atol=1e-5, rtol=0)
    assert model.logit_scale.item() == theirs.logit_scale.item()


@pytest.mark.parametrize("case, message", [
    ("partial", r"missing keys \(2\): \['model.visual.ln_post.bias', "
                r"'model.text.transformer.1.mlp.3.weight'\]"),
    ("extra", r"unexpected keys \(1\): \['model.logit_bias'\]"),
    ("wrong_shape", r"wrong shapes \(1\): "
                    r"\['model.text.text_projection: \(128, 32\) != \(128, 64\)'\]"),
    ("no_text_embeddings", r"lacks the tensors that size the model: missing keys \(3\): "
                           r"\['model.text.token_embedding.weight', "
                           r"'model.text.positional_embedding', 'model.text.text_projection'\]"),
])
def test_partial_or_foreign_authors_checkpoint_names_the_keys(theirs, tmp_path, monkeypatch, case,
                                                              message):
    def edit(state):
        if case == "partial":
            del state["model.visual.ln_post.bias"], state["model.text.transformer.1.mlp.3.weight"]
        elif case == "extra":
            state["model.logit_bias"] = torch.tensor(-10.0)
        elif case == "wrong_shape":
            state["model.text.text_projection"] = torch.zeros(128, 32)
        else:
            for key in [k for k in state if k.startswith("model.text.") and "transformer" not in k]:
                del state[key]

    path = tmp_path / f"{case}.ckpt"
    save_lightning_checkpoint(theirs, path, monkeypatch, edit)
    with pytest.raises(ValueError, match=message) as error:
        C.load_checkpoint(path)
    assert str(path) in str(error.value) and "PI authors'" in str(error.value)


# ---- Their runs as configs ----


def test_authors_configs_load_and_the_defaults_stay_openai():
    """The trainers' own config loader reads both; the kit's default configs keep OpenAI's CLIP."""
    from pathlib import Path

    import yaml

    import cli
    import train_clip
    import train_triplet

    root = Path(__file__).resolve().parent.parent
    stage1 = cli.load_config(train_triplet.Config, [str(root / "configs/nights_authors.yaml")])
    assert (stage1.model, stage1.seed, stage1.eps, stage1.batch_size) == \
        ("ViT-B-32-authors", 42, 1e-8, 768)
    read = lambda name: yaml.safe_load((root / "configs" / name).read_text())  # noqa: E731
    for name in ("nights.yaml", "yfcc15m.yaml"):
        assert read(name)["model"] == "ViT-B-32"
    recipe = lambda cfg: {k: v for k, v in cfg.items()  # noqa: E731
                          if k not in ("model", "out_dir", "lr_schedule")}
    # Stage 1: only the model differs, and the schedule: theirs as their code runs it, where
    # configs/nights.yaml keeps the kit's cosine.
    assert recipe(read("nights_authors.yaml")) == recipe(read("nights.yaml"))
    assert (read("nights_authors.yaml")["lr_schedule"], read("nights.yaml")["lr_schedule"]) == \
        ("authors", "cosine")
    stage2 = cli.load_config(train_clip.Config, [str(root / "configs/yfcc15m_authors.yaml")])
    # No clipping: their src/train.py:1047 never applies the json's gradient_clip_val.
    assert (stage2.model, stage2.batch_size, stage2.contrastive_batch, stage2.grad_clip,
            stage2.eps, stage2.val_samples) == ("ViT-B-32-authors", 6144, 1024, 0.0, 1e-8, 10000)
    assert stage2.lr_schedule == "authors"
    assert M.model_config(stage2.model).logit_scale_clamp == "loss"


def test_trainer_tunes_their_checkpoint_post_hoc(theirs, tmp_path, monkeypatch):
    """The path users run: train_triplet.py --init THEIR.ckpt --posthoc=true (the paper's post-hoc
    control on their trained CLIP). The run keeps the authors' settings and changes only the vision
    qkv, weights and biases, as their src/train.py:939-943 unfreezes it."""
    from pathlib import Path

    import train_triplet
    from world.make_data import make_nights

    root = Path(__file__).resolve().parent.parent
    nights = tmp_path / "nights"
    make_nights(nights, 120, seed=1, image_size=32)
    save_lightning_checkpoint(theirs, tmp_path / "last.ckpt", monkeypatch)
    train_triplet.main([str(root / "configs/nights_tiny.yaml"), f"--data_root={nights}",
                        f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--batch_size=32",
                        f"--init={tmp_path / 'last.ckpt'}", "--posthoc=true", "--lr=1e-3",
                        "--weight_decay=0"])
    before, after = (C.load_checkpoint(tmp_path / "last.ckpt"),
                     C.load_checkpoint(tmp_path / "run" / "ckpt.pt"))
    assert after.config == before.config == M.model_config("tiny-authors")
    changed = {k for k, v in before.state_dict().items()
               if not torch.equal(v, after.state_dict()[k])}
    assert changed == {f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"
                       for i in range(2) for kind in ("weight", "bias")}


def test_model_settings_set_one_of_a_presets_fields_at_a_time():
    """The trainers' model_settings: CLIPConfig fields over a preset, each converted to its field's
    type, so an ablation (the authors' model with OpenAI's starting temperature, say) needs no
    preset of its own."""
    settings = M.parse_settings(" init_logit_scale=2.6593, context_length=16 ,"
                                "text_pooling=eot,quickgelu=false")
    assert settings == {"init_logit_scale": 2.6593, "context_length": 16, "text_pooling": "eot",
                        "quickgelu": False}
    model = M.create_model("tiny-authors",
                           **M.parse_settings("init_logit_scale=2.6593,context_length=16"))
    assert math.exp(model.logit_scale.item()) == pytest.approx(14.28, abs=0.01)
    assert model.positional_embedding.shape == (16, 128)
    assert (model.config.text_attention, model.config.text_pooling, model.config.init) == \
        ("bidirectional", "mean", "authors")
    assert M.parse_settings("") == {}
    for text, message in (("context_lenght=16", "not NAME=VALUE"),
                          ("context_length=16.5", "is not a int"),
                          ("quickgelu=yes", "is not a bool"),
                          ("vision_layers=3", "cannot be set here"),
                          ("init_logit_scale", "not NAME=VALUE")):
        with pytest.raises(ValueError, match=message):
            M.parse_settings(text)
    # The values themselves: CLIPConfig's checks.
    with pytest.raises(ValueError, match="text_pooling='first'"):
        M.create_model("tiny", **M.parse_settings("text_pooling=first"))


def test_train_triplet_refuses_model_settings_with_an_init_checkpoint(tmp_path):
    """--init brings its own architecture: settings beside it would be silently ignored, so they
    are refused."""
    import cli
    import train_triplet

    model = M.create_model("tiny-authors")
    torch.save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
               tmp_path / "ckpt.pt")
    with pytest.raises(cli.UserError, match="model_settings .* --init"):
        train_triplet.main([f"--init={tmp_path / 'ckpt.pt'}",
                            "--model_settings=context_length=16", f"--data_root={tmp_path}",
                            f"--out_dir={tmp_path / 'run'}", "--device=cpu"])
