"""Evaluation of generated videos: VBench (the real package), DINO/CLIP/pixel frame similarity with chunk-aware
variants, one results schema (metrics.jsonl rows, metrics.json aggregate). See docs/evaluation.md.

Evaluators implement stas.evaluation.base.Evaluator and register themselves from a module of
stas/evaluation/evaluators/; stas.evaluation.schema builds the `eval` config node from them."""

from stas.evaluation.base import EvalContext, Evaluator, EvaluatorUnavailable, NoValue, Scorer, register
from stas.evaluation.records import aggregate_metrics
from stas.evaluation.registry import evaluator_names
from stas.evaluation.runner import EvaluationSummary, evaluate_run
from stas.evaluation.scores import vbench_scores
from stas.evaluation.similarity import chunk_pairs, consistency_score, frame_pair_similarity, similarity_metrics

__all__ = ["aggregate_metrics", "chunk_pairs", "consistency_score", "EvalContext", "evaluate_run", "EvaluationSummary",
           "Evaluator", "evaluator_names", "EvaluatorUnavailable", "frame_pair_similarity", "NoValue", "register",
           "Scorer", "similarity_metrics", "vbench_scores"]
