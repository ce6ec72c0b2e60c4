"""Measuring edgevlm: the end-to-end latency suite behind ``edgevlm bench`` (:mod:`.latency`), the
machine's physical limits beside each figure (:mod:`.limits`), result rows (:mod:`.results`) and the
breakdown plot (:mod:`.plot`). The bench scripts under ``bench/`` and the training CLI's eval rows use
these too. Import the submodules; this package re-exports nothing.
"""
