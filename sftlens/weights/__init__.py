"""Weight editing between a base and a fine-tuned checkpoint with the same tensor names.

- `checkpoints`: a checkpoint pair streamed in blocks of rows (bounded memory), regions.
- `selection`: the exact streamed selection of "the k % most changed elements" (restore, trim, deltas).
- `methods`: the repairs (restore, wise, dare, trim, spectral), one function each, and `RepairConfig`.
- `spectral`: the Gavish-Donoho threshold and the per-matrix SVD edit of the spectral repair.
- `apply`: an edit written as HF folders sharded like the input, or applied to a loaded model.

The names below are what the stages (`sftlens.restore`, `sftlens.repair`, studies) build on.
"""

from sftlens.weights.apply import (
    apply_in_memory,
    record_names,
    repair_sweep,
    repaired_models,
    sweep_key,
    value_folder,
)
from sftlens.weights.checkpoints import open_pair
from sftlens.weights.methods import METHODS, RepairConfig, parse_values, selection_edit
from sftlens.weights.selection import DEFAULT_RATIOS, Selection, SelectionConfig, parse_ratios, select

__all__ = [
    "DEFAULT_RATIOS", "METHODS", "RepairConfig", "Selection", "SelectionConfig", "apply_in_memory", "open_pair",
    "parse_ratios", "parse_values", "record_names", "repair_sweep", "repaired_models", "select", "selection_edit",
    "sweep_key", "value_folder",
]
