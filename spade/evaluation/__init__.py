"""Evaluation: metrics against ground truth, threshold selection, and the HTML report."""
