"""Reporting a study from its `study.db` alone (the `report` verb).

`results` (tagged records, arms, the statistic over seeds, the candidates behind each dev choice),
`findings` (claims C1-C6), `sections` (the paper's tables and figures), `repair_section` ("Repair
methods"), `taught_section` (on a taught base: "Taught and untaught facts"), `page` (the report and
results page; the `report` verb). The paired bootstrap, the verdict rule, the page writer and the
figures are `sftlens.reporting`'s, shared with the audit.

Reads the engine (`sftlens.study.engine`: the database, unit parameters, folder layout, and `choice`, the
rules the units' dev choices followed); the engine does not import the report, but for the demo's report
(`engine.commands.run_demo`).
"""
