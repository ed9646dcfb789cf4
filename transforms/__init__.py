"""Beam PTransforms and DoFns that wrap `spade`: read, extract, score, write."""
