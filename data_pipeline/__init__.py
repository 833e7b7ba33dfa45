"""Streaming tokenization pipeline (imported as ``hyperloop_dist.data``)."""
