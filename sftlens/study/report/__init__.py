"""Reporting a study from its `study.db` alone (the `report` verb).

`results` (tagged records, arms, the candidates behind each dev choice), `bootstrap` (paired bootstrap),
`findings` (claims C1-C6, the verdict rule), `sections` (the paper's tables and figures),
`repair_section` ("Repair methods"), `taught_section` (on a taught base: "Taught and untaught facts"),
`audit_section` (the `sftlens audit` report, from its `summary.json`), `page` (the report and results
page, Markdown and HTML; the `report` verb).

Reads the engine (`sftlens.study.engine`: the database, unit parameters, folder layout, and `choice`, the
rules the units' dev choices followed); the engine does not import the report, but for the demo's report
(`engine.commands.run_demo`).
"""
