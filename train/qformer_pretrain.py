"""BLIP-2 stage-1 Q-Former pre-training on frozen image features: ITC + ITM + ITG (architecture.md §2.3).

The trainer *owns* a runtime :class:`~edgevlm.runtime.connectors.qformer.QFormer` (the query path:
query tokens, shared self-attention, cross-attention, query FFN) and adds only what BLIP-2's text
side needs and the runtime later drops (§2.4): word + position embeddings, a per-layer text FFN, a
tied LM head, ``vision_proj``/``text_proj``, ``itm_head`` and the temperature. After training,
:meth:`QFormerPretrainer.qformer_state_dict` loads strictly into a runtime ``QFormer``.

Sequence layout of a joint pass: ``x = [queries (Q) ; text (T)]``, ``L = Q + T``. Masks are bool
``[N, L, L]`` with True = "row may attend to column" (SDPA's convention)::

    ITC  unimodal             queries<->queries, text<->text          (run as two separate passes)
    ITM  bidirectional        everyone sees every real token           (padding mask only)
    ITG  multimodal causal    queries see queries; text sees all queries + earlier text

Hooks used on the runtime module (no edits to it): ``layer.self_attn(x, x, mask)`` is called with
``mask [N, 1, L, L]`` (its forward hands the mask to SDPA, which broadcasts over heads), and the
query FFN is applied through ``layer.fc1/act/fc2/ffn_norm`` because ``QFormerLayer.forward`` runs
self-attention, cross-attention and FFN as one unit over queries only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgevlm.config import QFormerConfig, to_dict
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.connectors.qformer import QFormer

# ---------------------------------------------------------------------------------------------
# Tokenizer: UTF-8 bytes shifted past four specials (no BERT vocabulary needed for a tiny recipe)
# ---------------------------------------------------------------------------------------------

PAD, CLS, SEP, DEC = 0, 1, 2, 3


class ByteTokenizer:
    """``[CLS] bytes... [SEP]`` with byte ``b`` -> id ``b + 4``; batches pad to the longest (<= max_len)."""

    specials = 4
    vocab_size = 256 + specials

    def encode(self, texts: list[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids ``[B, T]`` long, valid ``[B, T]`` bool (True = real token). Truncation keeps [SEP]."""
        if max_len < 3:
            raise ConfigError(f"max_len must be >= 3 ([CLS], one byte, [SEP]), got {max_len}")
        rows = [[CLS] + [b + self.specials for b in t.encode("utf-8")[: max_len - 2]] + [SEP] for t in texts]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.specials for i in ids if i >= self.specials).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Attention masks (§2.3): [N, Q + T, Q + T] bool, True = may attend
# ---------------------------------------------------------------------------------------------

def _key_ok(num_queries: int, text_valid: torch.Tensor) -> torch.Tensor:
    # [N, L]: queries are never padding; text columns follow the padding mask
    ones = torch.ones(text_valid.shape[0], num_queries, dtype=torch.bool, device=text_valid.device)
    return torch.cat([ones, text_valid.bool()], dim=1)


def unimodal_mask(num_queries: int, text_valid: torch.Tensor) -> torch.Tensor:
    """ITC: queries see only queries, text sees only (real) text. Equal to two separate passes."""
    key_ok = _key_ok(num_queries, text_valid)
    is_q = torch.arange(key_ok.shape[1], device=key_ok.device) < num_queries  # [L]
    return (is_q[:, None] == is_q[None, :])[None] & key_ok[:, None, :]


def bidirectional_mask(num_queries: int, text_valid: torch.Tensor) -> torch.Tensor:
    """ITM: every row sees every real token (queries <-> text), padding columns hidden."""
    key_ok = _key_ok(num_queries, text_valid)
    return key_ok[:, None, :].expand(-1, key_ok.shape[1], -1).clone()


def causal_multimodal_mask(num_queries: int, text_valid: torch.Tensor) -> torch.Tensor:
    """ITG: query rows see queries only; text row r sees all queries and text columns <= r.

    Both cases are ``col <= max(row, Q - 1)``: the query prefix is one fully visible block.
    """
    key_ok = _key_ok(num_queries, text_valid)
    i = torch.arange(key_ok.shape[1], device=key_ok.device)
    allowed = i[None, :] <= i.clamp(min=num_queries - 1)[:, None]  # [L, L]
    return allowed[None] & key_ok[:, None, :]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

