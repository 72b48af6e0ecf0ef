"""CLIP, from scratch: a Vision Transformer, a causal text transformer, and the two joined.

Read bottom-up: attention -> MLP -> residual block -> transformer -> vision tower -> text tower ->
CLIP (and stage 1's perceptual distances) -> presets -> checkpoint loading. The state-dict keys and
shapes are exactly those of OpenAI CLIP and open_clip's `CLIP` class (REFERENCE.md section 5), so a
state dict moves between them unchanged. This file imports nothing of the kit. It runs past the kit's
~400 lines on purpose: the last section reads every checkpoint format users hold (kit, open_clip,
safetensors, OpenAI's TorchScript), and it belongs here because every loader needs it and this file
may import nothing of the kit.

Letters used in shape comments:
  B batch, N tokens (patches + 1 class token, or text positions), D width of a tower,
  H attention heads, Dh = D / H width of one head, E joint embedding dim, T context length.
"""
import collections
import io
import json
import math
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with. Loading those
    weights into a model with nn.GELU silently costs accuracy, so the choice is a recorded setting."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (packed in_proj,
    out_proj), so the keys match OpenAI / open_clip, computed by scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's defaults, which OpenAI / open_clip keep for the vision tower.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, Dh)
        y = y.transpose(1, 2).reshape(B, N, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width, activation):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = activation  # named as in OpenAI's nn.Sequential, holds no parameters
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, activation):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, activation)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quickgelu, causal):
        super().__init__()
        self.causal = causal  # True for text: each position sees only itself and earlier ones
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, QuickGELU() if quickgelu else nn.GELU()) for _ in range(layers)]
        )

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Recompute the block's activations in backward instead of storing them: memory per
                # block drops to its input, at ~1/3 more compute. Same gradients (tests prove it).
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x

    def init_openai_(self, width, layers):
        """OpenAI's normal init for the text transformer (REFERENCE.md section 5)."""
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """Image (B, 3, S, S) -> projected class-token feature (B, E), not normalised."""

    def __init__(self, image_size, patch_size, width, layers, heads, embed_dim, quickgelu):
        super().__init__()
        assert image_size % patch_size == 0, f"image_size {image_size} is not a multiple of patch {patch_size}"
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quickgelu, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, images):
        x = self.conv1(images)  # (B, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, N-1, D): one token per patch, row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, D) @ (D, E) -> (B, E)


@dataclass
class CLIPConfig:
    """Every number that fixes a CLIP's architecture. Heads are width / 64 in every preset
    (open_clip's head width), which is what lets load_checkpoint infer them from shapes."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    quickgelu: bool = False  # activation: QuickGELU (OpenAI weights) or nn.GELU (open_clip "ViT-B-32")


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = self.config = config
        self.visual = VisionTransformer(
            c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_heads, c.embed_dim, c.quickgelu
        )
        # The text tower's modules sit at the top level (no `text.` prefix), as in OpenAI's CLIP.
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quickgelu, causal=True)
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07, used as exp()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)
        self.transformer.init_openai_(c.text_width, c.text_layers)

    def set_grad_checkpointing(self, enable=True):
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):  # (B, 3, S, S) -> (B, E), unit length
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens):  # (B, T) int64 -> (B, E), unit length
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x))  # (B, T, D)
        # Pool at the end-of-text token. argmax finds it because EOT (49407) is the largest id in
        # CLIP's vocabulary and every tokenised text holds exactly one.
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, D)
        return F.normalize(x @ self.text_projection, dim=-1)

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def nights_distances(visual, ref, left, right):
    """Perceptual distances d = 1 - cos of the projected image embeddings (PI fork, DreamSim):
    (d(ref, left), d(ref, right)), each (B,). One forward over the 3B images, so that under DDP
    each step is one forward and one backward; `visual` maps (B, 3, S, S) -> (B, E). Stage 1's
    forward (train_triplet.py) and the 2AFC score (evaluate.py) both call it: one definition."""
    features = F.normalize(visual(torch.cat([ref, left, right])).float(), dim=-1)  # (3B, E)
    f_ref, f_left, f_right = features.chunk(3)  # 3 x (B, E)
    return 1 - (f_ref * f_left).sum(-1), 1 - (f_ref * f_right).sum(-1)


# ---------------------------------------------------------------------------------------------------
# Presets (numbers from open_clip's model_configs/*.json; heads = width / 64)
# ---------------------------------------------------------------------------------------------------

_B = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_heads=12, text_width=512, text_layers=12, text_heads=8)
PRESETS = {
    "ViT-B-32": dict(_B, patch_size=32),
    "ViT-B-32-quickgelu": dict(_B, patch_size=32, quickgelu=True),
    "ViT-B-16": dict(_B, patch_size=16),
    "ViT-L-14": dict(
        embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        text_width=768, text_layers=12, text_heads=12,
    ),
    # CPU presets. `tiny` is for tests (~7.6M parameters, 6.3M of them the token table); `small` for
    # the embedded default (64 px, the size REFERENCE.md section 11 times at ~50-150 img/s on 2 cores).
    "tiny": dict(
        embed_dim=64, image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2,
        text_width=128, text_layers=2, text_heads=2,
    ),
    "small": dict(
        embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4,
        text_width=256, text_layers=6, text_heads=4,
    ),
}


def model_config(name="ViT-B-32", **overrides):
    """A preset's CLIPConfig, with fields overridden (e.g. image_size=64). Unknown names are errors."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    known = {f.name for f in fields(CLIPConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return CLIPConfig(**{**PRESETS[name], **overrides})


