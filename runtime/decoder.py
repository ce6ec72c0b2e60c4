"""One decoder-only transformer for every family edgevlm reads (LLaMA, Vicuna, Mistral, Phi-3, OPT), in
plain PyTorch: the reference every other decoder backend is checked against. What differs between the
families is data in :class:`~edgevlm.config.DecoderConfig` (norm, activation, gating, positions, biases);
this file has no per-family code.

::

    ids [B, T] --embed_tokens--> x [B, T, D]          (or inputs_embeds [B, T, D] with image embeddings
    (+ embed_positions[pos + offset] when positions are learned: OPT)   already spliced in by the caller)
    for each of N blocks (pre-norm):
        x = x + o_proj(attn(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
        x = x + down_proj(act(gate_proj(norm(x))) * up_proj(norm(x)))      (gated: LLaMA, Phi-3)
              | down_proj(act(up_proj(norm(x))))                           (plain: OPT's fc1 / fc2)
    logits [B, T, V] = lm_head(norm(x))                 (lm_head shares embed_tokens' weight when tied)

Numerics follow transformers (RMSNorm in fp32, rotate-half RoPE, cos/sin computed in fp32 then cast), so
a checkpoint gives the same logits within a few times transformers' own fp32 rounding noise
(tests/test_decoder.py and tests/test_decoder_families.py measure that noise with a float64 run).
Dynamic-NTK and LongRoPE, like transformers', pick their frequencies from the longest position of each
forward: keys cached before a sequence outgrew the trained context keep their old rotation, so past
that point cached decoding differs from a full recompute (it matches transformers' own cached
``generate``; transformers' Phi-3 recomputes the cache once at the switch, edgevlm does not).

Deployment concerns stay outside: every projection is a plain ``nn.Linear`` with transformers' LLaMA
names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``,
``lm_head``; OPT's fc1 / fc2 are ``up_proj`` / ``down_proj``) so quantisation swaps modules from
outside, and nothing here syncs with the device except dynamic-NTK and LongRoPE (their frequencies
depend on the sequence length).

State dict keys: ``embed_tokens.weight``, ``embed_positions.weight`` (learned positions),
``layers.{i}.attn_norm.{weight,bias}``, ``layers.{i}.attn.{q,k,v,o}_proj.{weight,bias}``,
``layers.{i}.mlp_norm.{weight,bias}``, ``layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}``,
``norm.{weight,bias}``, ``lm_head.weight`` (may be left out of a loaded state when tied). Norm biases
exist for ``norm="layer"`` only, projection biases where the config says so, ``gate_proj`` for gated
MLPs only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import DecoderConfig
from edgevlm.errors import CheckpointError, ShapeError

from .kv_cache import ContextLengthError, Int8KVCache, KVCache
from .layers import activation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D]
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula in one fused op (a decode step runs 2 x layers + 1 norms)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 and scale after casting back, as LLaMA (and transformers) do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: DecoderConfig) -> nn.Module:
    """The config's norm over ``hidden``: RMSNorm (weight) or LayerNorm (weight and bias, OPT)."""
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden, cfg.norm_eps)


# ---- RoPE ------------------------------------------------------------------------------------