class TextFFN(nn.Module):
    """BERT intermediate/output for text tokens (post-norm), same shape as the runtime's query FFN."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(self.fc2(self.act(self.fc1(x))) + x)


class QFormerPretrainer(nn.Module):
    """Runtime query path + BLIP-2 text side and stage-1 heads.

    ``forward(batch, generator) -> {"loss_itc", "loss_itm", "loss_itg", "loss"}`` where ``batch`` has
    ``image [N, S, encoder_width]`` (frozen features), ``text_ids [N, T]`` long, ``text_mask [N, T]``
    bool and optionally ``image_ids [N]`` (equal ids = same image: never drawn as hard negatives).
    """

    def __init__(self, cfg: QFormerConfig, *, max_text_len: int = 32, embed_dim: int = 256):
        super().__init__()
        self.cfg, self.max_text_len = cfg, max_text_len
        self.tokenizer = ByteTokenizer()
        h = cfg.hidden
        self.qformer = QFormer(cfg)
        self.word_emb = nn.Embedding(self.tokenizer.vocab_size, h, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_text_len, h)
        # Text embeddings are normalised by qformer.ln_query: BLIP-2's BertEmbeddings applies ONE
        # LayerNorm to [query_embeds ; word + position], so the text side shares the query LN.
        self.text_ffn = nn.ModuleList(TextFFN(cfg) for _ in range(cfg.layers))
        self.lm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=cfg.norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(self.tokenizer.vocab_size))  # decoder weight tied to word_emb
        self.vision_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # Embeddings N(0, 0.02) as BERT (the tied LM head then starts near uniform, ITG ~ log vocab).
        # Linear layers keep PyTorch's default init: BERT's N(0, 0.02) assumes a pretrained start, and
        # from scratch at tiny widths it leaves the image's contribution to the queries ~1e-3, which
        # stalls ITC/ITM for hundreds of steps.
        for emb in (self.word_emb, self.pos_emb):
            nn.init.normal_(emb.weight, 0.0, 0.02)

    # -- encoders --------------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_text_len:
            raise ShapeError(f"text of {t} tokens exceeds max_text_len {self.max_text_len}")
        pos = torch.arange(t, device=ids.device)
        return self.qformer.ln_query(self.word_emb(ids) + self.pos_emb(pos)[None])  # [N, T, H]

    def encode_text(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Text-only pass (ITC): shared self-attention with the padding mask, text FFN, no image."""
        x = self.embed_text(ids)
        key_mask = valid.bool()[:, None, None, :]  # [N, 1, 1, T]
        for layer, ffn in zip(self.qformer.layers, self.text_ffn):
            x = ffn(layer.self_attn(x, x, key_mask))
        return x  # [N, T, H]

    def encode_joint(self, ids: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One pass over ``[queries ; text]`` with ``mask [N, L, L]``: queries cross-attend to the image
        and use the query FFN, text uses the text FFN, both share self-attention. -> ``[N, L, H]``."""
        n, q = image.shape[0], self.cfg.num_queries
        queries = self.qformer.initial_queries(n)  # [N, Q, H]
        x = torch.cat([queries, self.embed_text(ids)], dim=1)  # [N, L, H]
        m = mask[:, None]  # [N, 1, L, L], broadcast over heads by SDPA
        for layer, ffn in zip(self.qformer.layers, self.text_ffn):
            x = layer.self_attn(x, x, m)
            xq, xt = x[:, :q], x[:, q:]
            if layer.cross_attn is not None:
                xq = layer.cross_attn(xq, image)
            x = torch.cat([layer.ffn(xq), ffn(xt)], dim=1)  # query FFN = the runtime's own
        return x

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.lm_transform(h), self.word_emb.weight, self.lm_bias)  # [..., vocab]

    # -- losses ----------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        cfg, q = self.cfg, self.cfg.num_queries
        image, ids, valid = batch["image"], batch["text_ids"], batch["text_mask"].bool()
        n = image.shape[0]
        if image.ndim != 3 or image.shape[-1] != cfg.encoder_width:
            raise ShapeError(f"expected image features [N, S, {cfg.encoder_width}], got {tuple(image.shape)}")
        if n < 2 or ids.shape[0] != n or valid.shape != ids.shape:
            raise ShapeError(f"need N >= 2 pairs (hard negatives come from the batch): image {tuple(image.shape)}, "
                             f"text_ids {tuple(ids.shape)}, text_mask {tuple(valid.shape)}")
        image = image.to(self.qformer.query_tokens.dtype)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # as LAVIS: keeps 1/temp finite and bounded

        # ITC: unimodal, two passes. sim[i, j] = max over queries of <query_i,q , text_j>.
        img_feat = F.normalize(self.vision_proj(self.qformer(image)), dim=-1)  # [N, Q, D]
        txt_feat = F.normalize(self.text_proj(self.encode_text(ids, valid)[:, 0]), dim=-1)  # [N, D] ([CLS])
        sim_i2t = torch.einsum("iqd,jd->ijq", img_feat, txt_feat).amax(-1) / self.temp  # [N img, N txt]
        sim_t2i = sim_i2t.t()  # max over the same queries, so text->image is the transpose
        target = torch.arange(n, device=image.device)
        loss_itc = (F.cross_entropy(sim_i2t, target, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, target, label_smoothing=0.1)) / 2

        # ITM: hard negatives drawn from the softmaxed ITC similarities, positives excluded.
        image_ids = batch.get("image_ids", target)
        same = image_ids[:, None] == image_ids[None, :]  # [N, N]
        with torch.no_grad():
            w_t2i = F.softmax(sim_t2i.float().masked_fill(same, -1e4), dim=1)
            w_i2t = F.softmax(sim_i2t.float().masked_fill(same, -1e4), dim=1)
            neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)  # [N] per text
            neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)  # [N] per image
        img_all = torch.cat([image, image[neg_img], image])  # [3N, S, C]: pos, (text, neg img), (neg text, img)
        ids_all = torch.cat([ids, ids, ids[neg_txt]])
        valid_all = torch.cat([valid, valid, valid[neg_txt]])
        vl = self.encode_joint(ids_all, img_all, bidirectional_mask(q, valid_all))[:, :q]  # [3N, Q, H]
        itm_logits = self.itm_head(vl).mean(dim=1)  # [3N, 2], averaged over queries
        itm_labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(image.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] replaces [CLS]; position t predicts token t + 1; padding ignored.
        dec_ids = ids.clone()
        dec_ids[:, 0] = DEC
        labels = dec_ids.masked_fill(~valid, -100)
        h = self.encode_joint(dec_ids, image, causal_multimodal_mask(q, valid))[:, q:]  # [N, T, H]
        logits = self.lm_logits(h[:, :-1])  # [N, T-1, vocab]
        loss_itg = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                   label_smoothing=0.1)

        return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg,
                "loss": loss_itc + loss_itm + loss_itg}

    # -- export ----------------------------------------------------------------------------------

    def qformer_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The runtime QFormer's keys (``query_tokens``, ``ln_query.*``, ``layers.*``), detached copies.
        ``prefix="tower.connector.qformer."`` gives checkpoint keys for a Q-Former connector."""
        return {prefix + k: v.detach().clone() for k, v in self.qformer.state_dict().items()}

    def make_batch(self, image: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        ids, valid = self.tokenizer.encode(captions, self.max_text_len)
        return {"image": image, "text_ids": ids, "text_mask": valid}


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------

class Stage1Trainer:
    """AdamW over the pretrainer; ``train_step(batch) -> dict of floats``.

    Randomness (hard-negative draws) comes from a generator seeded by ``(seed, step)``, so a resumed
    run draws exactly what an uninterrupted one would.
    """

    def __init__(self, model: QFormerPretrainer, *, lr: float = 1e-4, weight_decay: float = 0.05, seed: int = 0):
        self.model, self.seed, self.step = model, seed, 0
        # LAVIS's rule: no weight decay on tensors of rank < 2 (biases, norms, the temperature).
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=lr)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        losses = self.model(batch, generator=self.generator())
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.step += 1
        return {k: v.item() for k, v in losses.items()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seed = state["step"], state["seed"]


QFORMER_FILE, TRAINER_FILE = "qformer.safetensors", "trainer.pt"


def save_qformer(model: QFormerPretrainer, path: str | os.PathLike, step: int) -> None:
    """Runtime-keyed Q-Former weights + its config in the safetensors metadata, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.qformer_state_dict().items()}, str(tmp),
              metadata={"format": "pt", "qformer_config": json.dumps(to_dict(model.cfg)), "step": str(step)})
    os.replace(tmp, path)


def run(cfg: QFormerConfig, image_feats: torch.Tensor, captions: list[str], *, out_dir: str | os.PathLike | None = None,
        steps: int = 200, batch_size: int = 8, lr: float = 1e-4, weight_decay: float = 0.05, seed: int = 0,
        save_every: int = 50, resume: bool = True, max_text_len: int = 32, progress: bool = True) -> dict:
    """Train on cached frozen features ``image_feats [M, S, encoder_width]`` paired with ``captions [M]``.

    Each step draws ``batch_size`` distinct rows with a generator seeded by ``(seed, step)``. With
    ``out_dir``, writes ``qformer.safetensors`` (runtime keys) and ``trainer.pt`` (resume state) every
    ``save_every`` steps and at the end; ``resume`` continues from an existing ``trainer.pt``.
    Returns ``{"model", "history": [loss dicts], "step"}``.
    """
    m = image_feats.shape[0]
    if len(captions) != m:
        raise ShapeError(f"{m} feature rows but {len(captions)} captions")
    torch.manual_seed(seed)
    model = QFormerPretrainer(cfg, max_text_len=max_text_len)
    trainer = Stage1Trainer(model, lr=lr, weight_decay=weight_decay, seed=seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / TRAINER_FILE).is_file():
            trainer.load_state_dict(torch.load(out / TRAINER_FILE, weights_only=True))

    def save() -> None:
        tmp = out / f".{TRAINER_FILE}.tmp"
        torch.save(trainer.state_dict(), tmp)
        os.replace(tmp, out / TRAINER_FILE)
        save_qformer(model, out / QFORMER_FILE, trainer.step)

    history = []
    bar = tqdm(range(trainer.step, steps), desc="qformer stage-1", disable=not progress, initial=trainer.step,
               total=steps)
    for _ in bar:
        idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed + 7919 * trainer.step))[:batch_size]
        batch = model.make_batch(image_feats[idx], [captions[i] for i in idx.tolist()])
        losses = trainer.train_step(batch)
        history.append(losses)
        bar.set_postfix(itc=f"{losses['loss_itc']:.3f}", itm=f"{losses['loss_itm']:.3f}",
                        itg=f"{losses['loss_itg']:.3f}")
        if out is not None and trainer.step % save_every == 0:
            save()
    if out is not None:
        save()
    return {"model": model, "history": history, "step": trainer.step}


def main(argv: list[str] | None = None) -> int:
    """``edgevlm train qformer --features F.safetensors --captions C.txt --out DIR``.

    ``F`` holds ``image [M, S, C]`` (frozen encoder features, e.g. cached ``ln_vision`` outputs);
    ``C`` has one caption per line, aligned with the rows.
    """
    from edgevlm.runtime.readers.safetensors_io import load_safetensors

    p = argparse.ArgumentParser(prog="edgevlm train qformer", description=main.__doc__.split("\n")[0])
    p.add_argument("--features", required=True)
    p.add_argument("--captions", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--encoder", default="eva", help="name of the encoder the Q-Former reads (config field)")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)
    feats = load_safetensors(a.features)["image"].float()
    captions = Path(a.captions).read_text(encoding="utf-8").splitlines()
    cfg = QFormerConfig(encoder=a.encoder, encoder_width=feats.shape[-1], num_queries=a.queries, hidden=a.hidden,
                        layers=a.layers, heads=a.heads, intermediate=4 * a.hidden)
    res = run(cfg, feats, captions, out_dir=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
              resume=not a.no_resume)
    last = res["history"][-1] if res["history"] else {}
    print(f"step {res['step']}: " + " ".join(f"{k}={v:.4f}" for k, v in last.items()))
    return 0


__all__ = ["ByteTokenizer", "PAD", "CLS", "SEP", "DEC", "unimodal_mask", "bidirectional_mask",
           "causal_multimodal_mask", "TextFFN", "QFormerPretrainer", "Stage1Trainer", "save_qformer", "run", "main"]
