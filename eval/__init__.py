"""Distributed evaluation (imported as ``hyperloop_dist.evaluation``)."""