def rope_inv_freq(cfg: DecoderConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``[Dr/2]`` (fp32, CPU; Dr = ``cfg.rope_dim``) for ``cfg``'s RoPE and scaling.

    ``seq_len`` only matters for dynamic NTK (past ``cfg.rope_original_len`` the base grows so the
    longest wavelength still covers the sequence) and LongRoPE (past it, the long factors).
    """
    dim, base, factor = cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling_factor
    original = cfg.rope_original_len
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # [Dr/2]
    if cfg.rope_scaling == "dynamic" and seq_len is not None and seq_len > original:
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    if cfg.rope_scaling == "longrope":
        # Phi-3: one divisor per frequency, the long set once the sequence outgrows the trained context
        long = seq_len is not None and seq_len > original
        ext = torch.tensor(cfg.rope_long_factor if long else cfg.rope_short_factor, dtype=torch.float32, device="cpu")
        return 1.0 / (ext * base ** exponents)
    inv_freq = 1.0 / (base ** exponents)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / factor  # same as dividing positions by factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: keep high frequencies (short wavelengths), divide low ones by factor, and blend
        # linearly (in 1/wavelength) between the two thresholds.
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for given positions. ``inv_freq`` is kept outside the state dict and never cast
    to the model dtype (fp16 frequencies would shift long positions), one copy per device."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._inv_freq = {torch.device("cpu"): rope_inv_freq(cfg)}
        self.length_dependent = cfg.rope_scaling in ("dynamic", "longrope")
        self.attention_factor = cfg.rope_attention_factor if cfg.rope_scaling == "longrope" else 1.0

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` or ``[B, T]`` -> (cos, signed sin), each ``[B or 1, 1, T, Dr]``.

        The sin table comes with rotate-half's sign folded in (first half negated), so that
        :func:`apply_rope` needs one ``roll`` instead of chunk + neg + cat: ``rotate_half(x) * sin ==
        x.roll(Dh/2) * signed_sin`` exactly (the same products, the sign moved from one factor to
        the other). A decode step applies RoPE 2 x layers times, so the saved ops are measurable.
        """
        if self.length_dependent:
            inv_freq = rope_inv_freq(self.cfg, int(positions.max()) + 1).to(positions.device)
        else:
            inv_freq = self.inv_freq(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [.., T, Dr/2], fp32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # [.., T, Dr]: rotate-half layout
        if emb.dim() == 2:
            emb = emb[None]
        emb = emb[:, None]  # [B|1, 1, T, Dr], broadcasts over heads
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.to(dtype), signed.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, T, Dh]`` rotated; ``cos`` / ``signed_sin`` ``[.., Dr]`` from :class:`Rotary` (see its
    forward). With Dr < Dh (partial rotary) the first Dr dims rotate and the rest pass through."""
    dr = cos.shape[-1]
    if dr == x.shape[-1]:
        return x * cos + x.roll(dr // 2, dims=-1) * signed_sin
    rot, rest = x[..., :dr], x[..., dr:]
    return torch.cat((rot * cos + rot.roll(dr // 2, dims=-1) * signed_sin, rest), dim=-1)


def attention_mask(start: int, t: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask for ``t`` new queries after ``start`` cached positions: ``[t, start + t]`` bool,
    True = may attend. ``None`` when SDPA's own flags suffice (one query sees everything; a prefill
    from position 0 uses ``is_causal``, whose mask is aligned top-left and so only right when
    ``start == 0``)."""
    if t == 1 or start == 0:
        return None
    keys = torch.arange(start + t, device=device)  # [S]
    queries = torch.arange(start, start + t, device=device)  # [T]
    return keys[None, :] <= queries[:, None]  # [T, S]


# ---- blocks ----------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        d, bias = cfg.hidden, cfg.attention_bias
        self.q_proj = nn.Linear(d, cfg.heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                cache: KVCache | None, start: int) -> torch.Tensor:
        b, t, _ = x.shape  # x [B, T, D]; rope: (cos, signed sin) or None (learned positions)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(self.layer_idx, start, k, v)  # [B, Hkv, start + T, Dh]
        # enable_gqa lets SDPA share each KV head across heads // kv_heads query heads without
        # materialising repeated K/V (which would double the bytes a memory-bound decode step reads).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and start == 0 and t > 1,
                                             enable_gqa=self.kv_heads != self.heads)  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    """Gated (SwiGLU and kin): down(act(gate(x)) * up(x)); plain (OPT): down(act(up(x)))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        # None when the MLP is not gated, so the state dict lists only weights that exist
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=cfg.mlp_bias) if cfg.mlp_gated else None
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.mlp_bias)
        self.act = activation(cfg.mlp_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, start):  # x [B, T, D]
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


# ---- the model -------------------------------------------------------------------------------

class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        learned = cfg.positions == "learned"
        self.embed_positions = nn.Embedding(cfg.max_seq_len + cfg.learned_pos_offset, cfg.hidden) if learned else None
        self.rotary = None if learned else Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
            # A tied checkpoint stores the matrix once; fill lm_head from it so load_state_dict works.
            self.register_load_state_dict_pre_hook(_fill_tied_lm_head)

    @classmethod
    def from_state(cls, cfg: DecoderConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> "Decoder":
        """Build on the meta device and adopt ``state``'s tensors (no random init, no extra copy when
        dtype/device already match). Missing, unexpected or mis-shaped tensors -> CheckpointError."""
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = dict(state)
        if cfg.tie_embeddings:
            state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
        missing = sorted(k for k in expected if state.get(k) is None)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"decoder state does not match {cfg}: missing {missing[:5]} ({len(missing)}), "
                                  f"unexpected {unexpected[:5]} ({len(unexpected)})")
        for k, shape in expected.items():
            if tuple(state[k].shape) != shape:
                raise CheckpointError(f"decoder tensor {k!r}: expected shape {shape}, found {tuple(state[k].shape)}")
        model.load_state_dict(state, assign=True)
        if cfg.tie_embeddings:  # assign=True gave each name its own Parameter; share one again
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> embeddings ``[B, T, D]`` (the caller may splice image embeddings in)."""
        return self.embed_tokens(ids.to(self.embed_tokens.weight.device))

    def new_cache(self, batch: int = 1, max_len: int | None = None, kv_int8: bool = False) -> KVCache:
        """A static KV cache for this decoder; ``kv_int8`` stores it as int8 (:class:`Int8KVCache`)."""
        cls = Int8KVCache if kv_int8 else KVCache
        return cls.for_config(self.cfg, batch=batch, max_len=max_len, dtype=self.dtype, device=self.device)

    def _inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ShapeError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ShapeError(f"input_ids must be [B, T] with T > 0, got {tuple(input_ids.shape)}")
            return self.embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != self.cfg.hidden:
            raise ShapeError(f"inputs_embeds must be [B, T, {self.cfg.hidden}] with T > 0, "
                             f"got {tuple(inputs_embeds.shape)}")
        return inputs_embeds.to(self.dtype)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``) for T new tokens.

        With a cache the new tokens follow the ``cache.length`` cached ones (prefill of a whole prompt,
        of a chunk after a reused prefix, or one decode step); their K/V are written and the length
        advances. ``positions`` ``[T]`` or ``[B, T]`` (RoPE only) default to ``cache.length`` onward.
        """
        x = self.hidden_states(input_ids, inputs_embeds, positions, cache)  # [B, T, D]
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)  # [B, T or 1, V]

    def hidden_states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states ``[B, T, D]`` that ``lm_head`` turns into logits. Training
        applies ``lm_head`` only where a loss is taken: a 49k-entry vocabulary makes full logits the
        largest tensor of a step."""
        x = self._inputs(input_ids, inputs_embeds)  # [B, T, D]
        b, t, _ = x.shape
        start = 0
        if cache is not None:
            if cache.batch != b:
                raise ShapeError(f"KV cache was built for batch {cache.batch}, inputs have batch {b}")
            start = cache.reserve(t)
        if start + t > self.cfg.max_seq_len:
            raise ContextLengthError(f"{start} cached + {t} new = {start + t} positions exceed the decoder's "
                                     f"max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)  # [T]
        elif positions.shape[-1] != t:
            raise ShapeError(f"positions must end in T={t}, got {tuple(positions.shape)}")
        x, rope = self.positional(x, positions)
        mask = attention_mask(start, t, x.device)  # [T, start + T] or None
        for layer in self.layers:
            x = layer(x, rope, mask, cache, start)
        if cache is not None:
            cache.commit(start + t)
        return self.norm(x)


    def positional(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Position information for ``x [B, T, D]`` at ``positions [T] | [B, T]``: -> (x, rope) where
        rope is RoPE's (cos, signed sin) ``[B|1, 1, T, Dr]`` for the attention layers, or learned
        positions are added to x here (and rope is None)."""
        if self.embed_positions is not None:
            pos = positions if positions.dim() == 2 else positions[None]  # [B|1, T]
            return x + self.embed_positions(pos + self.cfg.learned_pos_offset).to(x.dtype), None
        return x, self.rotary(positions, x.dtype)


def _fill_tied_lm_head(module, state_dict, prefix, *args) -> None:
    key, src = prefix + "lm_head.weight", prefix + "embed_tokens.weight"
    if key not in state_dict and src in state_dict:
        state_dict[key] = state_dict[src]


__all__ = ["Decoder", "RMSNorm", "make_norm", "Rotary", "rope_inv_freq", "apply_rope", "rotate_half", "attention_mask"]
