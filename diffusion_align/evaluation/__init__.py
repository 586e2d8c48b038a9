"""Evaluation: generate images, score folders, compare, grids, the review page and plots."""
