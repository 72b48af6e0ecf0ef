"""CLIP, from scratch: a vision tower (a Vision Transformer, or OpenAI's ModifiedResNet), a causal
text transformer, and the two joined; as options, the PI authors' variant (bidirectional
mean-pooled text tower, their logit scale and init: preset ViT-B-32-authors), with OpenAI's CLIP
the default.

Read bottom-up: attention -> MLP -> residual block -> transformer -> vision transformer -> ResNet
(bottleneck -> attention pool -> ModifiedResNet) -> CLIP with its text tower (and stage 1's
perceptual distances) -> presets. The state-dict keys and shapes are exactly those of OpenAI CLIP
(github openai/CLIP, clip/model.py) and open_clip's `CLIP` class (github mlfoundations/open_clip,
src/open_clip/model.py), so a state dict moves between them unchanged. This file imports nothing
of the kit; checkpoints.py reads every checkpoint format users hold into it.

Letters used in shape comments:
  B batch, N tokens (patches + 1 class token, or text positions), D width of a tower,
  H attention heads, Dh = D / H width of one head, E joint embedding dim, T context length;
  in the ResNet: C channels, h x w the grid of a feature map.
"""
import collections
import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with. Loading those
    weights into a model with nn.GELU silently costs accuracy, so the choice is a recorded
    setting."""

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
        # (B, N, 3, H, Dh) -> 3 x (B, H, N, Dh)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
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
            [ResidualBlock(width, heads, QuickGELU() if quickgelu else nn.GELU())
             for _ in range(layers)]
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
        """OpenAI's normal init for the text transformer (github openai/CLIP clip/model.py,
        CLIP.initialize_parameters)."""
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def init_authors_(self, width, layers):
        """The PI authors' init of a transformer, either tower (DeCLIP-style: github
        cheesepuff90/Brain_Initialization src/model.py, initialize_parameters of VisionTransformer
        and TextTransformer): qkv N(0, width^-0.5), attention out-projection and MLP out
        N(0, width^-0.5 (2 layers)^-0.5), MLP in N(0, (2 width)^-0.5), as OpenAI's text init; their
        qkv and out-projection are nn.Linear, whose biases start at nn.Linear's default
        U(-width^-0.5, width^-0.5), where nn.MultiheadAttention's layout starts them at 0. The MLP
        biases are nn.Linear's default in both codes (drawn when the block was built)."""
        self.init_openai_(width, layers)
        bound = width**-0.5  # nn.Linear's bias bound 1 / sqrt(fan_in); fan_in = width for both
        for block in self.resblocks:
            nn.init.uniform_(block.attn.in_proj_bias, -bound, bound)
            nn.init.uniform_(block.attn.out_proj.bias, -bound, bound)


class VisionTransformer(nn.Module):
    """Image (B, 3, S, S) -> projected class-token feature (B, E), not normalised."""

    def __init__(self, image_size, patch_size, width, layers, heads, embed_dim, quickgelu):
        super().__init__()
        assert image_size % patch_size == 0, (
            f"image_size {image_size} is not a multiple of patch {patch_size}")
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


