"""TransReID-style ViT backbone used by DPM and the ViT baseline (official vit_pytorch.py).

Differences from a plain timm ViT, all taken from TransReID / DPM:

* overlapping patch embedding: ``Conv2d(3, C, kernel=patch, stride=s)`` with ``s < patch``
  (11 for Occluded-Duke, 12 elsewhere), giving a ``(num_y, num_x)`` grid that is stored
  explicitly instead of being guessed from the token count;
* a camera "side information embedding" ``sie_embed[cam]`` scaled by ``sie_coef`` (λ = 3) and
  added to every token, CLS included, at train and test time;
* attention goes through ``F.scaled_dot_product_attention``; the pre-softmax CLS-query ->
  patch-key logits HEM needs are computed apart (``q_cls · Kᵀ · scale``) and only when asked for.

Parameter names follow timm 0.4.x (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so ImageNet ViT
checkpoints load by name (see ``weights.py``).
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import (
    MAX_COEFFICIENT,
    MAX_IMAGE_SIDE,
    check_camera_ids,
    check_choice,
    check_flag,
    check_images,
    check_int,
    check_int_list,
    check_real,
    check_weights,
    quote,
)

# Bounds of ViTReID's sizes, far above the ViTs in use, that keep a model's build short: depth 10^9 built
# blocks until the OOM killer ended the process. MAX_WEIGHTS (_checks.py) bounds their product.
MAX_DEPTH = 64  # blocks: ViT-B has 12, ViT-L 24, ViT-22B 48
MAX_EMBED_DIM = 16384  # ViT-B: 768, ViT-22B: 6144
MAX_MLP_RATIO = 64.0  # ViT's is 4
# patch tokens, which attention compares pairwise (time and memory grow with their square): DPM's 256 x 128
# at stride 11 gives 242, a 2048 x 2048 image at patch 16, stride 16 gives 16384
MAX_PATCHES = 16384


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def patch_grid(img_size: Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
    """(num_y, num_x) of the patches a ``patch_size`` conv at ``stride`` takes from an image."""
    height, width = img_size
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


class OverlappingPatchEmbed(nn.Module):
    """``Conv2d(3, C, patch, stride)``: stride < patch makes neighbouring patches overlap."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = tuple(img_size)  # at least patch_size each: ViTReID's check_vit_options
        self.grid_size = patch_grid(img_size, patch_size, stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images("images", images, self.img_size, self.proj.weight.dtype)
        # (B, C, num_y, num_x) -> (B, N, C), row-major: token n sits at (n // num_x, n % num_x).
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads  # dividing dim: ViTReID's check_vit_options
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_cls_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        cls_logits = None
        if return_cls_logits:
            # The fused attention never materialises the logits, so the one row HEM needs is
            # recomputed here: pre-softmax, already scaled, CLS key excluded -> (B, heads, N).
            cls_logits = (q[:, :, :1] @ k[:, :, 1:].transpose(-2, -1)).squeeze(2) * self.scale
        return out, cls_logits


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_cls_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn_out, cls_logits = self.attn(self.norm1(x), return_cls_logits)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, cls_logits


class ViTFeatures(NamedTuple):
    cls_feature: torch.Tensor  # (B, C): final-LayerNorm CLS token
    tapped_tokens: list[torch.Tensor]  # per requested block: (B, N, C) pre-LN residual patch tokens
    cls_logits: Optional[torch.Tensor]  # (B, heads, N) last block's CLS->patch logits, if asked


def check_vit_options(
    model: str,
    *,
    img_size,
    patch_size,
    stride,
    in_chans,
    embed_dim,
    depth,
    num_heads,
    mlp_ratio,
    qkv_bias,
    drop_path_rate,
    norm_eps,
    num_cameras,
    sie_coef,
) -> float:
    """ValueError naming the first of ViTReID's options out of range (``model`` prefixes the message), else the
    backbone's weight count estimated from them."""
    patch_size = check_int(model, "patch_size", patch_size, 1, MAX_IMAGE_SIDE)
    # stride > patch_size would skip pixels between patches: TransReID's patches touch or overlap
    stride = check_int(model, "stride", stride, 1, patch_size, why=" (at most patch_size)")
    img_size = check_int_list(
        model, "img_size", img_size, patch_size, MAX_IMAGE_SIDE, length=2, why=" ([height, width], at least patch_size)"
    )
    grid = patch_grid(img_size, patch_size, stride)
    if grid[0] * grid[1] > MAX_PATCHES:
        raise ValueError(
            f"{model}: img_size {img_size} at patch_size {patch_size}, stride {stride} gives {grid[0]}x{grid[1]} = "
            f"{grid[0] * grid[1]} patches; at most {MAX_PATCHES} (attention compares every pair; a larger stride "
            "gives fewer)"
        )
    # the data pipeline and every pretrained patch conv are RGB
    check_choice(model, "in_chans", in_chans, (3,), why=" (the images are RGB)")
    embed_dim = check_int(model, "embed_dim", embed_dim, 1, MAX_EMBED_DIM)
    depth = check_int(model, "depth", depth, 1, MAX_DEPTH)
    check_int(
        model, "num_heads", num_heads, 1, why=f" dividing embed_dim = {embed_dim}", holds=lambda n: embed_dim % n == 0
    )
    # int(embed_dim * mlp_ratio) is the MLP's hidden width: at least one unit
    why = f" (1 / embed_dim, embed_dim = {embed_dim}: a hidden width embed_dim * mlp_ratio of at least 1)"
    mlp_ratio = check_real(model, "mlp_ratio", mlp_ratio, 1 / embed_dim, MAX_MLP_RATIO, why=why)
    check_flag(model, "qkv_bias", qkv_bias)
    # the deepest block drops its branch with this probability: 1 would divide by a keep rate of 0
    check_real(model, "drop_path_rate", drop_path_rate, 0, 1, high_open=True, why=" (a probability)")
    check_real(model, "norm_eps", norm_eps, 0, low_open=True, why=" (LayerNorm divides by sqrt(var + eps))")
    check_int(model, "num_cameras", num_cameras, 0, why=" (0 or 1: no camera embedding)")
    check_real(model, "sie_coef", sie_coef, 0, MAX_COEFFICIENT, why=" (the camera embedding's weight; 0: unused)")
    # the blocks' attention (4 C^2) and MLP (2 mlp_ratio C^2), the patch projection, the position embedding and the
    # camera embedding (10^8 cameras allocated 12.8 GB zeros before anything said no)
    weights = embed_dim * (
        depth * embed_dim * (4 + 2 * mlp_ratio) + 3 * patch_size**2 + grid[0] * grid[1] + 1 + num_cameras
    )
    source = f"embed_dim = {embed_dim}, depth = {depth}, mlp_ratio = {mlp_ratio:g}, patch_size = {patch_size}"
    return check_weights(model, weights, f"{source}, {grid[0]}x{grid[1]} patches and {num_cameras} cameras")


def checked_vit_options(model: str, **options) -> tuple[dict, float]:
    """ViTReID's keyword options with its defaults filled in, and the backbone's estimated weight count, after
    check_vit_options: what a model built on ViTReID checks before allocating anything. An unknown option is a TypeError, as in the
    constructor, naming the model and the backbone's options (bind's own named neither)."""
    try:
        bound = inspect.signature(ViTReID).bind(**options)
    except TypeError as error:
        known = ", ".join(inspect.signature(ViTReID).parameters)
        raise TypeError(f"{model}: {error} (the backbone's options: {known})") from None
    bound.apply_defaults()
    return bound.arguments, check_vit_options(model, **bound.arguments)


class ViTReID(nn.Module):
    """TransReID ViT (no JPM, no distillation token, camera-only SIE).

    Defaults are ViT-B/16 at 256x128 with stride 11 (Occluded-Duke); every size is an option so
    tests and benchmarks can build tiny configurations.
    """

    def __init__(
        self,
        img_size: Sequence[int] = (256, 128),
        patch_size: int = 16,
        stride: int = 11,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        num_cameras: int = 0,
        sie_coef: float = 3.0,
    ):
        check_vit_options(
            "vit",
            img_size=img_size,
            patch_size=patch_size,
            stride=stride,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            num_cameras=num_cameras,
            sie_coef=sie_coef,
        )
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = OverlappingPatchEmbed(tuple(img_size), patch_size, stride, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        # TransReID creates the camera embedding only for more than one camera.
        self.num_cameras = num_cameras if num_cameras > 1 else 0
        self.sie_coef = sie_coef
        self.sie_embed = nn.Parameter(torch.zeros(self.num_cameras, 1, embed_dim)) if self.num_cameras else None
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, qkv_bias, norm_eps) for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TransReID init: trunc_normal(.02) (timm's absolute ±2 cut) for Linear weights and the
        token embeddings, zero Linear biases, LayerNorm (1, 0), patch conv N(0, sqrt(2/(k·k·C)))."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        fan_out = proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels
        nn.init.normal_(proj.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.sie_embed is not None:
            nn.init.trunc_normal_(self.sie_embed, std=0.02)

    def embed(self, images: torch.Tensor, cam_label: Optional[torch.Tensor]) -> torch.Tensor:
        patches = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = x + self.pos_embed
        if self.sie_embed is not None:
            check_camera_ids(
                cam_label, images.shape[0], self.num_cameras, images.device
            )  # shape[0]: a SymInt in export
            x = x + self.sie_coef * F.embedding(cam_label, self.sie_embed.flatten(1)).unsqueeze(1)
        return x

    def forward_features(
        self,
        images: torch.Tensor,
        cam_label: Optional[torch.Tensor] = None,
        tap_blocks: Sequence[int] = (),
        return_cls_logits: bool = False,
    ) -> ViTFeatures:
        """Run the ViT, keeping the pre-LN patch tokens after the 0-based blocks in ``tap_blocks``
        and, if asked, the last block's CLS->patch attention logits."""
        last = len(self.blocks) - 1
        if not isinstance(tap_blocks, (list, tuple)):  # an iterator was used up by the range check: no tokens
            raise ValueError(
                f"tap_blocks must be a list or tuple of block indices in [0, {last}], got {quote(tap_blocks)}"
            )
        tap_blocks = check_int_list(None, "tap_blocks", tap_blocks, 0, last) if tap_blocks else ()
        return_cls_logits = check_flag(None, "return_cls_logits", return_cls_logits)
        x = self.embed(images, cam_label)
        tapped = {}
        cls_logits = None
        for index, block in enumerate(self.blocks):
            x, logits = block(x, return_cls_logits and index == last)
            if logits is not None:
                cls_logits = logits
            if index in tap_blocks:
                tapped[index] = x[:, 1:]
        return ViTFeatures(self.norm(x)[:, 0], [tapped[i] for i in tap_blocks], cls_logits)

    def forward(self, images: torch.Tensor, cam_label: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_features(images, cam_label).cls_feature
