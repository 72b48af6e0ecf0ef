"""Reading every CLIP checkpoint file users hold into the kit's CLIP (model.py), without running
code from it: the kit's ckpt.pt, open_clip training checkpoints and hub files (.bin, .safetensors),
OpenAI's TorchScript archives, and plain state dicts. The state-dict keys are those of OpenAI CLIP
and open_clip (github openai/CLIP clip/model.py; github mlfoundations/open_clip
src/open_clip/model.py), up to the prefixes DDP and torch.compile add. And the other way: a
checkpoint written as an open_clip hub folder, to share a model as people share CLIP models

  python checkpoints.py runs/pi/ckpt.pt --out hub/pi-vitb32   # open_clip_config.json + weights
"""
import argparse
import collections
import io
import json
import os
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from cli import UserError, run_cli, user_input
from data import CLIP_MEAN, CLIP_STD
from model import AUTHORS, CLIP, CLIPConfig

# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
# read_checkpoint tells the accepted files apart by their content, not their name:
#   torch.save files: the kit's {"state_dict", "model_config", ...training state}, open_clip
#     training checkpoints {"epoch", "name", "state_dict", ...}, raw state dicts (open_clip's hub
#     file open_clip_pytorch_model.bin, OpenAI / open_clip weights saved with torch.save);
#   safetensors files (open_clip's hub open_clip_model.safetensors, or any with these keys);
#   OpenAI's TorchScript archives (~/.cache/clip/ViT-B-32.pt), whose tensors are read without
#     running the archive (see _read_torchscript).
# The state dict keys are the same in all of them (OpenAI CLIP and open_clip name them alike), up
# to the prefixes below.

_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and by torch.compile
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
ACCEPTED = ("the kit's ckpt.pt, an open_clip checkpoint or hub file (.bin, .safetensors), OpenAI's "
            "TorchScript archive, a torch.save / safetensors state dict with OpenAI / open_clip "
            "keys, or a Lightning checkpoint of the PI authors' code (Brain_Initialization)")


class _ScriptObject:
    """Stands in for a TorchScript module while its pickle is read: keeps the attributes, runs
    nothing."""

    def __setstate__(self, state):
        self.state = state