# --------------------------------------------------------------------------------------------------
# The other vision tower: OpenAI's ModifiedResNet (CLIP's RN50, RN101).
# It differs from torchvision's ResNet in three places: a stem of three 3x3 convolutions with an
# average pool instead of one 7x7 convolution with a max pool; strided blocks that average-pool
# before the 1x1 expansion instead of striding a convolution (anti-aliased downsampling, Zhang
# 2019); and an attention pool (one query: the mean of the grid) where torchvision has a global
# average pool.
# --------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> (2x2 average pool when strided) -> 1x1 expand to 4 x width, plus the
    input (average-pooled and 1x1-projected when its size or width differs). ReLU after each
    step."""

    def __init__(self, in_channels, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride > 1 or in_channels != 4 * width:
            # Keys "-1" (the pool, no parameters), "0" (conv) and "1" (norm), as OpenAI named them.
            self.downsample = nn.Sequential(collections.OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(in_channels, 4 * width, 1, bias=False)),
                ("1", nn.BatchNorm2d(4 * width)),
            ]))

    def forward(self, x):  # (B, C_in, h, w) -> (B, 4 width, h / stride, w / stride)
        # In place after BatchNorm (its backward does not need its output): one activation map
        # fewer each.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class AttentionPool(nn.Module):
    """(B, C, h, w) -> (B, E): the grid's mean, prepended as a token, attends over itself and the
    grid (with a learned positional embedding); its output, projected by c_proj, is the image
    feature."""

    def __init__(self, grid, channels, heads, embed_dim):
        super().__init__()
        assert channels % heads == 0, f"channels {channels} are not divisible by heads {heads}"
        self.heads = heads
        self.positional_embedding = nn.Parameter(
            torch.randn(grid * grid + 1, channels) / channels**0.5)
        self.k_proj = nn.Linear(channels, channels)
        self.q_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, embed_dim)

    def forward(self, x):
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        # (B, N, C), N = h*w + 1: the mean first
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)

        def heads(t):  # (B, n, C) -> (B, H, n, C / H)
            return t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)

        # One query (the mean) over all N keys: (B, H, 1, C/H)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).reshape(B, C))  # (B, H, 1, C/H) -> (B, C) -> (B, E)


@contextlib.contextmanager
def running_statistics_kept(module):
    """BatchNorm layers of `module` run as usual inside, and their running statistics (and batch
    counts) are put back on exit. Gradient checkpointing runs a block's forward a second time in
    backward; that run must not update the statistics a second time. (Switching the update off
    instead would change what batch_norm saves for backward, which checkpoint's recomputation
    check refuses.)"""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class ModifiedResNet(nn.Module):
    """Image (B, 3, S, S) -> attention-pooled feature (B, E), not normalised. `layers`: bottleneck
    blocks per stage (RN50: 3, 4, 6, 3); `width`: the stem's output channels (64), doubled by each
    stage's bottleneck width, so the last stage has 32 x width channels at S / 32 resolution."""

    def __init__(self, layers, width, heads, image_size, embed_dim):
        super().__init__()
        assert len(layers) == 4, f"a ModifiedResNet has 4 stages, got layers {layers}"
        assert image_size % 32 == 0, (f"image_size {image_size} is not a multiple of 32 "
                                      "(the ResNet's total stride)")
        self.grad_checkpointing = False
        # Stem: (B, 3, S, S) -> (B, width, S/4, S/4); the first convolution strides, the pool
        # halves again.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        # Stages 1-4: bottleneck widths width, 2 width, 4 width, 8 width; stages 2-4 halve the grid.
        channels, stages = width, []
        for k, blocks in enumerate(layers):
            stage_width = width * 2**k
            stage = [Bottleneck(channels, stage_width, stride=1 if k == 0 else 2)]
            stage += [Bottleneck(4 * stage_width, stage_width, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = 4 * stage_width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool(image_size // 32, channels, heads, embed_dim)
        # OpenAI's init (github openai/CLIP clip/model.py, CLIP.initialize_parameters): normal
        # projections of std C^-0.5 in the pool, and each block's last norm gain at 0, so every
        # block starts as the identity on its shortcut.
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj,
                     self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=channels**-0.5)
        for stage in self.stages():
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, images):
        x = F.relu(self.bn1(self.conv1(images)), inplace=True)  # (B, width/2, S/2, S/2)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x)), inplace=True))  # (B, width, S/4, S/4)
        for stage in self.stages():  # -> (B, 4 width, S/4, S/4) ... (B, 32 width, S/32, S/32)
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    # As the transformer's blocks; the recomputation keeps BatchNorm's statistics.
                    x = checkpoint(block, x, use_reentrant=False,
                                   context_fn=lambda b=block: (contextlib.nullcontext(),
                                                               running_statistics_kept(b)))
                else:
                    x = block(x)
        return self.attnpool(x)  # (B, E)


@dataclass
class CLIPConfig:
    """Every number that fixes a CLIP's architecture. Heads are 64 wide in every preset but
    ViT-H-14's (80; a ResNet's pool has 32 x vision_width / 64 heads), open_clip's head widths,
    which is what lets checkpoints.config_from_state_dict infer them from shapes.

    The fields from text_attention on set how the text tower reads a caption, where training
    starts and where the logit scale is capped. OpenAI's CLIP is the default; the "-authors"
    presets set them as the PI authors' code builds and trains its model (github
    cheesepuff90/Brain_Initialization src/model.py, config/modelconfig/vit_b_32.json,
    src/loss.py). None changes a state-dict key or shape, so a checkpoint loads into either; only
    the outputs differ."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int | None = 32  # None for a ResNet, which has no patches
    # ViT: token width; ResNet: the stem's channels (its last stage has 32x).
    vision_width: int = 768
    # ViT: its blocks. A tuple of 4, blocks per stage, makes the tower a ModifiedResNet (as in
    # OpenAI's build_model).
    vision_layers: int | tuple = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # Activation: QuickGELU (OpenAI weights) or nn.GELU (open_clip "ViT-B-32").
    quickgelu: bool = False
    # How the text tower reads a caption, and where training starts (see the docstring).
    # "causal": each position sees itself and earlier ones (OpenAI) | "bidirectional"
    text_attention: str = "causal"
    # "eot": the end-of-text token's output (OpenAI) | "mean": over ids != text_pad_id
    text_pooling: str = "eot"
    # The id "mean" leaves out: 0 pads open_clip's / the kit's token ids (the authors' pad_id).
    text_pad_id: int = 0
    # ln of the starting logit scale: OpenAI's temperature 0.07.
    init_logit_scale: float = math.log(1 / 0.07)
    # "openai" | "authors" (DeCLIP-style standard deviations: CLIP.init_authors_)
    init: str = "openai"
    # Where the logit scale is capped at 100. "parameter" (OpenAI, open_clip): the trainer clamps
    # the parameter to [0, ln 100] after each step, so a scale pushed to the cap can come back.
    # "loss" (the PI authors' github cheesepuff90/Brain_Initialization src/loss.py:285): forward
    # hands the loss min(exp(logit_scale), 100) and nothing clamps the parameter; above ln 100 the
    # cap passes no gradient, so a scale that crosses it stays at 100.
    logit_scale_clamp: str = "parameter"

    def __post_init__(self):
        """A misspelt option would silently build OpenAI's model: refuse it, naming the field."""
        choices = {"text_attention": ("causal", "bidirectional"), "text_pooling": ("eot", "mean"),
                   "init": ("openai", "authors"), "logit_scale_clamp": ("parameter", "loss")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model setting {name}={getattr(self, name)!r} "
                                 f"is not one of {allowed}")
        if isinstance(self.vision_layers, list):  # read back from JSON
            self.vision_layers = tuple(self.vision_layers)
        sizes = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_heads",
                 "context_length", "vocab_size", "text_width", "text_layers", "text_heads")
        for name in sizes:  # a size of 0 or less builds nothing sensible, or fails deep in torch
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"model setting {name}={value!r} must be a whole number >= 1")
        layers = self.vision_layers if self.resnet else (self.vision_layers,)
        if any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"model setting vision_layers={self.vision_layers!r} must be >= 1 "
                             "(a ViT's blocks, or a ResNet's four stages)")
        if self.init == "authors" and self.resnet:  # their src/model.py draws a ViT's weights only
            raise ValueError("model setting init='authors' is defined for a ViT tower "
                             "(the PI authors' src/model.py); a ResNet tower keeps OpenAI's init")

    @property
    def resnet(self):
        return isinstance(self.vision_layers, tuple)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = self.config = config
        # A ResNet's activation is ReLU whatever quickgelu says: quickgelu is then the text tower's.
        if c.resnet:
            self.visual = ModifiedResNet(c.vision_layers, c.vision_width, c.vision_heads,
                                         c.image_size, c.embed_dim)
        else:
            self.visual = VisionTransformer(
                c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_heads,
                c.embed_dim, c.quickgelu
            )
        # The text tower's modules sit at the top level (no `text.` prefix), as in OpenAI's CLIP.
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quickgelu,
                                       causal=c.text_attention == "causal")
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        # Used as exp(): OpenAI's starts at 1 / 0.07.
        self.logit_scale = nn.Parameter(torch.tensor(c.init_logit_scale))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)
        self.transformer.init_openai_(c.text_width, c.text_layers)
        # Drawn after OpenAI's init, so OpenAI's draws (and models) stay as they were.
        if c.init == "authors":
            self.init_authors_()

    def init_authors_(self):
        """Every weight as the PI authors' code draws it (github cheesepuff90/Brain_Initialization
        src/model.py: VisionTransformer.__init__ / initialize_parameters,
        TextTransformer.initialize_parameters). Vision: class embedding N(0, 1) (torch.randn, where
        OpenAI scales it by width^-0.5), positional embedding N(0, 0.01), projection
        N(0, width^-0.5), blocks by Transformer.init_authors_; the patch convolution keeps
        PyTorch's default in both codes. Text: token embedding N(0, 0.02), positional embedding
        N(0, 0.01), projection N(0, width^-0.5) (OpenAI's values too), blocks by
        Transformer.init_authors_."""
        c, visual = self.config, self.visual
        nn.init.normal_(visual.class_embedding, std=1.0)
        nn.init.normal_(visual.positional_embedding, std=0.01)
        nn.init.normal_(visual.proj, std=c.vision_width**-0.5)
        visual.transformer.init_authors_(c.vision_width, c.vision_layers)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)
        self.transformer.init_authors_(c.text_width, c.text_layers)

    def set_grad_checkpointing(self, enable=True):
        (self.visual if self.config.resnet else self.visual.transformer).grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):  # (B, 3, S, S) -> (B, E), unit length
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens):  # (B, T) int64 -> (B, E), unit length
        x = (self.token_embedding(tokens)
             + self.positional_embedding.to(self.token_embedding.weight.dtype))  # (B, T, D)
        x = self.ln_final(self.transformer(x))  # (B, T, D)
        if self.config.text_pooling == "mean":
            # The authors' pooling: the mean over the positions whose id is not the pad id. With
            # the kit's zero-padded ids that is the caption's own tokens (start, words, end); ids
            # padded with EOT (49407, as Hugging Face's CLIP tokenizer pads) are averaged over all
            # T positions. The clamp makes an all-pad row 0, not NaN.
            keep = (tokens != self.config.text_pad_id).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            x = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)  # (B, D)
        else:
            # Pool at the end-of-text token. argmax finds it because EOT (49407) is the largest id
            # in CLIP's vocabulary and every tokenised text holds one (the first, if padded with
            # EOT).
            x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, D)
        return F.normalize(x @ self.text_projection, dim=-1)

    def forward(self, images, tokens):
        """-> (image features (B, E), text features (B, E), the logit scale the loss uses)."""
        logit_scale = self.logit_scale.exp()
        if self.config.logit_scale_clamp == "loss":  # the authors' src/loss.py:285
            logit_scale = torch.clamp(logit_scale, max=100)
        return self.encode_image(images), self.encode_text(tokens), logit_scale

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------------
# Presets (numbers from open_clip's model_configs/*.json; heads = width / head width, 64 unless
# noted)
# --------------------------------------------------------------------------------------------------