def create_model(name="ViT-B-32", **overrides):
    """A randomly initialised CLIP from a preset name, a CLIPConfig, or a dict of CLIPConfig fields."""
    if isinstance(name, CLIPConfig):
        config = CLIPConfig(**{**asdict(name), **overrides})
    elif isinstance(name, dict):
        config = CLIPConfig(**{**name, **overrides})
    else:
        config = model_config(name, **overrides)
    return CLIP(config)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
# read_checkpoint tells the accepted files apart by their content, not their name:
#   torch.save files: the kit's {"state_dict", "model_config", ...training state}, open_clip training
#     checkpoints {"epoch", "name", "state_dict", ...}, raw state dicts (open_clip's hub file
#     open_clip_pytorch_model.bin, OpenAI / open_clip weights saved with torch.save);
#   safetensors files (open_clip's hub open_clip_model.safetensors, or any with these keys);
#   OpenAI's TorchScript archives (~/.cache/clip/ViT-B-32.pt), whose tensors are read without
#     running the archive (see _read_torchscript).
# The state dict keys are the same in all of them (REFERENCE.md section 5), up to the prefixes below.

_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and by torch.compile
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
ACCEPTED = ("the kit's ckpt.pt, an open_clip checkpoint or hub file (.bin, .safetensors), OpenAI's TorchScript "
            "archive, or a torch.save / safetensors state dict with OpenAI / open_clip keys")


class _ScriptObject:
    """Stands in for a TorchScript module while its pickle is read: keeps the attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TorchScriptReader(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl (the module tree and its tensors) with an allow-list:
    TorchScript classes become _ScriptObject, tensors are rebuilt from the archive's data/ entries, and
    any other global is refused (standard pickle "restricting globals"), so no code of the file runs."""

    def __init__(self, archive, prefix):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix, self.class_names = archive, prefix, set()

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            self.class_names.add(name)
            return type(name, (_ScriptObject,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: storage.as_strided(size, stride, offset)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"it holds {module}.{name}, which is neither a module nor a tensor")

    def persistent_load(self, pid):  # ("storage", dtype, key, location, numel) -> flat tensor
        _, dtype, key, _, _ = pid
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _read_torchscript(archive, prefix, path):
    """-> (state dict, quickgelu True / False from the activation modules' class names, or None)."""
    reader = _TorchScriptReader(archive, prefix)
    try:
        root = reader.load()
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is a TorchScript archive whose weights cannot be read without running it ({e}). "
                         "If you trust it, convert it once (torch.jit.load runs the archive's code): python -c "
                         f"\"import torch; torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), "
                         "'weights.pt')\" and load weights.pt") from None

    def tensors(obj, prefix=""):
        for name, value in (obj.state.items() if isinstance(getattr(obj, "state", None), dict) else ()):
            if isinstance(value, torch.Tensor) and name != "attn_mask":  # the causal mask, no weight
                yield prefix + name, value
            elif isinstance(value, _ScriptObject):
                yield from tensors(value, f"{prefix}{name}.")

    names = reader.class_names
    return dict(tensors(root)), (True if "QuickGELU" in names else False if "GELU" in names else None)


def _is_safetensors(path):  # 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _open_clip_hub_quickgelu(path):
    """open_clip's hub repositories keep open_clip_config.json beside the weights: its recorded
    activation (model_cfg.quick_gelu), or None when there is no such file."""
    config = Path(path).parent / "open_clip_config.json"
    if Path(path).name not in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") or not config.exists():
        return None
    try:
        return bool(json.loads(config.read_text()).get("model_cfg", {}).get("quick_gelu", False))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config} (beside {path}) is not open_clip's config JSON: {e}") from None


