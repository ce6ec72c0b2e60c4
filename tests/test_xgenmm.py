"""Salesforce xGen-MM (BLIP-3) folders (``model_type: "xgenmm"``) through ``edgevlm.load``.

transformers has no class for xGen-MM (the released repos ship remote code), so the reference is built
here from transformers' real ``SiglipVisionModel`` and ``Phi3ForCausalLM`` plus the open_flamingo pieces
the remote code adds, written from the public source (LAVIS branch ``xgen-mm``, commit d699f7e5):

* ``RefPerceiverResampler``: ``open_flamingo/src/helpers.py`` ``PerceiverAttention`` l.49-103 (K/V from
  ``cat(media, latents)``, bias-free projections, scale ``dim_head**-0.5``, max-subtracted softmax),
  ``FeedForward`` l.32-39 (LN, Linear, GELU, Linear, no biases), ``PerceiverResampler`` l.105-204
  (``latents`` randn, ``layers.{i}.{0,1}``, ``norm``, ``projection`` with bias); built by
  ``XGenMMPerceiver`` (``xgenmm.py`` l.45-47) with depth 6, 16 heads of 96.
* ``RefDecoupledEmbedding`` / ``RefDecoupledLinear``: ``helpers.py`` l.430-690 and ``vlm.py``
  ``VLM.__init__`` l.74-101 (ids >= ``initial_tokenizer_len`` use ``additional_embedding`` /
  ``additional_fc``; the head keeps a bias, since ``DecoupledLinear`` defaults to ``bias=True``).
* the splice: ``vlm.py`` ``_prepare_inputs_for_forward`` l.690-760 (each ``<image>`` token replaced by
  its image's ``num_vis_tokens`` embeddings, images in order); vision features are the SigLIP
  ``last_hidden_state`` (``vlm.py`` l.324).
* ``image_aspect_ratio="anyres"`` (``anyres_patch_sampling=True``): ``ref_anyres_pixels``
  (``any_res_data_utils.py`` ``process_anyres_image`` l.174-202 with its helpers) and ``ref_anyres_tokens``
  (``vlm.py`` ``_encode_vision_x_anyres`` l.187-281: stitched tile map, ``unpad_image`` mask on it,
  ``view(-1, rows, cols, g*g)`` groups; then ``xgenmm.py`` l.123-162: each group resampled under its mask,
  joined base first), written in the reference's own reshapes.

The folder is written as the released checkpoints are laid out: ``vlm.vision_encoder.*`` (a
``SiglipVisionTransformer``), ``vlm.vision_tokenizer.*``, ``vlm.lang_model.*``, and a ``config.json``
with ``vision_encoder_config`` / ``vision_tokenizer_config`` / ``text_config``. Its
``vision_encoder_config.model_name`` names a local SigLIP config folder, as ``AutoModel.from_pretrained``
accepts (the released ones name ``google/siglip-so400m-patch14-384``). Tolerances: outputs within the
reference's own fp32 noise, measured by a float64 copy (:func:`edgevlm_testkit.assert_within_noise`).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgevlm
from edgevlm import CheckpointError
from edgevlm.presets import DECODERS, get_preset
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.chat import build_multimodal_ids
from edgevlm.runtime.image_io import load_images
from edgevlm_testkit import (BYTE_VOCAB, IMAGE_ID, assert_differs, assert_within_noise, float64_copy, max_abs,
                             randomize_params, write_byte_tokenizer)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=14)
N_LAT = 8  # vision_tokenizer_config.num_vis_tokens (128 in the released models)
INITIAL_LEN = IMAGE_ID  # ids 0..258 are the "original" vocabulary; the specials follow it, <image> first
SPECIALS = ("<image>", "<image placeholder>", "<|endofchunk|>")
EOS = 2
TEXT = dict(vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=EOS, sliding_window=None, tie_word_embeddings=False)
NEW_TOKENS = 16


# ---- the reference: open_flamingo's pieces, from the shapes of the public code -------------------

class RefPerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media, latents, mask=None):  # [N, T, D], [N, L, D], [N, T] 0/1 -> [N, L, D]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        n, length, _ = latents.shape
        q = self.to_q(latents).view(n, length, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        k = k.reshape(n, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(n, -1, self.heads, self.dim_head).transpose(1, 2)
        sim = (q * self.dim_head ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:  # helpers.py l.78-94: the latents' own keys stay; masked media keys get -inf
            keep = torch.cat([mask, torch.ones(n, length, dtype=mask.dtype)], dim=1).bool()
            sim = sim.masked_fill(~keep[:, None, None, :], float("-inf"))
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(n, length, -1))


class RefPerceiverResampler(nn.Module):
    def __init__(self, dim: int, dim_inner: int, num_latents: int, depth: int = 6, dim_head: int = 96,
                 heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.projection = nn.Linear(dim, dim_inner)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([RefPerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                         nn.Linear(ff_mult * dim, dim, bias=False))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media, mask=None):  # [N, T, dim], [N, T] -> [N, num_latents, dim_inner]
        latents = self.latents.expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents, mask) + latents
            latents = ff(latents) + latents
        return self.projection(self.norm(latents))


class RefDecoupledEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, n_original: int, n_additional: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.n_original = n_original
        self.additional_embedding = nn.Embedding(n_additional, weight.shape[1])

    def forward(self, ids):
        extra = ids >= self.n_original
        out = F.embedding(ids.masked_fill(extra, 0), self.weight)
        out[extra] = self.additional_embedding(ids[extra] - self.n_original)
        return out


class RefDecoupledLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, n_original: int, n_additional: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]))  # DecoupledLinear(bias=True) around Phi-3's head
        self.n_original = n_original
        self.additional_fc = nn.Linear(weight.shape[1], n_additional)

    def forward(self, x):
        return torch.cat([F.linear(x, self.weight, self.bias)[..., :self.n_original], self.additional_fc(x)], dim=-1)


class RefVLM(nn.Module):
    def __init__(self, siglip: nn.Module, resampler: nn.Module, lang_model: nn.Module):
        super().__init__()
        self.vision_encoder, self.vision_tokenizer, self.lang_model = siglip, resampler, lang_model


class RefXGenMM(nn.Module):
    """Holds ``vlm`` so that ``state_dict()`` gives the released key names."""

    def __init__(self, seed: int, siglip_cfg: dict = SIGLIP):
        super().__init__()
        torch.manual_seed(seed)
        # transformers 5 keeps the 4.x SiglipVisionTransformer layout (embeddings, encoder, post_layernorm, head)
        # directly in SiglipVisionModel: the keys xGen-MM stores under vlm.vision_encoder.
        siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**siglip_cfg))
        lm = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT))
        w = TEXT["hidden_size"]
        lm.set_input_embeddings(RefDecoupledEmbedding(lm.get_input_embeddings().weight.data, INITIAL_LEN, len(SPECIALS)))
        lm.set_output_embeddings(RefDecoupledLinear(lm.get_output_embeddings().weight.data, INITIAL_LEN, len(SPECIALS)))
        self.vlm = RefVLM(siglip, RefPerceiverResampler(siglip_cfg["hidden_size"], w, N_LAT), lm)
        self.eval()
        # 0.3 rather than the default 0.1: a tiny random Phi-3 at 0.1 repeats one token, which would make the
        # greedy comparison nearly vacuous; at 0.3 its answers vary token to token.
        randomize_params(self, seed + 1, scale=0.3)

    def vision_tokens(self, px):  # [n, 3, H, W] -> [n, N_LAT, width]
        return self.vlm.vision_tokenizer(self.vlm.vision_encoder(px).last_hidden_state)

    def inputs_embeds(self, ids: list[int], px) -> torch.Tensor:
        """_prepare_inputs_for_forward: each <image> id, in order, becomes its image's tokens."""
        ids_t = torch.tensor([ids])
        text = self.vlm.lang_model.get_input_embeddings()(ids_t)[0]
        vis = self.vision_tokens(px)
        pieces, k = [], 0
        for pos, tok in enumerate(ids):
            if tok == IMAGE_ID:
                pieces.append(vis[k])
                k += 1
            else:
                pieces.append(text[pos:pos + 1])
        assert k == vis.shape[0]
        return torch.cat(pieces).unsqueeze(0)


