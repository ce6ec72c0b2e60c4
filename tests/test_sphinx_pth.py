"""LLaMA2-Accessory SPHINX consolidated checkpoints (runtime/readers/sphinx_pth.py).

The reference code cannot be installed here (it needs fairscale, open_clip, timm and DINOv2 from
torch.hub), so these tests build fake consolidated folders with the reference's exact key names and
shapes for tiny sizes, load them with ``edgevlm.load(folder)``, and compare edgevlm with reference
forwards written from the public code (Alpha-VLLM/LLaMA2-Accessory @ 3777c439, open_clip v2.23.0,
timm convnext.py @ aa4b585, facebookresearch/dinov2 @ b8931f7; each step cites its lines). The
Q-Former reference *is* the public code: transformers' Blip2Model, which llama_ens.py L289-293 builds.

Tolerances follow tests/edgevlm_testkit.py: every float comparison is against the reference's own fp32
rounding noise, measured by running the same reference in float64.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgevlm_testkit import assert_within_noise, max_abs, randomize_params

import edgevlm
from edgevlm.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from edgevlm.errors import CheckpointError
from edgevlm.presets import get_preset
from edgevlm.runtime.readers.sphinx_pth import ffn_hidden, read_sphinx, rope_rows_to_half, sphinx_from_state
from edgevlm.runtime.readers.spm_model import read_spm_metadata
from edgevlm.runtime.source import resolve_source
from edgevlm.runtime.tokenizer import Tokenizer
from edgevlm.runtime.tower import load_vision_tower

# ---- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Encoder and LLM sizes. Head widths are the released ones (64; EVA 88), so head counts follow."""

    clip: tuple[int, int, int] = (128, 2, 256)  # width, depth, MLP
    clip_text: tuple[int, int, int, int] = (64, 16, 32, 48)  # vocab, context, text width, embed dim
    cnx_dims: tuple[int, ...] = (16, 24, 32, 48)
    cnx_depths: tuple[int, ...] = (1, 2, 1, 1)
    dino: tuple[int, int, int] = (128, 2, 96)  # width, depth, SwiGLU hidden
    dino_pos: int = 37  # the hub table is trained at 518 px
    eva: tuple[int, int, int] = (176, 2, 352)
    qformer: tuple[int, int, int, int] = (128, 2, 256, 8)  # hidden, layers, intermediate, queries
    dim: int = 128
    layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    multiple_of: int = 32


TINY = Spec()
TINY_GQA = replace(TINY, n_kv_heads=2)
FULL_13B = Spec(clip=(1024, 24, 4096), clip_text=(49408, 77, 768, 768), cnx_dims=(384, 768, 1536, 3072),
                cnx_depths=(3, 4, 30, 3), dino=(1536, 40, 4096), eva=(1408, 39, 6144), qformer=(768, 12, 3072, 32),
                dim=5120, layers=40, n_heads=40, n_kv_heads=40, multiple_of=256)
FULL_TINYLLAMA = replace(FULL_13B, dim=2048, layers=22, n_heads=32, n_kv_heads=4)
LIGHT = ("llama_ens_light", "llama_ens5_light")

# ---- a SentencePiece model, written as protobuf ----------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, value) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 5:
        return key + struct.pack("<f", value)
    return key + _varint(len(value)) + value


WORDS = ["▁Human", "▁Assistant", "▁what", "▁the", "▁is", "▁a", "###", "▁cat"]


def spm_pieces() -> list[tuple[str, float, int]]:
    """<unk> <s> </s>, 256 byte pieces, characters, then words and their halves (scores rank merges)."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    chars = sorted({c for w in WORDS for c in w} | set("abcdefghijklmnopqrstuvwxyz:.,?!"))
    normal = [(c, -100.0 - k, 1) for k, c in enumerate(chars)]
    seen = {c for c, _, _ in normal}
    for w in WORDS:
        for cut in range(2, len(w) + 1):  # left-to-right prefixes make every word reachable by merges
            if w[:cut] not in seen:
                normal.append((w[:cut], -float(cut), 1))
                seen.add(w[:cut])
    pieces += normal
    if len(pieces) % 2:  # an even vocabulary splits evenly over two model-parallel shards
        pieces.append(("▁zz", -500.0, 1))
    return pieces


def write_spm_model(path: Path, pieces, *, model_type: int = 2, remove_extra_whitespaces: bool = False) -> None:
    body = b"".join(_field(1, 2, _field(1, 2, p.encode()) + _field(2, 5, s) + _field(3, 0, t)) for p, s, t in pieces)
    trainer = _field(3, 0, model_type) + _field(40, 0, 0) + _field(41, 0, 1) + _field(42, 0, 2) + _field(43, 0, -1)
    normalizer = _field(1, 2, b"identity") + _field(3, 0, 1) + _field(4, 0, int(remove_extra_whitespaces))
    path.write_bytes(body + _field(2, 2, trainer) + _field(3, 2, normalizer))


# ---- a fake consolidated state dict with the reference's names ---------------------------------


def blip2_config(spec: Spec):
    import transformers

    vw, vdepth, vmlp = spec.eva
    qh, ql, qi, nq = spec.qformer
    # accessory/resources/hf/Salesforce/blip2-opt-2.7b/config.json, sizes replaced
    vision = dict(hidden_size=vw, intermediate_size=vmlp, num_hidden_layers=vdepth, num_attention_heads=vw // 88,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
    qformer = dict(hidden_size=qh, num_hidden_layers=ql, num_attention_heads=qh // 64, intermediate_size=qi,
                   cross_attention_frequency=2, encoder_hidden_size=vw, hidden_act="gelu", layer_norm_eps=1e-12)
    text = dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                vocab_size=64, word_embed_proj_dim=32)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                    num_query_tokens=nq)


def make_blip2(spec: Spec, seed: int, device: str = "cpu"):
    """SPHINX's `qformer`: a transformers Blip2Model without its language parts (llama_ens.py L289-293)."""
    import transformers

    with torch.device(device):
        torch.manual_seed(seed)
        m = transformers.Blip2Model(blip2_config(spec))
    m.language_projection = None
    m.language_model = None
    if device != "meta":
        randomize_params(m, seed)
        with torch.no_grad():  # EVA trains q and v biases only (the released layout stores q_bias, v_bias)
            for layer in m.vision_model.encoder.layers:
                w = layer.self_attn.qkv.bias.shape[0] // 3
                layer.self_attn.qkv.bias[w:2 * w] = 0
    return m.eval()


