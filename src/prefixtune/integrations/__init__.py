"""Front ends of other libraries (transformers' Trainer, TRL, lm-evaluation-harness) for a ``PrefixModel``."""
