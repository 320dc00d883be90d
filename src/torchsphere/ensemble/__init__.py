"""Ensembles from a pool of trained models (Mustafa et al., *Deep Ensembles for Low-Data Transfer Learning*,
arXiv 2010.06866, 2020): penultimate features, k-NN ranking, fine-tuning with a small sweep through the training loop,
and greedy ensemble selection on validation cross-entropy (Caruana et al., ICML 2004).

``greedy_select(probs, labels, max_size)`` takes (models, examples, classes) validation probabilities and returns the
chosen member indices in pick order (repeats allowed); ``run_ensemble(EnsembleSpec(...), output)`` is the whole
pipeline of ``torchsphere ensemble`` (docs/ensembles.md).
"""
from .features import extract_features, feature_layer
from .finetune import DEFAULT_SWEEP, FinetuneResult, SweepPoint, finetune, load_backbone, parse_sweep, predict_probs
from .knn import knn_loo_accuracy, knn_predict, rank_score
from .pool import PoolMember, find_pool
from .runner import EnsembleSpec, run_ensemble
from .selection import EnsembleSelection, brute_force_ensemble, greedy_ensemble, greedy_select

__all__ = [
    "DEFAULT_SWEEP",
    "EnsembleSelection",
    "EnsembleSpec",
    "FinetuneResult",
    "PoolMember",
    "SweepPoint",
    "brute_force_ensemble",
    "extract_features",
    "feature_layer",
    "find_pool",
    "finetune",
    "greedy_ensemble",
    "greedy_select",
    "knn_loo_accuracy",
    "knn_predict",
    "load_backbone",
    "parse_sweep",
    "predict_probs",
    "rank_score",
    "run_ensemble",
]
