"""Evaluating backbones: frozen pooled features -> linear probe (L-BFGS logistic regression) and k-NN."""

from .config import EvalConfig, load_eval_config
from .features import load_backbone, pooled_features, probe_datasets
from .probe import knn_top1, linear_probe
from .runner import ProbeData, evaluate, evaluate_model, load_probe_data

__all__ = ["EvalConfig", "ProbeData", "evaluate", "evaluate_model", "knn_top1", "linear_probe", "load_backbone",
           "load_eval_config", "load_probe_data", "pooled_features", "probe_datasets"]
