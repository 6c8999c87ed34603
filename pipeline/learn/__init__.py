"""Training and evaluation: ``train`` (+ ``checkpoints``, ``validation``, ``nmf_fit``), ``evaluate`` (+
``bss_eval``, ``oracles``, ``scores``, ``report``) and ``presence`` (detectors trained and scored on true stems).

Callers import the module they need (``from demix.pipeline.learn.train import TrainConfig, train``).
"""