def blip2_released_keys(model) -> dict[str, torch.Tensor]:
    """Blip2Model's state dict in the transformers 4.3x layout SPHINX was saved with: the EVA's fused
    qkv bias as separate q_bias / v_bias (k has none)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("self_attn.qkv.bias"):
            w = v.shape[0] // 3
            base = k[: -len("qkv.bias")]
            out[base + "q_bias"], out[base + "v_bias"] = v[:w], v[2 * w:]
        else:
            out[k] = v
    return out


def reference_state(spec: Spec, llama_type: str, vocab: int, seed: int = 0, device: str = "cpu"):
    """-> ({"llma." + key: tensor}, blip2 module or None): every tensor a MetaModel of ``llama_type``
    holds (meta tensors for full sizes), filled with seeded values at usable scales."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:
        if device == "meta":
            state[key] = torch.empty(shape, device="meta")
            return
        name = key.rsplit(".", 1)[-1]
        noise = torch.randn(shape, generator=g)
        if any(n in key for n in ("norm", "ln_", "ln_pre", "ln_post", ".1.weight")) and name == "weight" \
                and len(shape) == 1:
            t = 1 + 0.1 * noise  # norm scales
        elif name in ("gamma",):
            t = 0.5 + 0.1 * noise  # layer scales that matter
        elif len(shape) >= 2 and name in ("weight", "in_proj_weight", "proj") or key.endswith("w12.weight"):
            fan_in = math.prod(shape[1:]) if len(shape) > 2 else shape[-1]
            t = noise / math.sqrt(fan_in)
        elif key.endswith(("start_img", "end_img")):
            t = torch.rand(shape, generator=g)  # torch.rand init, as L338-339
        else:
            t = 0.2 * noise  # biases, class tokens, position tables
        state[key] = t

    d, hd = spec.dim, spec.dim // spec.n_heads
    inter = ffn_hidden(d, spec.multiple_of, None)
    # LLaMA: llama_ens.py L252-269, L220-235, L63-90, L202-210
    put("tok_embeddings.weight", vocab, d)
    for i in range(spec.layers):
        b = f"layers.{i}."
        put(b + "attention.wq.weight", spec.n_heads * hd, d)
        put(b + "attention.wk.weight", spec.n_kv_heads * hd, d)
        put(b + "attention.wv.weight", spec.n_kv_heads * hd, d)
        put(b + "attention.wo.weight", d, spec.n_heads * hd)
        put(b + "feed_forward.w1.weight", inter, d)
        put(b + "feed_forward.w2.weight", d, inter)
        put(b + "feed_forward.w3.weight", inter, d)
        put(b + "attention_norm.weight", d)
        put(b + "ffn_norm.weight", d)
    put("norm.weight", d)
    put("output.weight", vocab, d)

    light = llama_type in LIGHT
    # ConvNeXt-XXL trunk (timm convnext.py: stem, stages.{i}.downsample, blocks.{j}.{conv_dw,norm,mlp,gamma}, head.norm)
    p = "openclip_convnext_xxl."
    dims = spec.cnx_dims
    put(p + "stem.0.weight", dims[0], 3, 4, 4), put(p + "stem.0.bias", dims[0])
    put(p + "stem.1.weight", dims[0]), put(p + "stem.1.bias", dims[0])
    for i, (c, depth) in enumerate(zip(dims, spec.cnx_depths, strict=True)):
        s = f"{p}stages.{i}."
        if i:
            put(s + "downsample.0.weight", dims[i - 1]), put(s + "downsample.0.bias", dims[i - 1])
            put(s + "downsample.1.weight", c, dims[i - 1], 2, 2), put(s + "downsample.1.bias", c)
        for j in range(depth):
            bl = f"{s}blocks.{j}."
            put(bl + "conv_dw.weight", c, 1, 7, 7), put(bl + "conv_dw.bias", c)
            put(bl + "norm.weight", c), put(bl + "norm.bias", c)
            put(bl + "mlp.fc1.weight", 4 * c, c), put(bl + "mlp.fc1.bias", 4 * c)
            put(bl + "mlp.fc2.weight", c, 4 * c), put(bl + "mlp.fc2.bias", c)
            put(bl + "gamma", c)
    put(p + "head.norm.weight", dims[-1]), put(p + "head.norm.bias", dims[-1])
    # DINOv2 ViT-g/14 (dinov2 vision_transformer.py, layers/block.py, layers/swiglu_ffn.py L27-28)
    p, (w, depth, m) = "dinov2_vitg14.", spec.dino
    put(p + "cls_token", 1, 1, w), put(p + "pos_embed", 1, 1 + spec.dino_pos ** 2, w), put(p + "mask_token", 1, w)
    put(p + "patch_embed.proj.weight", w, 3, 14, 14), put(p + "patch_embed.proj.bias", w)
    for i in range(depth):
        bl = f"{p}blocks.{i}."
        for n in ("norm1", "norm2"):
            put(bl + n + ".weight", w), put(bl + n + ".bias", w)
        put(bl + "attn.qkv.weight", 3 * w, w), put(bl + "attn.qkv.bias", 3 * w)
        put(bl + "attn.proj.weight", w, w), put(bl + "attn.proj.bias", w)
        put(bl + "ls1.gamma", w), put(bl + "ls2.gamma", w)
        put(bl + "mlp.w12.weight", 2 * m, w), put(bl + "mlp.w12.bias", 2 * m)
        put(bl + "mlp.w3.weight", w, m), put(bl + "mlp.w3.bias", w)
    put(p + "norm.weight", w), put(p + "norm.bias", w)
    fused = spec.cnx_dims[-1] + spec.dino[0]
    blip = None
    if not light:
        # CLIP ViT-L/14 with the text tower's leftovers (open_clip v2.23.0 transformer.py L328-400, model.py L243-250)
        p, (w, depth, m) = "clip.", spec.clip
        vt, ctx, tw, emb = spec.clip_text
        put(p + "visual.conv1.weight", w, 3, 14, 14), put(p + "visual.class_embedding", w)
        put(p + "visual.positional_embedding", 257, w)
        for n in ("ln_pre", "ln_post"):
            put(f"{p}visual.{n}.weight", w), put(f"{p}visual.{n}.bias", w)
        for i in range(depth):
            bl = f"{p}visual.transformer.resblocks.{i}."
            for n in ("ln_1", "ln_2"):
                put(bl + n + ".weight", w), put(bl + n + ".bias", w)
            put(bl + "attn.in_proj_weight", 3 * w, w), put(bl + "attn.in_proj_bias", 3 * w)
            put(bl + "attn.out_proj.weight", w, w), put(bl + "attn.out_proj.bias", w)
            put(bl + "mlp.c_fc.weight", m, w), put(bl + "mlp.c_fc.bias", m)
            put(bl + "mlp.c_proj.weight", w, m), put(bl + "mlp.c_proj.bias", w)
        put(p + "visual.proj", w, emb)
        put(p + "token_embedding.weight", vt, tw), put(p + "positional_embedding", ctx, tw)
        put(p + "ln_final.weight", tw), put(p + "ln_final.bias", tw)
        put(p + "text_projection", tw, emb), put(p + "logit_scale")
        fused += w
        blip = make_blip2(spec, seed + 7, device)
        for k, v in blip2_released_keys(blip).items():
            state["qformer." + k] = v
        put("qformer_proj.0.weight", d, spec.qformer[0]), put("qformer_proj.0.bias", d)
        put("qformer_proj.1.weight", d), put("qformer_proj.1.bias", d)
    put("visual_proj.0.weight", d, fused), put("visual_proj.0.bias", d)
    put("visual_proj.1.weight", d), put("visual_proj.1.bias", d)
    put("start_img", 1, 1, d), put("end_img", 1, 1, d)
    return {"llma." + k: v for k, v in state.items()}, blip


