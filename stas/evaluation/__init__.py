"""Evaluation of generated videos: VBench (the real package), DINO/CLIP/pixel frame similarity with chunk-aware
variants, one results schema (metrics.jsonl rows, metrics.json aggregate). See docs/evaluation.md."""

from stas.evaluation.records import aggregate_metrics
from stas.evaluation.runner import EvaluationSummary, evaluate_run
from stas.evaluation.scores import vbench_scores
from stas.evaluation.similarity import chunk_pairs, consistency_score, similarity_metrics

__all__ = ["aggregate_metrics", "chunk_pairs", "consistency_score", "evaluate_run", "EvaluationSummary",
           "similarity_metrics", "vbench_scores"]
