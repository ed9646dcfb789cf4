"""Scoring: patch correspondence, score maps, batch scoring against a gallery, and calibration on normals."""
