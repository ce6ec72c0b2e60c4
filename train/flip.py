"""FLIP-style masked image-encoder training (architecture.md §4.1): drop patches, encode the rest, CLIP loss.

FLIP trains a CLIP image tower on a random subset of its patch tokens: fewer tokens through the
blocks means a cheaper step (3.7x at 75% masking in the paper), at little accuracy cost once the
model is evaluated unmasked. The runtime :class:`~edgevlm.runtime.vision.vit.ViT` is reused as is;
the dropping sits between ``vit.embed`` and ``vit.blocks``::

    pixels [N, 3, H, W] -> vit.embed -> [N, 1 + L, W] (class token first, positions already added)
        -> random_keep -> [N, 1 + K, W],  K = int(L * (1 - mask_ratio))
        -> vit.blocks -> vit.norm (if any) -> mean over tokens (FLIP's img_avg_token) -> [N, W]

Differences from FLIP's JAX code, neither of which changes what the blocks compute: the class token
gets its position before masking (the runtime table has a class slot; FLIP prepends it unpositioned
after masking), and the kept ids are sorted (raster order) where FLIP keeps them shuffled; attention
without a mask is permutation-equivariant and the mean is order-free.

``--mask-ratio`` (``mask_ratio``): the fraction of *patch* tokens dropped per image, in [0, 1).
0.5 is FLIP's default, 0.75 its fastest studied setting; 0 disables masking, which is FLIP's
"unmasked tuning" phase and what inference always uses. The class token is never dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgevlm.config import ViTConfig, to_dict
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.vision.vit import ViT

from .qformer_pretrain import ByteTokenizer

DEFAULT_MASK_RATIO = 0.5


def check_mask_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not (isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio < 1.0):
        raise ConfigError(f"mask_ratio must be in [0, 1) (fraction of patches dropped), got {mask_ratio!r}")
    return float(mask_ratio)


def random_keep(tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None, *,
                class_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random ``K = int(L * (1 - mask_ratio))`` of the ``L`` patch tokens of each image.

    ``tokens [N, 1 + L, C]`` (class token first; pass ``class_token=False`` for ``[N, L, C]``) ->
    ``kept [N, 1 + K, C]`` (class token first, then the kept patches in ascending patch order) and
    ``ids_keep [N, K]`` (patch indices 0..L-1, unique, sorted ascending per row).
    The subset is FLIP's: argsort of uniform noise, first K. Same generator state -> same subset.
    """
    check_mask_ratio(mask_ratio)
    if tokens.ndim != 3:
        raise ShapeError(f"expected tokens [N, T, C], got {tuple(tokens.shape)}")
    n, t, c = tokens.shape
    n_cls = int(class_token)
    length = t - n_cls
    keep = int(length * (1 - mask_ratio))  # FLIP's len_keep (floors)
    if n_cls + keep == 0:
        raise ShapeError(f"mask_ratio {mask_ratio} keeps no token of {length} patches and there is no class token")
    dev = generator.device if generator is not None else tokens.device
    noise = torch.rand(n, length, generator=generator, device=dev).to(tokens.device)  # [N, L]
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # [N, K]
    patches = tokens[:, n_cls:].gather(1, ids_keep[..., None].expand(-1, -1, c))  # [N, K, C]
    return torch.cat([tokens[:, :n_cls], patches], dim=1), ids_keep