class _TorchScriptReader(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl (the module tree and its tensors) with an allow-list:
    TorchScript classes become _ScriptObject, tensors are rebuilt from the archive's data/ entries,
    and any other global is refused (standard pickle "restricting globals"), so no code of the file
    runs."""

    def __init__(self, archive, prefix):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix, self.class_names = archive, prefix, set()

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            self.class_names.add(name)
            return type(name, (_ScriptObject,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return (lambda storage, offset, size, stride, *_:
                    storage.as_strided(size, stride, offset))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"it holds {module}.{name}, "
                                     "which is neither a module nor a tensor")

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
        raise ValueError(f"{path} is a TorchScript archive whose weights cannot be read without "
                         f"running it ({e}). If you trust it, convert it once (torch.jit.load runs "
                         "the archive's code): python -c \"import torch; "
                         f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), "
                         "'weights.pt')\" and load weights.pt") from None

    def tensors(obj, prefix=""):
        for name, value in (obj.state.items() if isinstance(getattr(obj, "state", None), dict)
                            else ()):
            if isinstance(value, torch.Tensor) and name != "attn_mask":  # a causal mask, no weight
                yield prefix + name, value
            elif isinstance(value, _ScriptObject):
                yield from tensors(value, f"{prefix}{name}.")

    names = reader.class_names
    return dict(tensors(root)), (True if "QuickGELU" in names
                                 else False if "GELU" in names else None)


def _is_torchscript(path):
    """A TorchScript archive (OpenAI's ViT-B-32.pt): a zip holding <name>/constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _is_safetensors(path):  # 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:] == b"{"
            and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _open_clip_hub_settings(path):
    """open_clip's hub repositories keep open_clip_config.json beside the weights: the settings it
    records that tensor shapes cannot tell (model_cfg.quick_gelu, text_cfg.no_causal_mask), or
    None when there is no such file."""
    config = Path(path).parent / "open_clip_config.json"
    if (Path(path).name not in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
            or not config.exists()):
        return None
    try:
        model_cfg = json.loads(config.read_text()).get("model_cfg", {})
        text_cfg = model_cfg.get("text_cfg", {})
        return {"quickgelu": bool(model_cfg.get("quick_gelu", False)),
                "text_attention": "bidirectional" if text_cfg.get("no_causal_mask") else "causal"}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config} (beside {path}) is not open_clip's config JSON: {e}") from None


def read_checkpoint(path):
    """Load any accepted checkpoint file (see above) without running code from it -> (clean state
    dict, model config dict the file records, else None). torch.load runs with weights_only=True; a
    TorchScript archive is read by _read_torchscript, never by torch.jit.load, which would compile
    and run its code."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hub = _open_clip_hub_settings(path)
    stored_config, quickgelu = None, hub and hub["quickgelu"]
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            obj = load_file(path)
        elif _is_torchscript(path):
            with zipfile.ZipFile(path) as archive:
                prefix = next(n for n in archive.namelist()
                              if n.endswith("/data.pkl")).rsplit("/", 1)[0]
                obj, quickgelu = _read_torchscript(archive, prefix, path)
        else:
            obj = _torch_load(path)
    except Exception as e:
        # A ValueError naming the file already says what to do.
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or another format?): "
                         f"{e}. Accepted: {ACCEPTED}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        stored_config = obj.get("model_config")
        obj = obj["state_dict"]
    if (not isinstance(obj, dict) or not obj
            or not all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path} holds no CLIP state dict (expected a dict of tensors, or one "
                         f"under 'state_dict'). Accepted: {ACCEPTED}")
    # The PI authors' names (their Lightning checkpoints): renamed, sized, checked.
    if _is_authors_layout(obj):
        return _read_authors(obj, path)
    state_dict = {}
    for key, value in obj.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        if key not in _OPENAI_SCALARS:
            state_dict[key] = value
    # The file records its activation (and a hub folder its text attention), not a config.
    if stored_config is None and quickgelu is not None:
        try:
            stored_config = asdict(config_from_state_dict(state_dict, quickgelu))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if hub:
            stored_config["text_attention"] = hub["text_attention"]
    return state_dict, stored_config


def _torch_load(path):
    """torch.load with weights_only=True. A Lightning checkpoint also holds what
    save_hyperparameters() kept (the PI authors': their config dataclasses), which weights_only
    refuses; each such class is then read as an inert stand-in (a class of ours with its name,
    holding attributes and running nothing), so the tensors load and no code named by the file
    runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise
    stand_ins = [type(name.rsplit(".", 1)[1], (_Inert,), {"__module__": name.rsplit(".", 1)[0]})
                 for name in names if "." in name]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


class _Inert:
    """Stands in for a class a checkpoint names outside its tensors: takes any arguments, runs
    nothing."""

    def __init__(self, *args, **kwargs):
        pass


# --------------------------------------------------------------------------------------------------
# The PI authors' checkpoints (github cheesepuff90/Brain_Initialization)
# --------------------------------------------------------------------------------------------------
# Their Lightning module holds their CLIP as `self.model` (src/lightning_module.py), so a
# checkpoint's state_dict keys are "model." + their module names (src/model.py):
# visual.{conv1, class_embedding, positional_embedding, ln_pre, ln_post, proj},
# visual.transformer.N.{norm1, attn.qkv, attn.proj, norm2, mlp.0, mlp.3} (mlp = Linear, GELU,
# Dropout, Linear, Dropout), text.{token_embedding, positional_embedding, ln_final,
# text_projection}, text.transformer.N.* like the vision blocks, and logit_scale. Their qkv Linear
# holds q, k, v in its rows in the order of nn.MultiheadAttention's in_proj_weight (its output is
# viewed as (3, heads, head width)), so every tensor moves unchanged: only the names change, and
# the model is the -authors preset's.
_AUTHORS_BLOCK = (("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"),
                  ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
                  ("norm2.", "ln_2."), ("mlp.0.", "mlp.c_fc."), ("mlp.3.", "mlp.c_proj."))
_AUTHORS_BLOCK_KEY = re.compile(r"(visual\.|text\.)transformer\.(\d+)\.(.+)")
_KIT_BLOCK_KEY = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")


# Their names of the tensors that fix every size.
_AUTHORS_SIZING = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                   "text.token_embedding.weight", "text.positional_embedding",
                   "text.text_projection")


def _is_authors_layout(state_dict):
    keys = [k.removeprefix("model.") for k in state_dict]
    return (any(k.startswith("text.") for k in keys)
            or any(_AUTHORS_BLOCK_KEY.fullmatch(k) for k in keys))


def _authors_to_kit(key):
    """A key in the PI authors' names -> the kit's: "model.text.transformer.3.mlp.0.weight" ->
    "transformer.resblocks.3.mlp.c_fc.weight"."""
    key = key.removeprefix("model.")
    block = _AUTHORS_BLOCK_KEY.fullmatch(key)
    if block:
        tower, index, rest = block.groups()
        rest = next((ours + rest[len(theirs):] for theirs, ours in _AUTHORS_BLOCK
                     if rest.startswith(theirs)), rest)
        return f"{'visual.' if tower == 'visual.' else ''}transformer.resblocks.{index}.{rest}"
    # The text tower's other modules sit at the top level of the kit's CLIP.
    return key.removeprefix("text.")


def _kit_to_authors(key):  # the inverse, for error messages in the file's own names
    block = _KIT_BLOCK_KEY.fullmatch(key)
    if block:
        tower, index, rest = block.groups()
        rest = next((theirs + rest[len(ours):] for theirs, ours in _AUTHORS_BLOCK
                     if rest.startswith(ours)), rest)
        return f"model.{'visual.' if tower else 'text.'}transformer.{index}.{rest}"
    return "model." + (key if key.startswith("visual.") or key == "logit_scale" else "text." + key)


def _read_authors(state_dict, path):
    """A state dict in the PI authors' names -> (the kit's state dict, the -authors model config as
    a dict). Sized from the tensors' shapes (any ViT width, depth, patch); every key the model needs
    and the file lacks, every key it has and the model does not, and every wrong shape is named in
    the file's names."""
    mapped = {_authors_to_kit(k): v for k, v in state_dict.items()}
    sizing = [f"model.{k}" for k in _AUTHORS_SIZING if _authors_to_kit(k) not in mapped]
    if sizing:
        raise ValueError(f"{path} has the PI authors' parameter names (Brain_Initialization's "
                         "CLIP) but lacks the tensors that size the model: missing keys "
                         f"({len(sizing)}): {sizing}. Pass the Lightning checkpoint (.ckpt) their "
                         "training wrote, unchanged.")
    config = CLIPConfig(**{**asdict(config_from_state_dict(mapped)), **AUTHORS})
    # The expected keys and shapes, without allocating or drawing weights.
    with torch.device("meta"):
        expected = CLIP(config).state_dict()
    # Keys named as the file names them, missing ones as it would.
    in_file = {_authors_to_kit(k): k for k in state_dict}
    problems = key_problems(expected, mapped, name=lambda k: in_file.get(k) or _kit_to_authors(k),
                            shown=8)
    if problems:
        raise ValueError(f"{path} has the PI authors' parameter names (Brain_Initialization's "
                         "CLIP) but is not a whole ViT CLIP of theirs: " + "; ".join(problems)
                         + ". Pass the Lightning checkpoint (.ckpt) their training wrote, "
                         "unchanged.")
    return mapped, asdict(config)


def _count_layers(state_dict, prefix):  # prefix "...resblocks." -> number of distinct block indices
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


# Head widths are not in any tensor's shape. open_clip's configs use 64 except for these ViT widths
# (model_configs/ViT-H-14.json head_width 80, ViT-g-14.json 88, ViT-bigG-14.json 104).
_VIT_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}