def write_folder(folder, model: RefXGenMM, *, aspect: str = "pad") -> None:
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    (folder / "siglip").mkdir(exist_ok=True)
    (folder / "siglip" / "config.json").write_text(json.dumps(model.vlm.vision_encoder.config.to_dict()))
    text = {**model.vlm.lang_model.config.to_dict(), "initial_tokenizer_len": INITIAL_LEN}
    s = model.vlm.vision_encoder.config.image_size
    cfg = {"model_type": "xgenmm", "architectures": ["XGenMMModelForConditionalGeneration"],
           "vision_encoder_config": {"model_name": "siglip", "image_aspect_ratio": aspect,
                                     "anyres_patch_sampling": aspect == "anyres",
                                     "anyres_grids": [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]},
           "vision_tokenizer_config": {"vis_feature_dim": SIGLIP["hidden_size"], "lang_embedding_dim": TEXT["hidden_size"],
                                       "num_vis_tokens": N_LAT, "image_aspect_ratio": aspect},
           "text_config": text}
    (folder / "config.json").write_text(json.dumps(cfg, default=str))
    transformers.SiglipImageProcessorPil(size={"height": s, "width": s}).save_pretrained(folder)
    write_byte_tokenizer(folder)
    tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tk.add_special_tokens(list(SPECIALS[1:]))  # <image> is already id 259 = INITIAL_LEN
    assert [tk.token_to_id(t) for t in SPECIALS] == [INITIAL_LEN + i for i in range(len(SPECIALS))]
    tk.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def xgenmm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xgenmm")
    model = RefXGenMM(seed=5)
    write_folder(folder, model)
    return model, folder, edgevlm.load(folder)


