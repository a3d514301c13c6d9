"""Update statistics (paper Section 5, Table 3): how concentrated the fine-tuning update is.

The share of the total change held by the k % most changed elements, for a sweep of k, with the
exact streamed selection of `sftlens.weights.selection` (two passes for the whole sweep) and one
more pass for the sums (float64). `zero_base_mass` checks the de-quantisation artefact of the
relative metric.

`concentration(base, ft, config, ratios)` -> `ratios`, `selected`, `shares`, `elements`,
`total_change` and per-tensor `tensors`; `zero_base_mass(base, ft, region)` -> the share of the relative
change held by elements whose base value is exactly 0.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.io import atomic_write_json, atomic_write_text
from sftlens.markdown import markdown_table
from sftlens.reporting.figures import figure_panels, save_figure
from sftlens.weights.checkpoints import layer_index, open_pair, progress_bar
from sftlens.weights.selection import DEFAULT_RATIOS, SelectionConfig, change, parse_ratios, select, tensor_keys


@dataclass(frozen=True)
class DeltasConfig(SelectionConfig):
    """Settings of `sftlens deltas`: which change is measured over which tensors."""


def concentration(base_dir, ft_dir, config: DeltasConfig = DeltasConfig(), ratios=DEFAULT_RATIOS,
                  progress: bool = True) -> dict:
    """Share of the total change held by the selected k % of elements, for every ratio, plus
    per-tensor summaries. Sums are accumulated in float64."""
    start = time.perf_counter()
    pair = open_pair(base_dir, ft_dir)
    selection = select(pair, ratios, config, progress)
    ratios = selection.ratios
    total = 0.0
    held = [0.0] * len(ratios)
    tensors = []
    for name in progress_bar(selection.names, "summaries", progress):
        cutter = selection.cutter(name)
        tensor_total, tensor_max, counts = 0.0, 0.0, [0] * len(ratios)
        for _, delta, keys in tensor_keys(pair, name, config):
            tensor_total += float(delta.sum(dtype=torch.float64))
            tensor_max = max(tensor_max, float(delta.max()) if delta.numel() else 0.0)
            for i, mask in enumerate(cutter.masks(keys)):
                counts[i] += int(torch.count_nonzero(mask))
                held[i] += float(delta[mask].sum(dtype=torch.float64))
        total += tensor_total
        tensors.append({
            "name": name, "layer": layer_index(name), "numel": selection.numel[name],
            "sum": tensor_total, "mean": tensor_total / max(selection.numel[name], 1),
            "max": tensor_max, "selected": counts,
        })
    selected = [selection.selected_count(i) for i in range(len(ratios))]
    for row in tensors:
        row["share_of_total"] = row["sum"] / total if total else 0.0
        row["share_of_selected"] = [c / s if s else 0.0 for c, s in zip(row.pop("selected"), selected)]
    return {
        "base": str(pair.base.root), "finetuned": str(pair.finetuned.root),
        "config": config_to_dict(config), "ratios": list(ratios), "elements": selection.total,
        "total_change": total, "selected": selected,
        "shares": [h / total if total else 0.0 for h in held],
        "tensors": tensors, "passes": selection.passes + 1,
        "seconds": round(time.perf_counter() - start, 3),
    }


def zero_base_mass(base_dir, ft_dir, region: str = "body") -> dict:
    """How much of the relative change sits on elements whose base value is exactly 0: there
    |d| / (0 + 1e-8) is huge, so a few such elements (e.g. left by Q4_1 de-quantisation, which
    rounds small weights to 0) can dominate every relative-change statistic."""
    pair = open_pair(base_dir, ft_dir)
    elements = zeros = 0
    total = on_zeros = 0.0
    for name in pair.region_names(region):
        for chunk in pair.chunks(name):
            relative = change(chunk.base, chunk.finetuned, "relative")
            zero = chunk.base == 0
            elements += relative.numel()
            zeros += int(torch.count_nonzero(zero))
            total += float(relative.sum(dtype=torch.float64))
            on_zeros += float(relative[zero].sum(dtype=torch.float64))
    return {"region": region, "elements": elements, "zero_base_elements": zeros,
            "zero_base_share_of_elements": zeros / elements if elements else 0.0,
            "zero_base_share_of_relative_change": on_zeros / total if total else 0.0}


def concentration_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Share of the total {cfg['metric']} change held by the {cfg['strategy']} k % of "
        f"{result['elements']:,} elements (region {cfg['region']}, scope {cfg['scope']})",
        "",
        markdown_table(["k (%)", "elements", "share of total change (%)"],
                       [[f"{r:g}", f"{n:,}", f"{100 * s:.2f}"]
                        for r, n, s in zip(result["ratios"], result["selected"], result["shares"])], "rrr"),
    ]
    return "\n".join(lines)


def concentration_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ratio", "elements", "share"])
    for r, n, s in zip(result["ratios"], result["selected"], result["shares"]):
        writer.writerow([f"{r:g}", n, f"{s:.8f}"])
    return out.getvalue()


def tensors_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "layer", "numel", "mean", "max", "share_of_total",
                     *[f"share_of_top_{r:g}" for r in result["ratios"]]])
    for t in result["tensors"]:
        writer.writerow([t["name"], "" if t["layer"] is None else t["layer"], t["numel"], f"{t['mean']:.6g}",
                         f"{t['max']:.6g}", f"{t['share_of_total']:.6g}",
                         *[f"{s:.6g}" for s in t["share_of_selected"]]])
    return out.getvalue()


def plot_concentration(result: dict, path: str | Path) -> Path:
    """Cumulative share curve, and the share of the top-k elements each layer holds."""
    figure, (curve, layers) = figure_panels(2, width=5.5)
    xs = [0.0, *result["ratios"]]
    ys = [0.0, *(100 * s for s in result["shares"])]
    curve.plot(xs, ys, marker="o")
    curve.plot([0, 100], [0, 100], linestyle=":", color="grey", label="uniform")
    curve.set_xlabel("top k % of elements")
    curve.set_ylabel("% of total change")
    curve.set_title(f"{result['config']['metric']} change, region {result['config']['region']}")
    curve.legend()
    by_layer: dict[int, list[float]] = {}
    for t in result["tensors"]:
        if t["layer"] is not None:
            acc = by_layer.setdefault(t["layer"], [0.0] * len(result["ratios"]))
            for i, s in enumerate(t["share_of_selected"]):
                acc[i] += s
    order = sorted(by_layer)
    for i, r in enumerate(result["ratios"]):
        layers.plot(order, [100 * by_layer[layer][i] for layer in order], marker=".", label=f"top {r:g} %")
    layers.set_xlabel("layer")
    layers.set_ylabel("% of the selected elements")
    layers.set_title("where the selected elements lie")
    if order:
        layers.legend(fontsize="small")
    return save_figure(figure, path)


def write_concentration(result: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    files = {"json": out / "concentration.json", "markdown": out / "concentration.md",
             "csv": out / "concentration.csv", "tensors": out / "tensors.csv", "figure": out / "concentration.png"}
    atomic_write_json(files["json"], result)
    atomic_write_text(files["markdown"], concentration_markdown(result) + "\n")
    atomic_write_text(files["csv"], concentration_csv(result))
    atomic_write_text(files["tensors"], tensors_csv(result))
    plot_concentration(result, files["figure"])
    return files


def zero_base_note(zero: dict) -> str:
    """One paragraph on the zero-base artefact, with a warning when it dominates the relative change."""
    text = (f"Elements whose base value is exactly 0: {zero['zero_base_elements']:,} of {zero['elements']:,} "
            f"({100 * zero['zero_base_share_of_elements']:.4f} %); they hold "
            f"{100 * zero['zero_base_share_of_relative_change']:.2f} % of the relative change.")
    if zero["zero_base_share_of_relative_change"] > 0.5:
        text += (" The relative metric is dominated by them (|d| / 1e-8): read --metric absolute or "
                 "--metric relative_nonzero.")
    return text


def _run_deltas(args: argparse.Namespace) -> None:
    config = config_from_args(DeltasConfig, args)
    result = concentration(args.base, args.finetuned, config, parse_ratios(args.ratios))
    result["zero_base"] = zero_base_mass(args.base, args.finetuned, config.region)
    files = write_concentration(result, args.out)
    print(concentration_markdown(result))
    print("\n" + zero_base_note(result["zero_base"]))
    print(f"\n{result['passes']} passes over {len(result['tensors'])} tensors in {result['seconds']:.1f}s; "
          f"wrote {', '.join(str(p) for p in files.values())}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("deltas", help="how concentrated the fine-tuning update is (Table 3)")
    parser.add_argument("--base", required=True, help="base model (built-in name or folder)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (built-in name or folder)")
    parser.add_argument("--out", required=True, help="output folder for tables and figure")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                        type=lambda s: tuple(x for x in s.split(",") if x.strip()),
                        help="comma list of percentages (default: 1,3,5,10,20,40,60)")
    add_config_arguments(parser, DeltasConfig)
    parser.set_defaults(func=_run_deltas, writes="out")
