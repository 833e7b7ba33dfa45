"""hyperloop_dist: train Hyperloop Transformers (looped middle block + loop-level mHC) at scale."""

__version__ = "0.1.0"
