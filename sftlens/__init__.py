"""sftlens: what supervised fine-tuning did to a model's knowledge, and how to undo the harm.

Pipeline, one module (or package) per stage: data -> probe -> split -> train -> evaluate ->
analysis (kl, deltas) -> weights (editing) -> restore, repair -> study (and its report).
"""

__version__ = "0.1.0"