_B = dict(embed_dim=512, vision_width=768, vision_layers=12, vision_heads=12,
          text_width=512, text_layers=12, text_heads=8)
PRESETS = {
    "ViT-B-32": dict(_B, patch_size=32),
    "ViT-B-32-quickgelu": dict(_B, patch_size=32, quickgelu=True),
    "ViT-B-16": dict(_B, patch_size=16),
    "ViT-L-14": dict(
        embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        text_width=768, text_layers=12, text_heads=12,
    ),
    # ViT-H-14.json: head_width 80, so 16 vision heads (not width / 64).
    "ViT-H-14": dict(
        embed_dim=1024, patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16,
        text_width=1024, text_layers=24, text_heads=16,
    ),
    # RN50.json / RN101.json: layers [3, 4, 6, 3] / [3, 4, 23, 3], width 64, patch_size null;
    # heads = 32 x width / 64 (open_clip's model.py, vision_heads); embed_dim 1024 / 512;
    # ViT-B-32's text tower.
    "RN50": dict(_B, embed_dim=1024, patch_size=None, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_heads=32),
    "RN50-quickgelu": dict(_B, embed_dim=1024, patch_size=None, vision_layers=(3, 4, 6, 3),
                           vision_width=64, vision_heads=32, quickgelu=True),
    "RN101": dict(_B, patch_size=None, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_heads=32),
    "RN101-quickgelu": dict(_B, patch_size=None, vision_layers=(3, 4, 23, 3), vision_width=64,
                            vision_heads=32, quickgelu=True),
    # CPU presets. `tiny` is for tests (~7.6M parameters, 6.3M of them the token table); `small`
    # for the embedded default (64 px, measured at ~50-150 img/s on 2 cores).
    "tiny": dict(
        embed_dim=64, image_size=32, patch_size=8, vision_width=128, vision_layers=2,
        vision_heads=2, text_width=128, text_layers=2, text_heads=2,
    ),
    # `tiny-rn`: a ModifiedResNet of one block per stage at 64 px (grid 2 x 2 under the pool), for
    # tests.
    "tiny-rn": dict(
        embed_dim=64, image_size=64, patch_size=None, vision_width=16, vision_layers=(1, 1, 1, 1),
        vision_heads=8, text_width=128, text_layers=2, text_heads=2,
    ),
    "small": dict(
        embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6,
        vision_heads=4, text_width=256, text_layers=6, text_heads=4,
    ),
}
# The PI authors' model as their code builds it (github cheesepuff90/Brain_Initialization
# src/model.py with config/modelconfig/vit_b_32.json; read, not run). Their text tower builds a
# causal mask and never passes it to the blocks (bidirectional attention); it pools the mean over
# ids != text_cfg.pad_id (0), not the EOT token (the json's "pool_type": "argmax" is never read);
# the json's init_logit_scale is 4.60517 = ln(100); their init is DeCLIP's (CLIP.init_authors_);
# quick_gelu false (nn.GELU); the logit scale is capped inside the loss (src/loss.py:285), the
# parameter never clamped. The unused mask looks like a mistake: it is reproduced here only as
# an option, so that their numbers can be reproduced and the difference measured.
AUTHORS = dict(text_attention="bidirectional", text_pooling="mean", text_pad_id=0,
               init_logit_scale=4.60517, init="authors", logit_scale_clamp="loss")
