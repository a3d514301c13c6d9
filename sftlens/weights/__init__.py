"""Weight editing between a base and a fine-tuned checkpoint with the same tensor names.

- `checkpoints`: a checkpoint pair streamed in blocks of rows (bounded memory), regions.
- `selection`: the exact streamed selection of "the k % most changed elements" (restore, trim, deltas),
  or of the top k % of a caller's per-element `Score` (guided).
- `methods`: the repairs (restore, wise, dare, trim, spectral, guided), one function each, and `RepairConfig`.
- `spectral`: the Gavish-Donoho threshold and the per-matrix SVD edit of the spectral repair.
- `guided`: fact importances (diagonal Fishers of the forgotten and the learned facts at the fine-tuned
  weights, one safetensors file) and the guided repair's score; the formula is its docstring.
- `apply`: an edit written as HF folders sharded like the input, or applied to a loaded model.

The names below are what the stages (`sftlens.restore`, `sftlens.repair`, studies) build on.

Repairs: `RepairConfig(method, metric, scope, region, strategy, seed, ...)` (metric/scope None = the
method's default: restore relative/global, trim absolute/tensor; settings a method does not read stay out
of its keys; an unknown method is an error naming it); `parse_values(method, values)` (sorted,
de-duplicated, in the knob's range: restore ratio (0, 100], wise alpha [0, 1], dare p [0, 1), trim d
(0, 100], spectral c [0, inf), guided k (0, 100]; one-line errors); `METHODS[m].neutral` (restore 0,
wise 1, dare 0, trim 100, spectral 0, guided 0) gives back the fine-tuned weights bit for bit.
`repaired_models(model, base, ft, values, config)` yields (value, model edited in place), sharing the
method's passes; `repair_sweep(base, ft, values, config, out_root) -> {value: folder}` writes
`{method}-{value:g}` folders (restore: `{strategy}-{ratio:g}` with `restore.json`/`restored.tsv`, the
folders and keys of `sftlens restore`; the others `repair.json` with `method`, the knob's value, `config`,
the count reset per tensor, and `repaired.tsv`). DARE's mask is `random_keys(name, seed, offset) <
round(p 2**31)`; spectral keeps, per 2-D tensor, the singular directions of ft - base above c times the
Gavish-Donoho threshold; guided sets the top k % of |ft - base| Fbar_forgotten / (Fbar_learned + eps)
(per-fact mean Fishers) back to base, reading `RepairConfig.importances` (the file's key, not its path,
enters its keys).
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