def _vision_config(state_dict):
    """The vision tower's CLIPConfig fields from tensor shapes: a ModifiedResNet when the state dict
    has an attention pool (OpenAI's build_model tells them apart the same way), else a ViT."""
    if "visual.attnpool.positional_embedding" in state_dict:
        required = ["visual.layer1.0.conv1.weight", "visual.attnpool.c_proj.weight"]
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"not a CLIP ResNet state dict: missing {missing}")
        # The first stage's bottleneck width.
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return dict(embed_dim=state_dict["visual.attnpool.c_proj.weight"].shape[0],
                    image_size=32 * grid, patch_size=None, vision_width=width,
                    vision_heads=32 * width // 64,  # open_clip: 64-wide heads
                    vision_layers=tuple(_count_layers(state_dict, f"visual.layer{k}.")
                                        for k in (1, 2, 3, 4)))
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP ViT or ResNet state dict: missing {missing}")
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(embed_dim=state_dict["visual.proj"].shape[1], image_size=patch_size * grid,
                patch_size=patch_size, vision_width=vision_width,
                vision_layers=_count_layers(state_dict, "visual.transformer.resblocks."),
                vision_heads=vision_width // _VIT_HEAD_WIDTH.get(vision_width, 64))


def config_from_state_dict(state_dict, quickgelu=False):
    """Infer a CLIPConfig from tensor shapes (head widths as open_clip's configs set them)."""
    vision = _vision_config(state_dict)
    required = ["token_embedding.weight", "positional_embedding", "text_projection"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP state dict: missing {missing}")
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    return CLIPConfig(
        **vision,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        text_width=text_width,
        text_layers=_count_layers(state_dict, "transformer.resblocks."),
        text_heads=text_width // 64,
        quickgelu=quickgelu,
    )


def optional_key(key):
    """BatchNorm's batch counter: only read when momentum is None (never in CLIP), and filled in by
    nn.BatchNorm's loader when a file lacks it."""
    return key.endswith(".num_batches_tracked")


def key_problems(expected, given, name=lambda key: key, shown=5):
    """What keeps state dict `given` from loading into one with `expected`'s keys and shapes: a list
    of "missing keys (n): [...]", "unexpected keys (n): [...]", "wrong shapes (n): [...]" (empty: it
    fits). Optional keys (optional_key) may be missing; `name` turns a key into the name the user's
    file uses."""
    missing = [name(k) for k in expected if k not in given and not optional_key(k)]
    unexpected = [name(k) for k in given if k not in expected]
    wrong = [f"{name(k)}: {tuple(given[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in given and given[k].shape != v.shape]
    return [f"{label} ({len(keys)}): {keys[:shown]}{' ...' if len(keys) > shown else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("wrong shapes", wrong))
            if keys]


def check_state_dict(model, state_dict, path="state dict"):
    """Raise one error listing every missing, unexpected and wrongly shaped key (no partial
    loads)."""
    problems = key_problems(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))


def check_activation(path, recorded, quickgelu):
    """Raise when a file records one activation and the caller asks for the other (quickgelu None:
    no ask)."""
    if quickgelu is not None and bool(quickgelu) != bool(recorded):
        name = {True: "QuickGELU", False: "GELU"}
        raise ValueError(f"{path} records the {name[bool(recorded)]} activation "
                         f"(quickgelu={bool(recorded)}), but {name[bool(quickgelu)]} was asked for "
                         f"(quickgelu={bool(quickgelu)}); weights run with the other activation "
                         "silently lose accuracy. Use the recorded one (drop the setting, or pick "
                         "the model preset with that activation, e.g. ViT-B-32-quickgelu).")


def load_checkpoint(path, quickgelu=None):
    """Any accepted CLIP checkpoint (see read_checkpoint) -> CLIP in eval mode, on the CPU.

    The architecture comes from the stored config when there is one, else from tensor shapes; the
    `module.` / `_orig_mod.` prefixes of DDP / torch.compile are stripped. The activation is an
    explicit setting. A file that records it (the kit's model_config; OpenAI's archives, by their
    QuickGELU modules; open_clip hub files by open_clip_config.json beside them) is loaded with it,
    and quickgelu True / False against the record is an error naming both. A file that records none
    (a state dict, a bare safetensors file) is GELU unless quickgelu=True, which OpenAI-trained
    weights need.

    Security: torch.load runs with weights_only=True and safetensors holds only tensors. OpenAI's
    archives are TorchScript, which torch.jit.load would compile and run (a file from the internet
    could do anything then); the kit instead reads only their module tree and tensors with a
    restricted unpickler and refuses anything else, at the cost of handling only archives made of
    modules and tensors (every OpenAI CLIP archive is). The error for one it cannot read says how to
    convert it.
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


def run_labels(paths):
    """Run names from checkpoint paths, for tables: the parent folder (runs/pi/ckpt.pt -> pi), else
    the file's stem; the full paths where those would collide."""
    labels = [Path(p).resolve().parent.name if Path(p).name == "ckpt.pt" else Path(p).stem
              for p in paths]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


# --------------------------------------------------------------------------------------------------
# Sharing a model as people share CLIP models: open_clip's hub layout
# --------------------------------------------------------------------------------------------------
#   python checkpoints.py runs/pi/ckpt.pt --out hub/pi-vitb32
# writes open_clip_config.json ({"model_cfg", "preprocess_cfg"}) beside open_clip_model.safetensors,
# what open_clip's hub repositories hold: open_clip.create_model_and_transforms("local-dir:DIR")
# loads the folder, "hf-hub:org/name" once it is uploaded (docs/evaluation.md), and CLIP_benchmark
# evaluates it through open_clip. The state-dict keys are open_clip's already.


def open_clip_config(config):
    """The kit's CLIPConfig -> open_clip's {"model_cfg", "preprocess_cfg"}. A setting open_clip's
    CLIP cannot express is refused, naming it: the PI authors' mean pooling of the text tower
    (open_clip pools the end-of-text token, the first, the last or none)."""
    if config.text_pooling != "eot":
        raise ValueError(f"text_pooling={config.text_pooling!r} (the PI authors' mean over the "
                         "caption's tokens) has no open_clip equivalent: its text towers pool "
                         "one token. This model cannot be shared in open_clip's layout")
    if config.resnet:
        vision = {"layers": list(config.vision_layers), "width": config.vision_width,
                  "head_width": config.vision_width * 32 // config.vision_heads}
    else:
        vision = {"layers": config.vision_layers, "width": config.vision_width,
                  "head_width": config.vision_width // config.vision_heads,
                  "patch_size": config.patch_size}
    text = {"context_length": config.context_length, "vocab_size": config.vocab_size,
            "width": config.text_width, "heads": config.text_heads, "layers": config.text_layers}
    if config.text_attention == "bidirectional":
        text["no_causal_mask"] = True
    model_cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.quickgelu,
                 "vision_cfg": {**vision, "image_size": config.image_size}, "text_cfg": text}
    preprocess_cfg = {"size": config.image_size, "mode": "RGB", "mean": list(CLIP_MEAN),
                      "std": list(CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def export_open_clip(path, folder, overwrite=False):
    """The CLIP of checkpoint `path` (any file load_checkpoint reads) as an open_clip hub folder
    -> the folder. An existing folder's files are replaced only with `overwrite`."""
    from safetensors.torch import save_file

    model = load_checkpoint(path)
    config = open_clip_config(model.config)
    folder = Path(folder)
    names = ("open_clip_config.json", "open_clip_model.safetensors")
    if any((folder / name).exists() for name in names) and not overwrite:
        raise UserError(f"{folder} already holds an exported model: choose another --out, or "
                        "replace it with --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / names[1], metadata={"format": "pt"})
    (folder / names[0]).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python checkpoints.py",
        description="Write a checkpoint as an open_clip hub folder (open_clip_config.json and "
                    "open_clip_model.safetensors), which open_clip loads with "
                    "create_model_and_transforms('local-dir:FOLDER') and, once uploaded, "
                    "'hf-hub:ORG/NAME' (docs/evaluation.md).")
    parser.add_argument("checkpoint", help="a run's ckpt.pt, or any file evaluate.py reads")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model a folder already holds")
    args = parser.parse_args(argv)
    with user_input():
        folder = export_open_clip(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {folder / 'open_clip_config.json'} and {folder / 'open_clip_model.safetensors'}")


if __name__ == "__main__":
    run_cli(main)
