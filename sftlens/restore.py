"""Stage: parameter restoration (paper Section 5.1), the `restore` CLI: the `repair` stage
(`sftlens.repair`) for the paper's method under its own name, with `RestoreConfig` (the selection's
settings), writing one HF folder per ratio or evaluating every ratio in memory; and restoring a
loaded model in place (`restore_in_memory`, `restored_models`: studies use them).

The editing itself lives in `sftlens.weights`: restoration sets the selected elements of a
fine-tuned model back to their base values, with the exact streamed selection of
`sftlens.weights.selection` (exactly floor(n * k / 100) elements, ties broken by sorted tensor
name, then flat index); folders are written by `sftlens.weights.apply` in one pass for all ratios,
atomically and keyed by their inputs, so a re-run skips finished ratios.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.errors import SftlensError
from sftlens.repair import add_eval_arguments, add_model_arguments, parse_value_list, run_sweep
from sftlens.weights import (
    DEFAULT_RATIOS,
    RepairConfig,
    Selection,
    SelectionConfig,
    apply_in_memory,
    open_pair,
    parse_ratios,
    record_names,
    repaired_models,
    select,
    selection_edit,
)

MANIFEST = record_names("restore")[0]


@dataclass(frozen=True)
class RestoreConfig(SelectionConfig):
    """Which fine-tuned elements go back to their base values (defaults: the paper's)."""


def as_repair(config: RestoreConfig) -> RepairConfig:
    return RepairConfig(method="restore", **config_to_dict(config))


def restore_in_memory(model, base, finetuned, ratio: float, config: RestoreConfig = RestoreConfig(),
                      selection: Selection | None = None, progress: bool = False):
    """Restore a loaded fine-tuned `model` in place (and return it), without writing a checkpoint.

    Every region tensor is rewritten from the two checkpoints, so calls for different ratios can
    follow each other on the same model; pass a `selection` from `select(...)` made for a sweep to
    skip the threshold passes. Tensors outside the region are left as they are (the fine-tuned ones).
    """
    pair = open_pair(base, finetuned)
    if selection is None:
        selection = select(pair, (ratio,), config, progress)
    ratio = parse_ratios([ratio])[0]
    if ratio not in selection.ratios:
        raise SftlensError(f"ratio {ratio:g} is not part of the selection ({', '.join(f'{r:g}' for r in selection.ratios)})")
    return apply_in_memory(model, pair, selection_edit(pair, selection), selection.ratios.index(ratio))


def restored_models(model, base, finetuned, ratios=DEFAULT_RATIOS, config: RestoreConfig = RestoreConfig(),
                    progress: bool = True) -> Iterator[tuple[float, object]]:
    """Yield (ratio, model restored in place at that ratio) for a whole sweep, sharing one selection;
    the model is left restored at the last ratio."""
    return repaired_models(model, base, finetuned, ratios, as_repair(config), progress)


def _run_restore(args: argparse.Namespace) -> None:
    args.values = args.ratios
    run_sweep(args, as_repair(config_from_args(RestoreConfig, args)))


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("restore", help="restore the most changed parameters to their base values")
    add_model_arguments(parser, "restored")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, type=parse_value_list,
                        help="comma list of percentages (default: 1,3,5,10,20,40,60)")
    add_config_arguments(parser, RestoreConfig)
    add_eval_arguments(parser, "restored")
    parser.set_defaults(func=_run_restore, writes="out")

