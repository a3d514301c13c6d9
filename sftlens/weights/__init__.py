"""Weight editing between a base and a fine-tuned checkpoint with the same tensor names.

- `checkpoints`: a checkpoint pair streamed in blocks of rows (bounded memory), regions.
- `selection`: the exact streamed selection of "the k % most changed elements" (restore, trim, deltas).
- `methods`: the repairs (restore, wise, dare, trim, spectral), one function each, and `RepairConfig`.
- `spectral`: the Gavish-Donoho threshold and the per-matrix SVD edit of the spectral repair.
- `apply`: an edit written as HF folders sharded like the input, or applied to a loaded model.
"""

from sftlens.weights.apply import repair_sweep, repaired_models
from sftlens.weights.methods import METHODS, RepairConfig, parse_values

__all__ = ["METHODS", "RepairConfig", "parse_values", "repair_sweep", "repaired_models"]
