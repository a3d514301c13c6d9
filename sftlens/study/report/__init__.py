"""Reporting a study from its `study.db` alone (the `report` verb).

`results` (tagged records, arms, the dev-chosen values read back), `bootstrap` (paired bootstrap),
`findings` (claims C1-C6, the verdict rule), `sections` (the paper's tables and figures),
`repair_section` ("Repair methods"), `taught_section` (on a taught base: "Taught and untaught facts"),
`audit_section` (the `sftlens audit` report), `page` (the report and results page, Markdown and HTML, the
`report` verb).

Reads the engine's database, parameters and folder layout (`sftlens.study.engine`).
"""