def _image(seed: int, shape=(40, 56, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _ref_ids(folder, prompt: str) -> list[int]:
    # the Phi-3 tokenizer adds BOS; <image> and <|endofchunk|> are special tokens, split out whole
    return [1] + tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids


def _ref_greedy(model: RefXGenMM, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.vlm.lang_model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS,
                                            pad_token_id=0)[0].tolist()
    return out[:-1] if out and out[-1] == EOS else out  # the pipeline stops at EOS without returning it


def test_tower_and_pixels_match_siglip_and_the_perceiver_resampler(xgenmm):
    model, folder, pipe = xgenmm
    tower = pipe.tower
    assert tower.weights.random == [] and tower.config.visual_tokens_per_image == N_LAT
    # (b) pixels: SigLIP's processor (the saved preprocessor_config.json) squashes to 28x28 with bicubic,
    # rescales and normalises with mean = std = 0.5. Compared in 8-bit levels: both sides resize the
    # same uint8 image with Pillow-style bicubic, so they may differ by the rounding of one level.
    img = _image(0)
    px = tower.preprocessor(load_images([img])).views["siglip"]
    ref_px = transformers.SiglipImageProcessorPil.from_pretrained(folder)(img, return_tensors="pt")["pixel_values"]
    assert px.shape == ref_px.shape == (1, 3, SIGLIP["image_size"], SIGLIP["image_size"])
    assert ((px - ref_px).abs() * 0.5 * 255).max() <= 1.01
    # (a) embeddings: SiglipVisionModel's last_hidden_state -> the open_flamingo resampler
    with torch.no_grad():
        ours = tower.from_pixels(ref_px)
        ref = model.vision_tokens(ref_px)
        ref64 = float64_copy(model).vision_tokens(ref_px.double())
    assert ours.shape == (1, N_LAT, TEXT["hidden_size"])
    assert_within_noise(ours, ref, "xgenmm tower embeddings", noise=max_abs(ref, ref64))
    # the tower alone, as load_vision_tower reads the folder, is the same module
    alone = load_vision_tower(folder)
    assert alone.weights.random == []
    assert torch.equal(alone.from_pixels(ref_px), ours)


def test_logits_and_greedy_tokens_match_the_reference(xgenmm):
    model, folder, pipe = xgenmm
    assert pipe.chat.image_placement == "placeholder" and pipe.chat.image_token == "<image>"
    assert pipe.decoder.cfg.vocab_size == INITIAL_LEN + len(SPECIALS) and pipe.decoder.cfg.lm_head_bias
    prompt = "user: <image>\nWhat is this?\nassistant:"
    img = _image(1)
    px = pipe.tower.preprocessor(load_images([img])).views["siglip"]  # the pixels the pipeline itself feeds
    ids = _ref_ids(folder, prompt)
    mp = build_multimodal_ids(pipe.tokenizer, prompt, 1, [N_LAT], "placeholder", "<image>")
    assert [i for i in mp.input_ids if i >= 0] == [i for i in ids if i != IMAGE_ID]
    with torch.no_grad():
        x_ref = model.inputs_embeds(ids, px)
        ref = model.vlm.lang_model(inputs_embeds=x_ref).logits[0, -1]
        m64 = float64_copy(model)
        ref64 = m64.vlm.lang_model(inputs_embeds=m64.inputs_embeds(ids, px.double())).logits[0, -1]
        x = mp.embed(pipe.decoder.embed, [pipe.tower.from_pixels(px)[0]])
        ours = pipe.decoder(inputs_embeds=x)[0, -1]
    assert ours.shape == ref.shape == (INITIAL_LEN + len(SPECIALS),)
    assert_within_noise(ours, ref, "xgenmm next-token logits (decoupled head, biases)", noise=max_abs(ref, ref64))
    ref_tokens = _ref_greedy(model, x_ref)
    out = pipe.generate(img, prompt, raw=True, max_new_tokens=NEW_TOKENS)
    assert out.visual_tokens == N_LAT
    assert out.token_ids == ref_tokens
    assert len(set(ref_tokens)) >= 4  # not a vacuous comparison: the answer is neither empty nor one token repeated


def test_interleaved_images_and_endofchunk_match_the_reference(xgenmm):
    model, folder, pipe = xgenmm
    prompt = "<image> a red one<|endofchunk|><image> a blue one<|endofchunk|>Which differs?"
    imgs = [_image(2, (30, 20, 3)), _image(3, (20, 44, 3))]
    px = pipe.tower.preprocessor(load_images(imgs)).views["siglip"]
    ids = _ref_ids(folder, prompt)
    assert ids.count(IMAGE_ID) == 2 and ids.count(INITIAL_LEN + 2) == 2  # two <|endofchunk|>: decoupled rows
    with torch.no_grad():
        x_ref = model.inputs_embeds(ids, px)
    ref_tokens = _ref_greedy(model, x_ref)
    out = pipe.generate(imgs, prompt, raw=True, max_new_tokens=NEW_TOKENS)
    assert out.visual_tokens == 2 * N_LAT
    assert out.token_ids == ref_tokens and len(set(ref_tokens)) >= 4
    # the order matters: swapping the images changes the reference's prompt embeddings
    with torch.no_grad():
        swapped = model.inputs_embeds(ids, px.flip(0))
    assert max_abs(swapped, x_ref) > 0


def test_quantised_pipeline_answers_with_the_biased_head(xgenmm):
    _, folder, _ = xgenmm
    pipe = edgevlm.load(folder, quant="int8")  # lm_head (with its bias) quantised from outside the decoder
    out = pipe.generate(_image(4), "Describe <image> briefly.", raw=True, max_new_tokens=4)
    assert out.visual_tokens == N_LAT and 1 <= len(out.token_ids) <= 4


def test_known_vision_encoder_matches_the_preset():
    from edgevlm.runtime.readers.xgenmm import KNOWN_VISION_ENCODERS

    sig = KNOWN_VISION_ENCODERS["google/siglip-so400m-patch14-384"]
    vit = get_preset("xgen-mm").tower.encoders[0]
    assert (sig["hidden_size"], sig["num_hidden_layers"], sig["num_attention_heads"], sig["intermediate_size"],
            sig["image_size"], sig["patch_size"]) == (vit.width, vit.depth, vit.heads, vit.mlp_dim, vit.image_size,
                                                      vit.patch_size)
    conn = get_preset("xgen-mm").tower.connector
    assert (conn.num_latents, conn.depth, conn.heads, conn.head_dim, conn.in_width, conn.out_width) == \
        (128, 6, 16, 96, 1152, DECODERS["phi3-mini"].hidden)


# ---- image_aspect_ratio="anyres": open_flamingo's any-resolution path, from the public code ---------

# g = 42 // 14 = 3 patches a side: on a 2x2 grid the stitched map is 6x6 and each group of g*g = 9 tokens is
# 1.5 map rows, so groups are neither tiles nor whole rows, and a per-tile grouping differs from them.
SIGLIP_ANYRES = {**SIGLIP, "image_size": 42}
S_ANY = SIGLIP_ANYRES["image_size"]
G_ANY = S_ANY // SIGLIP_ANYRES["patch_size"]
# write_folder's anyres_grids, (width, height) in pixels as the config stores them
GRIDS_WH = [(S_ANY, 2 * S_ANY), (2 * S_ANY, S_ANY), (2 * S_ANY, 2 * S_ANY), (3 * S_ANY, S_ANY), (S_ANY, 3 * S_ANY)]
# (h, w) -> (rows, cols) the reference picks: a wide image on a 2x2 canvas (rows 0 and 5 of the map padding),
# a wide one on 1x3 (columns 0 and 8 padding), one on 1x2, and a small one that every grid would upscale, so the
# effective resolutions tie and the *first* grid wins (2 rows, 1 column although the image is wide)
ANYRES_IMAGES = {(44, 68): (2, 2), (40, 100): (1, 3), (20, 50): (1, 2), (16, 40): (2, 1)}


def ref_best_resolution(size_wh, grids_wh):
    """any_res_data_utils.py ``select_best_resolution`` l.67-94: sizes and grids are (width, height); the
    largest effective resolution (capped at the image's own) wins, then the least waste, then the earlier."""
    w, h = size_wh
    best, best_eff, best_waste = None, 0, float("inf")
    for gw, gh in grids_wh:
        scale = min(gw / w, gh / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = gw * gh - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (gw, gh), eff, waste
    return best


def ref_anyres_pixels(img: np.ndarray, s: int, grids_wh) -> torch.Tensor:
    """``process_anyres_image`` (any_res_data_utils.py l.174-202) with the SigLIP transform of factory.py
    l.89-94: base view = the image resized to s x s (PIL's default filter, bicubic for RGB), then the s x s
    crops, row-major (``divide_to_patches`` l.132-151), of the best canvas, on which the image is resized
    keeping aspect (the limiting side exact, the other ceil'ed and capped) and pasted centred on black
    (``resize_and_pad_image`` l.97-129). Each view: ``Resize((s, s))`` (the identity at that size),
    ``ToTensor`` (/255), ``Normalize(0.5, 0.5)``. -> [1 + tiles, 3, s, s]"""
    from PIL import Image

    pil = Image.fromarray(img)
    w, h = pil.size
    tw, th = ref_best_resolution((w, h), grids_wh)
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(pil.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((x, y, x + s, y + s)) for y in range(0, th, s) for x in range(0, tw, s)]
    views = [pil.resize((s, s))] + tiles
    return torch.stack([(torch.from_numpy(np.asarray(v, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
                        for v in views])


def ref_unpad_mask(fmap: torch.Tensor, size_wh) -> torch.Tensor:
    """``unpad_image(fmap, image_size, keep_original_shape=True)``'s mask (any_res_data_utils.py l.34-60):
    ``fmap`` [C, H, W]; the side that limits the fit is kept whole, the other keeps ``int()`` of the scaled
    size and loses ``(current - new) // 2`` at both ends."""
    ow, oh = size_wh
    ch, cw = fmap.shape[1:]
    mask = torch.ones(ch, cw, dtype=fmap.dtype)
    if ow / oh > cw / ch:
        pad = (ch - int(oh * (cw / ow))) // 2
        mask[:pad, :] = 0
        mask[ch - pad:, :] = 0
    else:
        pad = (cw - int(ow * (ch / oh))) // 2
        mask[:, :pad] = 0
        mask[:, cw - pad:] = 0
    return mask


def ref_anyres_tokens(model: RefXGenMM, px: torch.Tensor, size_wh, *, per_tile: bool = False) -> torch.Tensor:
    """One image's visual tokens, ``[(1 + rows*cols) * N_LAT, width]``: ``_encode_vision_x_anyres``
    (vlm.py l.187-281, anyres_patch_sampling=True), the resampler over its groups with their masks
    (xgenmm.py l.123-139) and the join, base first, groups in order, no separator (l.158-162).

    ``per_tile=True`` is the counterfactual a per-tile implementation would compute (each tile resampled
    under its own part of the same mask): it must differ, or the comparison could not catch one."""
    feats = model.vlm.vision_encoder(px, interpolate_pos_encoding=True).last_hidden_state  # l.207
    g = S_ANY // model.vlm.vision_encoder.config.patch_size  # l.214: base_img_size // patch_size
    base, tiles = feats[0], feats[1:]  # l.236-237
    gw, gh = ref_best_resolution(size_wh, GRIDS_WH)
    cols, rows = gw // S_ANY, gh // S_ANY  # get_anyres_image_grid_shape: (width, height) // base
    d = feats.shape[-1]
    fmap = tiles.view(rows, cols, g, g, d).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # l.244-247
    mask = ref_unpad_mask(fmap, size_wh)  # l.248: [rows*g, cols*g]
    if per_tile:
        groups = tiles  # [rows*cols, g*g, d]
        gmask = mask.view(rows, g, cols, g).permute(0, 2, 1, 3).reshape(rows * cols, g * g)
    else:
        groups = fmap.view(-1, rows, cols, g * g).flatten(1, 2).permute(1, 2, 0)  # l.255-256: [rows*cols, g*g, d]
        gmask = mask.view(rows, cols, g * g).flatten(0, 1)  # l.258-259
    media = torch.cat([base.unsqueeze(0), groups])  # l.260
    masks = torch.cat([torch.ones(1, g * g, dtype=gmask.dtype), gmask])  # l.261
    return model.vlm.vision_tokenizer(media, masks).flatten(0, 1)  # [Np, v, d] -> [Np*v, d]


def _splice(model: RefXGenMM, ids: list[int], vis: list[torch.Tensor]) -> torch.Tensor:
    """_prepare_inputs_for_forward (vlm.py l.751-792, anyres): each <image> id becomes all of its image's tokens."""
    text = model.vlm.lang_model.get_input_embeddings()(torch.tensor([ids]))[0]
    pieces, k = [], 0
    for pos, tok in enumerate(ids):
        if tok == IMAGE_ID:
            pieces.append(vis[k].to(text.dtype))
            k += 1
        else:
            pieces.append(text[pos:pos + 1])
    assert k == len(vis)
    return torch.cat(pieces).unsqueeze(0)


@pytest.fixture(scope="module")
def xgenmm_anyres(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xgenmm_anyres")
    model = RefXGenMM(seed=7, siglip_cfg=SIGLIP_ANYRES)
    write_folder(folder, model, aspect="anyres")
    return model, folder, edgevlm.load(folder)


def test_anyres_config_is_read_as_the_reference_reads_it(xgenmm_anyres):
    _, _, pipe = xgenmm_anyres
    cfg = pipe.tower.config
    assert cfg.views.kind == "anyres" and cfg.regroup is not None and cfg.pack is None
    # [width, height] pixels -> (rows, cols), in the config's order (ties go to the earlier grid)
    assert cfg.views.anyres_grids == tuple((gh // S_ANY, gw // S_ANY) for gw, gh in GRIDS_WH)
    assert cfg.views.anyres_fill == (0, 0, 0) and cfg.visual_tokens_per_image == (1 + 4) * N_LAT
    for (h, w), grid in ANYRES_IMAGES.items():
        gw, gh = ref_best_resolution((w, h), GRIDS_WH)
        assert (gh // S_ANY, gw // S_ANY) == grid
        assert pipe.tower.preprocessor.views_per_image([_image(0, (h, w, 3))]) == [1 + grid[0] * grid[1]]


def test_anyres_pixels_match_open_flamingo_processing(xgenmm_anyres):
    """Base view + tiles against process_anyres_image. Compared in 8-bit levels: both sides resize the same
    uint8 image with Pillow's bicubic filter, edgevlm always horizontal pass first (runtime/preprocess.py),
    Pillow 13's resize sometimes vertical first, which moves a few pixels by 1-2 levels; padding is exact."""
    _, _, pipe = xgenmm_anyres
    for i, ((h, w), (rows, cols)) in enumerate(ANYRES_IMAGES.items()):
        img = _image(10 + i, (h, w, 3))
        ours = pipe.tower.preprocessor(load_images([img])).views["siglip"]
        ref = ref_anyres_pixels(img, S_ANY, GRIDS_WH)
        assert ours.shape == ref.shape == (1 + rows * cols, 3, S_ANY, S_ANY)
        levels = (ours - ref).abs() * 0.5 * 255  # std 0.5: one level is 1/(0.5*255) after normalisation
        assert levels.max() <= 2.01 and levels.mean() <= 0.05, (h, w, levels.max().item(), levels.mean().item())
        assert torch.equal(ours[1:] == -1, ref[1:] == -1)  # the black canvas padding lands on the same pixels


def test_anyres_embeddings_match_the_strip_regrouping(xgenmm_anyres):
    model, _, pipe = xgenmm_anyres
    m64 = float64_copy(model)
    imgs = [_image(20 + i, (h, w, 3)) for i, (h, w) in enumerate(ANYRES_IMAGES)]
    pre = pipe.tower.preprocessor(load_images(imgs))
    ours_all = pipe.tower.embed_each(imgs)
    px_all = torch.split(pre.views["siglip"], pre.views_per_image)
    for img, px, ours, ((h, w), (rows, cols)) in zip(imgs, px_all, ours_all, ANYRES_IMAGES.items()):
        with torch.no_grad():
            ref = ref_anyres_tokens(model, px, (w, h))
            ref64 = ref_anyres_tokens(m64, px.double(), (w, h))
            tiles = ref_anyres_tokens(model, px, (w, h), per_tile=True)
        assert ours.shape == ref.shape == ((1 + rows * cols) * N_LAT, TEXT["hidden_size"])
        noise = max_abs(ref, ref64)
        assert_within_noise(ours, ref, f"xgenmm anyres tokens {h}x{w} ({rows}x{cols})", noise=noise)
        # from_pixels with the sizes, one image alone (another batch, so other kernels' blockings), agrees too
        alone = pipe.tower.from_pixels(px, views_per_image=[px.shape[0]], image_sizes=[(h, w)])[0]
        assert_within_noise(alone, ref, f"xgenmm anyres from_pixels {h}x{w}", noise=noise)
        if cols > 1:  # strips are not tiles: a per-tile grouping is far from the reference
            assert_differs(tiles, ref, f"per-tile grouping vs strips {h}x{w}", rel=1e-3)


def test_anyres_greedy_tokens_match_the_reference(xgenmm_anyres):
    model, folder, pipe = xgenmm_anyres
    (h, w), (rows, cols) = next(iter(ANYRES_IMAGES.items()))
    assert cols > 1
    img = _image(30, (h, w, 3))
    prompt = "user: <image>\nWhat is this?\nassistant:"
    px = pipe.tower.preprocessor(load_images([img])).views["siglip"]  # the pixels the pipeline itself feeds
    ids = _ref_ids(folder, prompt)
    with torch.no_grad():
        vis = ref_anyres_tokens(model, px, (w, h))
        x_ref = _splice(model, ids, [vis])
        tiles_x = _splice(model, ids, [ref_anyres_tokens(model, px, (w, h), per_tile=True)])
    ref_tokens = _ref_greedy(model, x_ref)
    out = pipe.generate(img, prompt, raw=True, max_new_tokens=NEW_TOKENS)
    assert out.visual_tokens == (1 + rows * cols) * N_LAT
    assert out.token_ids == ref_tokens and len(set(ref_tokens)) >= 4
    assert_differs(tiles_x, x_ref, "prompt embeddings with per-tile groups", rel=1e-3)


def test_anyres_without_its_order_is_refused(xgenmm_anyres):
    """Token dropping and export of this path: tests/test_xgenmm_anyres_export.py."""
    _, _, pipe = xgenmm_anyres
    # the encoders without the regrouping would feed the resampler tiles, not strips: refused, not run
    with pytest.raises(edgevlm.errors.ShapeError, match="regroups"):
        pipe.tower.model.encode(pipe.tower.preprocessor([_image(0)]).views)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_folders_are_refused_with_what_is_missing(xgenmm, tmp_path):
    _, folder, _ = xgenmm
    # (e) the resampler's tensors removed
    bad = _copy(folder, tmp_path / "no_resampler")
    state = safetensors_torch.load_file(str(bad / "model.safetensors"))
    safetensors_torch.save_file({k: v for k, v in state.items() if not k.startswith("vlm.vision_tokenizer.")},
                                str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vlm\.vision_tokenizer\.latents"):
        edgevlm.load(bad)
    # a tokenizer without xGen-MM's added tokens
    bad = _copy(folder, tmp_path / "no_specials")
    write_byte_tokenizer(bad)  # <image> only
    with pytest.raises(CheckpointError, match=r"<image placeholder>.*<\|endofchunk\|>"):
        edgevlm.load(bad)
    # what the reference's anyres path can do and edgevlm does not: refused, not run another way
    for name, change, match in (
            ("no_patch_sampling", {"anyres_patch_sampling": False}, "anyres_patch_sampling"),
            ("odd_grids", {"anyres_grids": [[28, 50]]}, "multiples"),
            ("unknown_mode", {"image_aspect_ratio": "anyres-legacy"}, "image_aspect_ratio")):
        bad = _copy(folder, tmp_path / name)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["vision_encoder_config"].update({"image_aspect_ratio": "anyres", "anyres_patch_sampling": True, **change})
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            edgevlm.load(bad)
    bad = _copy(folder, tmp_path / "newline")  # an image_newline after each map row (vlm.py l.249-253)
    state = safetensors_torch.load_file(str(bad / "model.safetensors"))
    state["vlm.image_newline"] = torch.zeros(SIGLIP["hidden_size"])
    safetensors_torch.save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="image_newline"):
        edgevlm.load(bad)