IGNORED = {"clip.visual.proj", "clip.token_embedding.weight", "clip.positional_embedding", "clip.ln_final.weight",
           "clip.ln_final.bias", "clip.text_projection", "clip.logit_scale", "dinov2_vitg14.mask_token"}

# tensor_parallel.py L34-38: column-parallel weights split on dim 0, row-parallel and the embedding on dim 1
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _split_dim(key: str):
    parts = key.split(".")
    return _SPLIT.get(parts[-2]) if parts[-1] == "weight" and (parts[1] in ("layers", "output", "tok_embeddings")) \
        else None


def write_folder(folder: Path, state: dict, llama_type: str, spec: Spec, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(shards):
        shard = {}
        for k, v in state.items():
            dim = _split_dim(k)
            shard[k] = v if dim is None else v.chunk(shards, dim=dim)[r].clone()
        torch.save({"model": shard}, folder / f"consolidated.{r:02d}-of-{shards:02d}.model.pth")
    (folder / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
    # a params file as the releases ship it (ModelArgs fields); n_heads etc. for the tiny LLM
    params = {"dim": spec.dim, "n_layers": spec.layers, "n_heads": spec.n_heads, "multiple_of": spec.multiple_of,
              "norm_eps": 1e-5, "vocab_size": -1}
    if spec.n_kv_heads != spec.n_heads:
        params["n_kv_heads"] = spec.n_kv_heads
    (folder / "config.json").write_text(json.dumps(params))
    write_spm_model(folder / "tokenizer.model", spm_pieces())
    return folder


# ---- the reference forward, from the public code ---------------------------------------------


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _ln2d(x, sd, key, eps):  # timm LayerNorm2d
    return _ln(x.permute(0, 2, 3, 1), sd, key, eps).permute(0, 3, 1, 2)


def ref_clip(sd, x, heads):
    """llama_ens.py L352-375 over open_clip's VisionTransformer (v2.23.0: nn.MultiheadAttention blocks
    L188-242; nn.GELU since the model is built with pretrained=None, model.py L116)."""
    p = "clip.visual."
    w = sd[p + "conv1.weight"]
    x = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).permute(0, 2, 1)  # [N, 256, W]
    cls = sd[p + "class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + sd[p + "positional_embedding"]
    x = _ln(x, sd, p + "ln_pre", 1e-5)
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1", 1e-5).transpose(0, 1)  # NLD -> LND (L365)
        a, _ = F.multi_head_attention_forward(h, h, h, h.shape[-1], heads, sd[b + "attn.in_proj_weight"],
                                              sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"],
                                              training=False, need_weights=False)
        x = x + a.transpose(0, 1)
        h = F.linear(_ln(x, sd, b + "ln_2", 1e-5), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + F.linear(F.gelu(h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    return _ln(x, sd, p + "ln_post", 1e-5)  # all tokens, no proj (L369-373)


def ref_convnext(sd, x, eps=1e-5):
    """timm ConvNeXt (convnext.py: block forward L197-212, conv_mlp=False) as open_clip's trunk with
    global_pool/flatten = Identity (llama_ens.py L312-314): the head norm runs on the map."""
    p = "openclip_convnext_xxl."
    x = _ln2d(F.conv2d(x, sd[p + "stem.0.weight"], sd[p + "stem.0.bias"], stride=4), sd, p + "stem.1", eps)
    i = 0
    while f"{p}stages.{i}.blocks.0.conv_dw.weight" in sd:
        s = f"{p}stages.{i}."
        if i:
            x = _ln2d(x, sd, s + "downsample.0", eps)
            x = F.conv2d(x, sd[s + "downsample.1.weight"], sd[s + "downsample.1.bias"], stride=2)
        j = 0
        while f"{s}blocks.{j}.conv_dw.weight" in sd:
            b = f"{s}blocks.{j}."
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = _ln(y.permute(0, 2, 3, 1), sd, b + "norm", eps)
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"]).permute(0, 3, 1, 2)
            x = x + y * sd[b + "gamma"].reshape(1, -1, 1, 1)
            j += 1
        i += 1
    return _ln2d(x, sd, p + "head.norm", eps)


def ref_dinov2(sd, x, heads):
    """dinov2 vision_transformer.py: prepare_tokens_with_masks L214-221 with interpolate_pos_encoding
    L180-212 (hub: interpolate_offset 0.1, no antialias), blocks (x + ls1 * attn(norm1 x); x + ls2 *
    SwiGLU(norm2 x)), forward_features L255-271 -> cat(x_norm_clstoken, x_norm_patchtokens) (L425-428)."""
    p = "dinov2_vitg14."
    w = sd[p + "patch_embed.proj.weight"]
    n, _, hh, _ = x.shape
    x = F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(n, -1, -1), x], dim=1)
    pos = sd[p + "pos_embed"]
    m, g0 = math.isqrt(pos.shape[1] - 1), hh // w.shape[-1]
    s = (g0 + 0.1) / m
    patch = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(s, s), mode="bicubic",
                          antialias=False)
    x = x + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, g0 * g0, -1)], dim=1)
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        t, c = h.shape[1], h.shape[2]
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(n, t, c), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + a * sd[b + "ls1.gamma"]
        x1, x2 = F.linear(_ln(x, sd, b + "norm2", 1e-6), sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, -1)
        x = x + F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"]) * sd[b + "ls2.gamma"]
        i += 1
    return _ln(x, sd, p + "norm", 1e-6)