def masked_encode(vit: ViT, pixels: torch.Tensor, mask_ratio: float = DEFAULT_MASK_RATIO,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """pixels ``[N, 3, H, W]`` -> image embedding ``[N, width]``: mean of the block outputs of the kept
    tokens (class token included). With ``mask_ratio=0`` this is ``vit(pixels).mean(1)`` for a ViT that
    keeps its class token."""
    x = vit.embed(pixels)  # [N, 1 + L, W]
    x, _ = random_keep(x, mask_ratio, generator, class_token=vit.cls_token is not None)  # [N, 1 + K, W]
    for blk in vit.blocks:
        x = blk(x)
    if vit.norm is not None:
        x = vit.norm(x)
    return x.mean(dim=1)


class ByteTextEncoder(nn.Module):
    """Tiny text tower: byte embeddings + learned positions -> pre-norm transformer -> masked mean -> proj.

    ``forward(ids [N, T], valid [N, T] bool) -> [N, out_dim]``. Enough to give the contrastive loss a
    trainable partner; a real run would use a CLIP text tower.
    """

    def __init__(self, out_dim: int, width: int = 64, layers: int = 1, heads: int = 2, max_len: int = 32):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(ByteTokenizer.vocab_size, width)
        self.pos_emb = nn.Parameter(torch.randn(max_len, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_len:
            raise ShapeError(f"text of {t} tokens exceeds max_len {self.max_len}")
        x = self.tok_emb(ids) + self.pos_emb[:t]  # [N, T, width]
        x = self.norm(self.blocks(x, src_key_padding_mask=~valid.bool()))  # padding mask: True = ignore
        w = valid.to(x.dtype)[..., None]  # [N, T, 1]
        return self.proj((x * w).sum(1) / w.sum(1).clamp(min=1))  # [N, out_dim]


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch: pair i is the positive for row i and column i.
    ``logit_scale`` is log(1 / temperature), capped at log(100) as in CLIP so the logits stay bounded."""
    img = F.normalize(image_emb, dim=-1)  # [N, D]
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()  # [N img, N txt]
    target = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class FLIPModel(nn.Module):
    """Runtime ViT + linear image projection + :class:`ByteTextEncoder` + learnable temperature."""

    def __init__(self, vit_cfg: ViTConfig, *, embed_dim: int = 64, text_width: int = 64, max_text_len: int = 32):
        super().__init__()
        self.tokenizer = ByteTokenizer()
        self.max_text_len = max_text_len
        self.vit = ViT(vit_cfg)
        with torch.no_grad():  # the runtime leaves these zero (they are loaded); training needs them random
            nn.init.normal_(self.vit.pos_embed, std=0.02)
            if self.vit.cls_token is not None:
                nn.init.normal_(self.vit.cls_token, std=0.02)
        self.image_proj = nn.Linear(vit_cfg.width, embed_dim)
        self.text = ByteTextEncoder(embed_dim, width=text_width, max_len=max_text_len)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init: temperature 0.07

    def forward(self, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                mask_ratio: float = DEFAULT_MASK_RATIO, generator: torch.Generator | None = None) -> torch.Tensor:
        img = self.image_proj(masked_encode(self.vit, pixels, mask_ratio, generator))  # [N, D]
        return clip_loss(img, self.text(text_ids, text_mask), self.logit_scale)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer.encode(captions, self.max_text_len)


def flip_step(model: FLIPModel, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, *, mask_ratio: float = DEFAULT_MASK_RATIO,
              generator: torch.Generator | None = None) -> float:
    """One optimizer step on the masked contrastive loss; returns the loss before the update."""
    model.train()
    loss = model(pixels, text_ids, text_mask, mask_ratio, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def run(vit_cfg: ViTConfig, pixels: torch.Tensor, captions: list[str], *, mask_ratio: float = DEFAULT_MASK_RATIO,
        steps: int = 100, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
        out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train on ``pixels [M, 3, H, W]`` + ``captions [M]``; batch and mask draws are seeded by ``(seed, step)``.
    With ``out_dir`` writes ``vit.safetensors`` (runtime ViT keys, config in the metadata) atomically."""
    check_mask_ratio(mask_ratio)
    if len(captions) != pixels.shape[0]:
        raise ShapeError(f"{pixels.shape[0]} images but {len(captions)} captions")
    torch.manual_seed(seed)
    model = FLIPModel(vit_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    history = []
    for step in (bar := tqdm(range(steps), desc=f"flip mask {mask_ratio:.2f}", disable=not progress)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randperm(pixels.shape[0], generator=g)[:batch_size]
        ids, valid = model.tokenize([captions[i] for i in idx.tolist()])
        history.append(flip_step(model, opt, pixels[idx], ids, valid, mask_ratio=mask_ratio, generator=g))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    if out_dir is not None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".vit.safetensors.tmp"
        save_file({k: v.detach().contiguous() for k, v in model.vit.state_dict().items()}, str(tmp),
                  metadata={"format": "pt", "vit_config": json.dumps(to_dict(vit_cfg)), "mask_ratio": str(mask_ratio)})
        os.replace(tmp, out / "vit.safetensors")
    return {"model": model, "history": history}


def _ratio(text: str) -> float:
    try:
        return check_mask_ratio(float(text))
    except (ValueError, ConfigError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """``edgevlm train flip --images P.safetensors --captions C.txt --out DIR [--mask-ratio 0.5]``.

    ``P`` holds ``pixels [M, 3, H, W]`` (normalised), ``C`` one caption per line.
    """
    from edgevlm.runtime.readers.safetensors_io import load_safetensors

    p = argparse.ArgumentParser(prog="edgevlm train flip", description=main.__doc__.split("\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--captions", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mask-ratio", type=_ratio, default=DEFAULT_MASK_RATIO,
                   help="fraction of patch tokens dropped per image, in [0, 1); 0.5 = FLIP default, 0.75 studied, "
                        "0 = unmasked tuning. The class token is always kept")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    pixels = load_safetensors(a.images)["pixels"].float()
    captions = Path(a.captions).read_text(encoding="utf-8").splitlines()
    cfg = ViTConfig(name="vit", image_size=pixels.shape[-1], patch_size=a.patch, width=a.width, depth=a.depth,
                    heads=a.heads, mlp_dim=4 * a.width)
    res = run(cfg, pixels, captions, mask_ratio=a.mask_ratio, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
              seed=a.seed, out_dir=a.out)
    print(f"final loss {res['history'][-1]:.4f}" if res["history"] else "no steps run")
    return 0


__all__ = ["DEFAULT_MASK_RATIO", "check_mask_ratio", "random_keep", "masked_encode", "ByteTextEncoder", "clip_loss",
           "FLIPModel", "flip_step", "run", "main"]