def read_checkpoint(path):
    """Load any accepted checkpoint file (see above) without running code from it -> (clean state dict,
    model config dict the file records, else None). torch.load runs with weights_only=True; a TorchScript
    archive is read by _read_torchscript, never by torch.jit.load, which would compile and run its code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    stored_config, quickgelu = None, _open_clip_hub_quickgelu(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            obj = load_file(path)
        elif zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            with zipfile.ZipFile(path) as archive:
                prefix = next(n for n in archive.namelist() if n.endswith("/data.pkl")).rsplit("/", 1)[0]
                obj, quickgelu = _read_torchscript(archive, prefix, path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, ValueError) and str(path) in str(e):  # already names the file and what to do
            raise
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or another format?): {e}. "
                         f"Accepted: {ACCEPTED}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        stored_config = obj.get("model_config")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no CLIP state dict (expected a dict of tensors, or one under 'state_dict'). "
                         f"Accepted: {ACCEPTED}")
    state_dict = {}
    for key, value in obj.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        if key not in _OPENAI_SCALARS:
            state_dict[key] = value
    if stored_config is None and quickgelu is not None:  # the file records its activation, not a config
        try:
            stored_config = asdict(config_from_state_dict(state_dict, quickgelu))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return state_dict, stored_config


def _count_layers(state_dict, prefix):  # prefix "...resblocks." -> number of distinct block indices
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def config_from_state_dict(state_dict, quickgelu=False):
    """Infer a CLIPConfig from tensor shapes (heads assumed width / 64, as in every CLIP preset)."""
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP ViT state dict: missing {missing}")
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    return CLIPConfig(
        embed_dim=state_dict["visual.proj"].shape[1],
        image_size=patch_size * grid,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=_count_layers(state_dict, "visual.transformer.resblocks."),
        vision_heads=vision_width // 64,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        text_width=text_width,
        text_layers=_count_layers(state_dict, "transformer.resblocks."),
        text_heads=text_width // 64,
        quickgelu=quickgelu,
    )


def check_state_dict(model, state_dict, path="state dict"):
    """Raise one error listing every missing, unexpected and wrongly shaped key (no partial loads)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{name} ({len(keys)}): {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if keys]
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))


def check_activation(path, recorded, quickgelu):
    """Raise when a file records one activation and the caller asks for the other (quickgelu None: no ask)."""
    if quickgelu is not None and bool(quickgelu) != bool(recorded):
        name = {True: "QuickGELU", False: "GELU"}
        raise ValueError(f"{path} records the {name[bool(recorded)]} activation (quickgelu={bool(recorded)}), but "
                         f"{name[bool(quickgelu)]} was asked for (quickgelu={bool(quickgelu)}); weights run with the "
                         "other activation silently lose accuracy. Use the recorded one (drop the setting, or pick the model "
                         "preset with that activation, e.g. ViT-B-32-quickgelu).")


def load_checkpoint(path, quickgelu=None):
    """Any accepted CLIP checkpoint (see read_checkpoint) -> CLIP in eval mode, on the CPU.

    The architecture comes from the stored config when there is one, else from tensor shapes; the
    `module.` / `_orig_mod.` prefixes of DDP / torch.compile are stripped. The activation is an explicit
    setting. A file that records it (the kit's model_config; OpenAI's archives, by their QuickGELU
    modules; open_clip hub files by open_clip_config.json beside them) is loaded with it, and quickgelu
    True / False against the record is an error naming both. A file that records none (a state dict,
    a bare safetensors file) is GELU unless quickgelu=True, which OpenAI-trained weights need.

    Security: torch.load runs with weights_only=True and safetensors holds only tensors. OpenAI's
    archives are TorchScript, which torch.jit.load would compile and run (a file from the internet
    could do anything then); the kit instead reads only their module tree and tensors with a restricted
    unpickler and refuses anything else, at the cost of handling only archives made of modules and
    tensors (every OpenAI CLIP archive is). The error for one it cannot read says how to convert it.
    """
    state_dict, stored = read_checkpoint(path)
    if stored is not None:
        config = CLIPConfig(**stored)
        check_activation(path, config.quickgelu, quickgelu)
    else:
        try:
            config = config_from_state_dict(state_dict, bool(quickgelu))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    model = CLIP(config)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict)
    return model.eval()
