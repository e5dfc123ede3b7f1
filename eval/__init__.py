"""Evaluation: FVD, CLIP similarity, fairness statistics, and the Ray evaluation stage."""