def _seq(x, sd, key):  # nn.Sequential(nn.Linear, nn.LayerNorm) (L325-333)
    return _ln(F.linear(x, sd[key + ".0.weight"], sd[key + ".0.bias"]), sd, key + ".1", 1e-5)


def ref_encode(sd, blip, views, spec: Spec, light: bool):
    """encode_image, llama_ens.py L377-449 (light: llama_ens_light.py L354-409) for already-derived
    views -> [N, tokens, dim] per view, before the separators."""
    cnx = ref_convnext(sd, views["convnext"])  # [N, C, h, w]
    if cnx.shape[-1] == 8:
        cnx = cnx.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # 8x8 -> 16x16 (L403-407)
    cnx = cnx.flatten(-2).permute(0, 2, 1)
    cnx = torch.cat([cnx.mean(dim=1, keepdim=True), cnx], dim=1)  # gap as cls token (L409-412)
    dino = ref_dinov2(sd, views["dinov2"], spec.dino[0] // 64)
    if light:
        return _seq(torch.cat([cnx, dino], dim=2), sd, "visual_proj")  # (*, 257, 4608) (L395-398, L407)
    clip = ref_clip(sd, views["clip"], spec.clip[0] // 64)
    qf = blip.get_qformer_features(pixel_values=views["eva"])  # L393
    qf = getattr(qf, "last_hidden_state", qf)
    ens = _seq(torch.cat([clip, cnx, dino], dim=2), sd, "visual_proj")  # (*, 257, 5632) order (L429-433, L444)
    return torch.cat([_seq(qf, sd, "qformer_proj"), ens], dim=1)  # Q-Former first (L443-445)


def ref_image_tokens(sd, blip, views, spec, light, n_views):
    """[1, n_views * tokens_per_view, dim]: each view wrapped as start_img + view + end_img, views in
    order (llama_ens.py L459-461; llama_ens5.py L470-479 with torch.chunk(.., 5))."""
    feats = ref_encode(sd, blip, views, spec, light)
    wrapped = [torch.cat([sd["start_img"], f, sd["end_img"]], dim=1) for f in feats.chunk(n_views)]
    return torch.cat(wrapped, dim=1)


def _rms(x, w, eps):  # accessory/model/components.py L28-50 (in the run's dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_llama(sd, h, spec: Spec, eps=1e-5, theta=10000.0):
    """Transformer.forward with an image, llama_ens.py L451-470: causal attention (L131-167), Meta RoPE on
    adjacent pairs (llama.py L46-77), repeat_kv, SwiGLU (L216-217) -> logits for every position."""
    n_h, n_kv = spec.n_heads, spec.n_kv_heads
    b, t, d = h.shape
    hd = d // n_h
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].to(h.dtype) / hd))
    ang = torch.outer(torch.arange(t, dtype=h.dtype), freqs)
    cis = torch.polar(torch.ones_like(ang), ang)  # [T, hd/2]

    def rope(x):  # [B, T, H, hd]
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    i = 0
    while f"layers.{i}.attention.wq.weight" in sd:
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"], eps)
        q = rope(F.linear(x, sd[p + "attention.wq.weight"]).view(b, t, n_h, hd))
        k = rope(F.linear(x, sd[p + "attention.wk.weight"]).view(b, t, n_kv, hd))
        v = F.linear(x, sd[p + "attention.wv.weight"]).view(b, t, n_kv, hd)
        k = k.repeat_interleave(n_h // n_kv, dim=2)  # repeat_kv (llama.py L80-90)
        v = v.repeat_interleave(n_h // n_kv, dim=2)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        h = h + F.linear(o.transpose(1, 2).reshape(b, t, d), sd[p + "attention.wo.weight"])
        x = _rms(h, sd[p + "ffn_norm.weight"], eps)
        ff = F.silu(F.linear(x, sd[p + "feed_forward.w1.weight"])) * F.linear(x, sd[p + "feed_forward.w3.weight"])
        h = h + F.linear(ff, sd[p + "feed_forward.w2.weight"])
        i += 1
    return F.linear(_rms(h, sd["norm.weight"], eps), sd["output.weight"])


# ---- views as each reference file derives them -----------------------------------------------

_CM, _CS = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
_DM, _DS = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _crops(x, size):  # TL, TR, BL, BR (llama_ens5.py L383)
    return [x[..., :size, :size], x[..., :size, size:], x[..., size:, :size], x[..., size:, size:]]


def reference_views(image, llama_type):
    """image: the CLIP-normalised padded_resize tensor [1, 3, S, S] -> per-encoder views, in the view
    order of the llama_type (float64; the reference interpolates in fp16, which is left out here: both
    sides get these same views)."""
    def bicubic(x, s):
        return F.interpolate(x, size=(s, s), mode="bicubic")

    def dino(x):  # DINOv2's own normalisation from the CLIP-normalised pixels (L414-424)
        return (x * _CS.double() + _CM.double() - _DM.double()) / _DS.double()

    if llama_type == "llama_ens":
        v224 = image
    elif llama_type == "llama_ens5":
        v224 = torch.cat([bicubic(image, 224)] + _crops(image, 224))  # L381-385
    elif llama_type == "llama_ens_light":  # llama_ens_light.py L370-389
        return {"convnext": F.interpolate(image, size=(512, 512)), "dinov2": dino(bicubic(image, 224))}
    else:  # llama_ens5_light.py L370-402
        v224 = torch.cat([bicubic(image, 224)] + _crops(bicubic(image, 448), 224))
        v512 = torch.cat([bicubic(image, 512)] + _crops(image, 512))
        return {"convnext": v512, "dinov2": dino(v224)}
    views = {"clip": v224, "eva": v224, "convnext": F.interpolate(v224, size=(256, 256)), "dinov2": dino(v224)}
    return views  # nearest 224 -> 256 for ConvNeXt (L399-401)


INPUT_SIZE = {"llama_ens": 224, "llama_ens5": 448, "llama_ens_light": 512, "llama_ens5_light": 1024}
N_VIEWS = {"llama_ens": 1, "llama_ens5": 5, "llama_ens_light": 1, "llama_ens5_light": 5}


def _f64(sd):
    return {k: v.double() for k, v in sd.items()}


def _blip(blip, dtype):
    import copy

    return None if blip is None else copy.deepcopy(blip).to(dtype)


# ---- the tests ---------------------------------------------------------------------------------

VARIANTS = [("llama_ens", TINY, 2), ("llama_ens5", TINY, 1), ("llama_ens_light", TINY_GQA, 1),
            ("llama_ens5_light", TINY_GQA, 2)]


@pytest.fixture(scope="module")
def vocab() -> int:
    return len(spm_pieces())


@pytest.mark.parametrize("llama_type,spec,shards", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_matches_reference_forward(tmp_path, vocab, llama_type, spec, shards):
    state, blip = reference_state(spec, llama_type, vocab, seed=1)
    folder = write_folder(tmp_path / llama_type, state, llama_type, spec, shards)
    src = resolve_source(folder)
    assert (src.kind, src.model_type) == ("sphinx", llama_type)

    # every key is consumed: mapped into the model, or one of the known unused leftovers
    ck = read_sphinx(folder)
    light = llama_type in LIGHT
    assert set(ck.ignored) == (set() if light else IGNORED) | {"dinov2_vitg14.mask_token"}
    assert ck.shards == shards

    pipe = edgevlm.load(folder)
    sd = {k[len("llma."):]: v for k, v in state.items()}
    g = torch.Generator().manual_seed(3)
    size = INPUT_SIZE[llama_type]
    image = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    views64 = reference_views(image, llama_type)
    views32 = {k: v.float() for k, v in views64.items()}
    n_views = N_VIEWS[llama_type]
    with torch.no_grad():
        got = pipe.tower.from_pixels(views32, views_per_image=[1 * n_views])[0]  # [n_views * tpv, D]
        want = ref_image_tokens(sd, _blip(blip, torch.float32), views32, spec, light, n_views)[0]
        want64 = ref_image_tokens(_f64(sd), _blip(blip, torch.float64), views64, spec, light, n_views)[0]
    tpv = (1 + 257 + 1) + (0 if light else spec.qformer[3])  # start + [32 Q-Former] + 257 fused + end
    assert got.shape == want.shape == (n_views * tpv, spec.dim)
    assert_within_noise(got, want, f"{llama_type} image tokens", noise=max_abs(want, want64))

    # the image block after BOS, then the prompt (llama_ens.py L459-461); logits of every position
    mp = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": "what is the cat"}], [got.shape[0]])
    ids = torch.tensor([mp.text_ids])
    assert ids[0, 0].item() == pipe.tokenizer.bos_id == 1 and mp.image_spans == [(1, 1 + got.shape[0])]
    with torch.no_grad():
        logits = pipe.decoder(inputs_embeds=mp.embed(pipe.decoder.embed, [got]))[0]

        def reference(sd_, image_tokens):
            h = F.embedding(ids, sd_["tok_embeddings.weight"])
            return ref_llama(sd_, torch.cat([h[:, :1], image_tokens[None], h[:, 1:]], dim=1), spec)[0]

        ref32, ref64 = reference(sd, want), reference(_f64(sd), want64)
    assert logits.shape == (ids.shape[1] + got.shape[0], vocab)
    assert_within_noise(logits, ref32, f"{llama_type} logits", noise=max_abs(ref32, ref64))


def test_rope_permutation_matches_complex_rope():
    """Rows reordered by rope_rows_to_half under rotate-half RoPE give Meta's complex RoPE (llama.py
    L67-77) up to the same per-head column order, so q.k agrees."""
    g = torch.Generator().manual_seed(0)
    heads, hd, d, t = 3, 8, 16, 5
    w = torch.randn(heads * hd, d, generator=g, dtype=torch.float64)
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd))
    meta = torch.view_as_real(torch.view_as_complex((x @ w.T).view(t, heads, hd // 2, 2))
                              * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(2)  # [T, H, hd]
    y = (x @ rope_rows_to_half(w, heads).T).view(t, heads, hd)
    cos, sin = ang.cos().repeat(1, 2)[:, None], ang.sin().repeat(1, 2)[:, None]
    half = y * cos + torch.cat([-y[..., hd // 2:], y[..., : hd // 2]], dim=-1) * sin  # rotate-half
    reordered = meta.view(t, heads, hd // 2, 2).transpose(-1, -2).reshape(t, heads, hd)  # evens then odds
    torch.testing.assert_close(half, reordered, atol=1e-12, rtol=0)  # float64: the same sums, reordered


@pytest.mark.parametrize("llama_type,spec,preset", [("llama_ens", FULL_13B, "sphinx"),
                                                    ("llama_ens5", FULL_13B, "sphinx-1k"),
                                                    ("llama_ens_light", FULL_TINYLLAMA, "sphinx-tiny")])
def test_full_size_key_set_gives_the_presets(llama_type, spec, preset):
    """A released-size state dict (meta tensors, key names and shapes from the public code) maps with
    every key consumed, and sizes the same model as the preset (the DINOv2 table resampled to 16x16 on
    read is the one documented difference; SPHINX-Tiny's LLM gets MetaModel's 4096 context)."""
    state, _ = reference_state(spec, llama_type, 32000, device="meta")
    params = {"n_heads": spec.n_heads} | ({"n_kv_heads": spec.n_kv_heads} if spec.n_kv_heads != spec.n_heads else {})
    ck = sphinx_from_state({k[len("llma."):]: v for k, v in state.items()}, llama_type, params,
                           frozenset(params))
    want = get_preset(preset)
    encoders = tuple(replace(e, pos_grid=0) if e.name == "dinov2" else e for e in want.tower.encoders)
    assert ck.tower == replace(want.tower, encoders=encoders)
    assert ck.decoder == replace(want.decoder, max_seq_len=4096)
    assert ck.tower.visual_tokens_per_image == {"sphinx": 291, "sphinx-1k": 1455, "sphinx-tiny": 259}[preset]


def test_tower_only_loader_and_generate(tmp_path, vocab):
    state, _ = reference_state(TINY, "llama_ens", vocab, seed=2)
    folder = write_folder(tmp_path / "sphinx", state, "llama_ens", TINY, shards=2)
    pipe = edgevlm.load(folder)
    tower = load_vision_tower(folder)
    assert tower.config == pipe.tower.config
    g = torch.Generator().manual_seed(4)
    views = {e.name: torch.randn(1, 3, e.image_size, e.image_size, generator=g) for e in tower.config.encoders}
    torch.testing.assert_close(tower.from_pixels(views), pipe.tower.from_pixels(views), atol=0, rtol=0)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = pipe.generate(image, "what is the cat", max_new_tokens=3)
    assert isinstance(out.text, str)
    info = pipe.info()
    assert info["tokenizer"]["source"].endswith("tokenizer.model") and info["chat"]["format"] == "sphinx"
    assert info["decoder"]["weights"].startswith("llama_ens:") and "2 shard" in info["decoder"]["weights"]


def test_tokenizer_model_read_without_sentencepiece(tmp_path):
    pieces = spm_pieces()
    write_spm_model(tmp_path / "tokenizer.model", pieces)
    meta = read_spm_metadata(tmp_path / "tokenizer.model")
    assert meta["tokenizer.ggml.tokens"] == [p for p, _, _ in pieces]
    assert meta["tokenizer.ggml.token_type"] == [t for _, _, t in pieces]
    assert meta["tokenizer.ggml.scores"] == [pytest.approx(s) for _, s, _ in pieces]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    tk = Tokenizer.from_gguf_metadata(meta)
    ids = tk.encode("what is the cat")
    assert ids[0] == 1 and [tk.id_to_token(i) for i in ids[1:]] == ["▁what", "▁is", "▁the", "▁cat"]
    ids = tk.encode("é ###", add_bos=False)
    assert [tk.id_to_token(i) for i in ids] == ["▁", "<0xC3>", "<0xA9>", "▁", "###"]  # é: byte fallback
    assert tk.decode(ids) == "é ###"

    write_spm_model(tmp_path / "unigram.model", pieces, model_type=1)
    with pytest.raises(CheckpointError, match="not BPE.*tokenizer.json"):
        read_spm_metadata(tmp_path / "unigram.model")
    write_spm_model(tmp_path / "ws.model", pieces, remove_extra_whitespaces=True)
    with pytest.raises(CheckpointError, match="remove_extra_whitespaces"):
        read_spm_metadata(tmp_path / "ws.model")
    (tmp_path / "junk.model").write_bytes(b"\xff" * 40)
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        read_spm_metadata(tmp_path / "junk.model")


def test_tokenizer_matches_sentencepiece(tmp_path):
    """Against the sentencepiece package itself, where it is installed (a trained LLaMA-style BPE model)."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    lines = [f"{w} the cat is {i} times naïve, 東京 🦙  two  spaces" for i, w in enumerate(WORDS * 30)]
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    tk = Tokenizer.from_gguf_metadata(read_spm_metadata(tmp_path / "m.model"))
    for text in lines[:20] + ["Hello  world", " lead", "tail ", "a\n\nb", "🦙🦙 ǅ ﬁ"]:
        assert tk.encode(text, add_bos=False) == sp.encode(text), text
        assert tk.decode(sp.encode(text)) == sp.decode(sp.encode(text))


class _Boom:
    """Unpickling this would create a file: weights_only must refuse before running anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused(tmp_path, vocab):
    state, _ = reference_state(TINY, "llama_ens_light", vocab)
    folder = write_folder(tmp_path / "m", state, "llama_ens_light", TINY)
    marker = tmp_path / "ran"
    torch.save({"model": state, "hook": _Boom(marker)}, folder / "consolidated.00-of-01.model.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        edgevlm.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("key,match", [
    ("llma.layers.1.attention.wk.weight", "llma.layers.1.attention.wk.weight"),
    ("llma.dinov2_vitg14.blocks.1.ls2.gamma", "llma.dinov2_vitg14.blocks.1.ls2.gamma"),
    *[(k, k) for k in ("llma.openclip_convnext_xxl.stages.1.blocks.1.mlp.fc2.bias",
                        "llma.clip.visual.transformer.resblocks.1.mlp.c_fc.bias")],
    ("llma.qformer.vision_model.encoder.layers.1.mlp.fc2.weight",
     "qformer.vision_model.encoder.layers.1.mlp.fc2.weight"),
    ("llma.qformer.qformer.encoder.layer.0.crossattention.output.dense.bias",
     "qformer.qformer.encoder.layer.0.crossattention.output.dense.bias"),
    ("llma.end_img", "llma.end_img"),
])
def test_missing_key_is_named(tmp_path, vocab, key, match):
    state, _ = reference_state(TINY, "llama_ens", vocab)
    del state[key]
    folder = write_folder(tmp_path / "m", state, "llama_ens", TINY)
    with pytest.raises(CheckpointError, match=match.replace(".", r"\.")):
        edgevlm.load(folder)


def test_unexpected_and_misshapen_keys_are_named(tmp_path, vocab):
    state, _ = reference_state(TINY, "llama_ens_light", vocab)
    extra = {**state, "llma.dinov2_vitg14.register_tokens": torch.zeros(1, 4, 128)}
    with pytest.raises(CheckpointError, match=r"llma\.dinov2_vitg14\.register_tokens"):
        edgevlm.load(write_folder(tmp_path / "a", extra, "llama_ens_light", TINY))
    bad = {**state, "llma.visual_proj.0.weight": torch.zeros(TINY.dim, 100)}
    with pytest.raises(CheckpointError, match=r"llma\.visual_proj\.0\.weight.*\(128, 100\)"):
        edgevlm.load(write_folder(tmp_path / "b", bad, "llama_ens_light", TINY))
    # the light variant has no CLIP / Q-Former: their tensors are unexpected, not ignored
    heavy, _ = reference_state(TINY, "llama_ens", vocab)
    with pytest.raises(CheckpointError, match=r"not part of a llama_ens_light"):
        edgevlm.load(write_folder(tmp_path / "c", heavy, "llama_ens_light", TINY))


def test_folder_problems_are_typed(tmp_path, vocab):
    state, _ = reference_state(TINY_GQA, "llama_ens_light", vocab)
    folder = write_folder(tmp_path / "m", state, "llama_ens_light", TINY_GQA, shards=2)
    (folder / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(CheckpointError, match="not one complete set"):
        edgevlm.load(folder)

    folder = write_folder(tmp_path / "n", state, "llama_ens_light", TINY_GQA)
    (folder / "meta.json").write_text(json.dumps({"llama_type": "llama_ens5p2"}))
    with pytest.raises(CheckpointError, match="pooled"):
        edgevlm.load(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        edgevlm.load(folder)
    (folder / "meta.json").write_text(json.dumps({"llama_type": "llama_ens_light"}))
    (folder / "config.json").write_text(json.dumps({"n_heads": 4, "multiple_of": 32, "hidden_size": 5}))
    with pytest.raises(CheckpointError, match="unknown ModelArgs fields"):
        edgevlm.load(folder)
    (folder / "config.json").write_text(json.dumps({"n_heads": 4, "multiple_of": 32}))  # no n_kv_heads: 4 expected
    with pytest.raises(CheckpointError, match="n_kv_heads=4"):
        edgevlm.load(folder)
    (folder / "config.json").write_text(json.dumps({"n_heads": 4, "n_kv_heads": 2}))  # multiple_of 256 default
    with pytest.raises(CheckpointError, match="multiple_of=256"):
        edgevlm.load(folder)
    (folder / "consolidated.00-of-01.model.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        edgevlm.load(folder)
