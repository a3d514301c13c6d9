"""The floor the study and the audit both stand on (neither imports the other; both import this):

- `bootstrap`: the paired percentile bootstrap (`FactDraws`, `SeedDraws`, `arm_difference`, `arm_acc`,
  `Estimate`) and the verdict rule (`verdict`: holds / reversed / inconclusive);
- `stats`: exact tests on paired outcomes (McNemar);
- `choice`: the dev-choice rule (`best_mean`: best mean score, ties by a tie order; `least_edit`);
- `page`: report pages (`Section`; `write_sections`: Markdown + self-contained HTML; `write_page`: a results
  page; `numeric_columns`, `interval_text`);
- `figures`: the figure layer (Agg figures, atomic PNGs: `plot_series`, `plot_bands`, `figure_panels`,
  `save_figure`);
- `provenance`: the code version and machine a session records;
- `costs`: seconds per work item and per unit, which the study's and the audit's plans estimate with.

Imports nothing from `sftlens.study` or `sftlens.audit`; Markdown tables stay in `sftlens.markdown` (the stages
print them too).
"""
