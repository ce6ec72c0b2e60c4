"""The shipped demo model: its trained weights load through ``edgevlm.load("demo")`` and give the
training-time model's logits (LoRA unmerged, connector from the checkpoint) within 1e-4 in fp32."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest
import torch

import edgevlm
from edgevlm.presets import get_preset
from edgevlm.runtime.image_io import load_image
from edgevlm.runtime.lora import apply_lora
from edgevlm.runtime.readers import resolve_weights_path
from edgevlm.runtime.readers.safetensors_io import load_safetensors

CFG = get_preset("demo")


@pytest.fixture(scope="module")
def shipped():
    if CFG.weights is None or CFG.lora is None:
        pytest.skip("the demo preset names no trained weights yet")
    try:
        path = resolve_weights_path(CFG.weights)
        resolve_weights_path(CFG.decoder_weights)
    except edgevlm.WeightsNotFoundError as e:
        pytest.skip(f"real weights not installed: {e}")
    return load_safetensors(path)


def test_shipped_weights_are_small_and_complete(shipped):
    n_bytes = sum(t.numel() * t.element_size() for t in shipped.values())
    assert n_bytes < 8e6, n_bytes  # a few MB: connector + LoRA factors only
    assert any(k.startswith("tower.connector.") for k in shipped)
    assert any(k.endswith(".lora_A") for k in shipped) and not any(k.startswith("tower.encoders.") for k in shipped)


def test_training_model_and_runtime_agree(shipped):
    runtime = edgevlm.load("demo", quant="none")  # float; the quantised default: test_pipeline.test_quantised_demo_default
    # the training-time model: base preset, LoRA wrappers applied from outside, trained tensors loaded
    train = edgevlm.load(replace(CFG, weights=None, lora=None), quant="none")
    apply_lora(train.decoder, CFG.lora)
    train.tower.model.connector.load_state_dict(
        {k[len("tower.connector."):]: v for k, v in shipped.items() if k.startswith("tower.connector.")}, strict=True)
    missing, unexpected = train.decoder.load_state_dict(
        {k[len("decoder."):]: v for k, v in shipped.items() if k.startswith("decoder.")}, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)

    img = load_image(str(resources.files("edgevlm") / "assets" / "scene_a.png"))
    logits = []
    for pipe in (train, runtime):
        emb = pipe.tower([img])[0]
        prompt = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": "How many objects are there?"}],
                                 [emb.shape[0]])
        with torch.no_grad():
            logits.append(pipe.decoder(inputs_embeds=prompt.embed(pipe.decoder.embed, [emb]))[0])
    err = (logits[0] - logits[1]).abs().max().item()
    print(f"max |logit difference| {err:.2e}")
    assert err <= 1e-4, err
