"""Evaluation arithmetic: feature extractors, FID and friends per class and group, PRD, intervals."""
