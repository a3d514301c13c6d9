"""sftlens: what supervised fine-tuning did to a model's knowledge, and how to undo the harm.

Pipeline, one module per stage: data -> probe -> split -> train -> evaluate ->
analysis (kl, deltas) -> restore -> study -> report.
"""

__version__ = "0.1.0"
