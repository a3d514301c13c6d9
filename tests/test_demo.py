"""`sftlens demo`: teach, fine-tune, audit, and closing lines whose every number comes from the run's files."""

import json
import re

import pytest

from sftlens.demo import DemoConfig, run_demo
from sftlens.taught import taught_facts

pytestmark = pytest.mark.usefixtures("private_cache")


def test_the_demo_tells_what_the_fine_tune_forgot_from_its_own_files(tiny_model_dir, tiny_data_dir, tmp_path):
    said = []
    summary = run_demo(tmp_path / "demo", str(tiny_data_dir), DemoConfig(facts_per_relation=2, sft_facts_per_relation=2,
                                                                         learning_rate=1e-2),
                       progress=False, say=said.append, model=str(tiny_model_dir))
    taught = taught_facts(tmp_path / "demo" / "taught")
    rows = [json.loads(line) for line in (tmp_path / "demo" / "audit" / "facts.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["fact_id"] in taught]
    right = sum(r["base_correct"] for r in mine)
    forgot = sum(r["base_correct"] and not r["finetuned_correct"] for r in mine)
    assert len(mine) == len(taught) == 24  # half of 2 facts per relation, 24 relations
    assert f"answered {right} of the {len(mine)} taught facts right" in summary["story"][0]
    assert f"it forgot {forgot} of them" in summary["story"][0]
    everything = summary["all"]
    assert f"Over all {len(rows)} audited facts it forgot {everything['forgotten']} and learned" in summary["story"][1]
    assert said[:3] and said[-1].startswith("(") and summary["story"][-1].endswith("report.html")
    assert re.search(r"Best repair, chosen on the dev facts: \w+ at ", "\n".join(summary["story"]))
    again = []
    run_demo(tmp_path / "demo", str(tiny_data_dir), DemoConfig(facts_per_relation=2, sft_facts_per_relation=2,
                                                               learning_rate=1e-2),
             progress=False, say=again.append, model=str(tiny_model_dir))
    assert again[3:-1] == said[3:-1]  # every step reused: the same story