PRESETS["ViT-B-32-authors"] = dict(PRESETS["ViT-B-32"], **AUTHORS)
PRESETS["tiny-authors"] = dict(PRESETS["tiny"], **AUTHORS)  # tests and the demo's authors' arms


def model_config(name="ViT-B-32", **overrides):
    """A preset's CLIPConfig, with fields overridden (e.g. image_size=64). Unknown names are
    errors."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    known = {f.name for f in fields(CLIPConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return CLIPConfig(**{**PRESETS[name], **overrides})


def parse_settings(text):
    """The trainers' `model_settings` ("init_logit_scale=2.6593,context_length=16") -> {field:
    value}, each value converted to its CLIPConfig field's type: settings over a preset, for an
    ablation one setting at a time without a preset of its own. An unknown field or a value of the
    wrong type is an error naming it."""
    kinds = {f.name: f.type for f in fields(CLIPConfig)}
    convert = {"int": int, "float": float, "str": str,
               "bool": lambda v: {"true": True, "false": False}[v.lower()]}
    settings = {}
    for item in [i.strip() for i in text.split(",") if i.strip()]:
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or name not in kinds:
            raise ValueError(f"model_settings: {item!r} is not NAME=VALUE with NAME a model "
                             f"setting; known: {sorted(kinds)}")
        kind = getattr(kinds[name], "__name__", str(kinds[name]))
        if kind not in convert:
            raise ValueError(f"model_settings: {name} ({kind}) cannot be set here; use a preset")
        try:
            settings[name] = convert[kind](value)
        except (KeyError, ValueError):
            raise ValueError(f"model_settings: {name}={value!r} is not a {kind}") from None
    return settings


def create_model(name="ViT-B-32", **overrides):
    """A randomly initialised CLIP from a preset name, a CLIPConfig, or a dict of CLIPConfig
    fields."""
    if isinstance(name, CLIPConfig):
        config = CLIPConfig(**{**asdict(name), **overrides})
    elif isinstance(name, dict):
        config = CLIPConfig(**{**name, **overrides})
    else:
        config = model_config(name, **overrides)
    return CLIP(config)
