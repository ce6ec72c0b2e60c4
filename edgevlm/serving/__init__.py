"""Serving an edgevlm model through NVIDIA Triton Inference Server (``edgevlm serve``).

- :mod:`.protocol`: the tensors requests and responses carry (shared with :mod:`edgevlm.client`);
- :mod:`.repository`: a Triton model repository whose Python-backend models run a Pipeline;
- :mod:`.triton_model`: that model;
- :mod:`.server`: the bundled ``tritonserver`` started over such a repository.
"""
