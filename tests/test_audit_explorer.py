"""The audit report's fact explorer in a real headless browser (Chromium through selenium): filtered,
sorted and searched, its rows against facts.jsonl. Skipped, with the reason, where selenium, a
Chromium or its driver is missing; .ci/run installs them and sets SFTLENS_REQUIRE_BROWSER, under
which a missing browser fails the test instead."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from sftlens.audit import Audit, AuditConfig, run_audit
from sftlens.io import read_jsonl
from sftlens.probe import ProbeConfig
from sftlens.reporting.explorer import Column, Filter, explorer_html, script_json
from sftlens.reporting.page import Section, write_sections
from sftlens.weights import METHODS

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROBE = ProbeConfig(samples=2, templates=(0, 1), max_new_tokens=6)
SETTINGS = AuditConfig(answer_tokens=6, min_slice=5, bootstrap=100, dev_share=0.4)
HOSTILE = "</script><script>document.title = 'broken'</script><!-- & \u2028"


def _unavailable(reason: str):
    if os.environ.get("SFTLENS_REQUIRE_BROWSER"):
        pytest.fail(f"SFTLENS_REQUIRE_BROWSER is set, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium (the system's chromedriver: no download, no network)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        _unavailable(f"no {'Chromium' if binary is None else 'chromedriver'} on PATH "
                     "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as err:
        _unavailable(f"Chromium did not start: {err.msg}")
    yield chrome
    chrome.quit()


class Explorer:
    """The explorer `name` of the page the browser shows, as a user works it."""

    def __init__(self, browser, name: str):
        self.browser, self.root = browser, browser.find_element("id", name)

    def headers(self) -> list[str]:
        """The column labels (without a sort arrow)."""
        labels = self.browser.execute_script(
            "return Array.from(arguments[0].querySelectorAll('th'), th => th.textContent)", self.root)
        return [re.sub(" [▲▼]$", "", label) for label in labels]

    def rows(self) -> list[dict]:
        """The table's rows as the page shows them: {"id": data-id, header label: cell text}."""
        cells = self.browser.execute_script(
            "return Array.from(arguments[0].querySelectorAll('tbody tr'), tr => "
            "[tr.dataset.id, ...Array.from(tr.cells, td => td.textContent)])", self.root)
        headers = self.headers()
        return [{"id": row[0], **dict(zip(headers, row[1:]))} for row in cells]

    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows()]

    def choose(self, key: str, value) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.root.find_element("css selector", f'select[data-key="{key}"]')).select_by_value(str(value))

    def search(self, text: str) -> None:
        box = self.root.find_element("css selector", 'input[type="search"]')
        self.browser.execute_script("arguments[0].value = ''", box)
        box.send_keys(text)  # typed: an input event per key
        if not text:
            self.browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)

    def sort(self, label: str) -> str:
        """Click the header `label`; its aria-sort after the click."""
        th = self.root.find_elements("css selector", "th")[self.headers().index(label)]
        th.click()
        return th.get_attribute("aria-sort")

    def sorted_by(self) -> list[str]:
        return [th.text for th in self.root.find_elements("css selector", "th[aria-sort]")]

    def count(self) -> str:
        return self.root.find_element("css selector", ".explorer-count").text


def _answer(text: str, right: bool) -> str:
    return f"{'✓' if right else '✗'} {text}" if text else "–"


def test_the_report_explorer_filters_sorts_and_searches_every_fact(browser, audit_pair, tmp_path):
    base, ft, data = audit_pair
    out = tmp_path / "audit"
    summary = run_audit(Audit(str(base), str(ft), data_dir=str(data), probe=PROBE, settings=SETTINGS), out,
                        progress=False)
    facts = read_jsonl(out / "facts.jsonl")
    by_id = {f["fact_id"]: f for f in facts}
    # the best repair, by hand: the best dev score at each method's chosen value, ties the first method
    repairs = summary["repairs"]
    best = max(repairs, key=lambda m: (repairs[m]["dev_scores"][f"{repairs[m]['chosen']:g}"], -list(METHODS).index(m)))
    chosen = repairs[best]["chosen"]
    # its answers on the held-out test facts; a dev fact (it chose the value) shows none
    repaired = json.loads((out / "repairs" / "test" / f"{best}-{chosen:g}.json").read_text())["answers"]
    assert set(repaired) == {f["fact_id"] for f in facts if f["slice"] == "test"}
    repair_label = f"best repair: {best} ({repairs[best]['knob']} = {chosen:g}), test facts"

    browser.get((out / "report" / "report.html").as_uri())
    page = Explorer(browser, "facts")
    # the report's figures and tables are all still there
    assert len(browser.find_elements("css selector", "img[src^='data:image/png;base64,']")) == 2
    assert [h.text for h in browser.find_elements("css selector", "h2")] == [
        "Knowledge transitions", "Forgotten and learned", "Which repair brings it back", "How far and where it moved",
        "Every fact"]
    assert page.headers() == ["fact", "relation", "domain", "slice", "question", "gold answers", "base answer",
                              "fine-tuned answer", repair_label, "base level", "fine-tuned level", "transition",
                              "first-token KL"]
    assert page.ids() == [f["fact_id"] for f in facts] and page.count() == f"{len(facts)} of {len(facts)} shown"

    # forgotten: exactly facts.jsonl's forgotten facts, every cell as the file says
    page.choose("transition", "forgotten")
    forgotten = [f["fact_id"] for f in facts if f["transition"] == "forgotten"]
    assert forgotten and page.ids() == forgotten
    assert page.count() == f"{len(forgotten)} of {len(facts)} shown"
    for row in page.rows():
        f = by_id[row["id"]]
        assert row == {"id": f["fact_id"], "fact": f["fact_id"], "relation": f["relation"], "domain": f["domain"],
                       "slice": f["slice"], "question": f["question"], "gold answers": " | ".join(f["answers"]),
                       "base answer": _answer(f["base_answer"], f["base_correct"]),
                       "fine-tuned answer": _answer(f["finetuned_answer"], f["finetuned_correct"]),
                       repair_label: _answer(repaired[f["fact_id"]], repairs[best]["correct"][f["fact_id"]])
                       if f["slice"] == "test" else "–",
                       "base level": str(f["base_level"]), "fine-tuned level": str(f["finetuned_level"]),
                       "transition": "forgotten", "first-token KL": f"{f['kl']:.4f}"}
        assert row["base answer"].startswith("✓") and row["fine-tuned answer"].startswith("✗")
    # filters combine: forgotten facts of one relation, then every transition of one domain and base level
    relation = by_id[forgotten[0]]["relation"]
    page.choose("relation", relation)
    assert page.ids() == [i for i in forgotten if by_id[i]["relation"] == relation]
    page.choose("transition", "")
    page.choose("relation", "")
    page.choose("domain", "out")
    page.choose("base_level", 0)
    assert page.ids() == [f["fact_id"] for f in facts if f["domain"] == "out" and f["base_level"] == 0]
    page.choose("domain", "")
    page.choose("base_level", "")
    assert len(page.ids()) == len(facts)

    # sorting: a click sorts by the column (ties in file order), a second reverses it
    order = list(range(len(facts)))
    assert page.sort("first-token KL") == "ascending"
    assert page.ids() == [facts[i]["fact_id"] for i in sorted(order, key=lambda i: (facts[i]["kl"], i))]
    assert page.sort("first-token KL") == "descending"
    assert page.ids() == [facts[i]["fact_id"] for i in sorted(order, key=lambda i: (-facts[i]["kl"], i))]
    assert page.sort("base level") == "ascending"
    assert page.ids() == [facts[i]["fact_id"] for i in sorted(order, key=lambda i: (facts[i]["base_level"], i))]
    assert page.sorted_by() == ["base level ▲"]  # one sorted column, marked
    page.choose("transition", "forgotten")  # filtering keeps the order
    assert page.ids() == [facts[i]["fact_id"] for i in sorted(order, key=lambda i: (facts[i]["base_level"], i))
                          if facts[i]["transition"] == "forgotten"]

    # search: the rows holding every word typed (fact id, question, answers), within the filters
    page.choose("transition", "")
    target = facts[len(facts) // 2]
    page.search(target["fact_id"])
    assert page.ids() == [target["fact_id"]]
    words = target["question"].lower().split()[-2:]  # e.g. "located in?" -> rows holding both words
    page.search(" ".join(words))

    def holds(f: dict) -> bool:
        text = " ".join(str(v) for v in (f["fact_id"], f["question"], " | ".join(f["answers"]), f["base_answer"],
                                         f["finetuned_answer"], repaired.get(f["fact_id"], ""))).lower()
        return all(w in text for w in words)

    expected = [facts[i]["fact_id"] for i in sorted(order, key=lambda i: (facts[i]["base_level"], i)) if holds(facts[i])]
    assert target["fact_id"] in expected and page.ids() == expected
    page.choose("transition", target["transition"])
    assert page.ids() == [i for i in expected if by_id[i]["transition"] == target["transition"]]
    page.search("")
    assert page.count() == f"{sum(f['transition'] == target['transition'] for f in facts)} of {len(facts)} shown"


ROWS = [{"id": "a", "text": HOSTILE, "n": 2.5, "ok": True}, {"id": "b", "text": "plain", "n": None, "ok": False}]


def test_an_explorers_json_holds_no_tag_opener():
    assert "<" not in script_json(ROWS) and json.loads(script_json(ROWS)) == ROWS


def test_an_explorers_data_cannot_close_its_script(browser, tmp_path):
    """A value like `</script>` or `<!--` is shown as text and runs nothing; numbers and missing values."""
    html = explorer_html("x", ROWS, [Column("id", "id"), Column("text", "text", right="ok"),
                                     Column("n", "n", numeric=True, digits=2)],
                         [Filter("id", "id", ("a", "b"))], search=["text"], row_id="id")
    paths = write_sections("explorer", [Section("rows", "", html=html)], tmp_path)
    assert "<script" not in paths["markdown"].read_text()  # the explorer is the HTML page's alone
    browser.get(paths["html"].as_uri())
    page = Explorer(browser, "x")
    assert browser.title == "explorer"
    shown = page.rows()
    assert [r["text"] for r in shown] == [f"✓ {HOSTILE}", "✗ plain"] and [r["n"] for r in shown] == ["2.50", "–"]
    assert page.sort("n") == "ascending" and page.ids() == ["a", "b"]
    assert page.sort("n") == "descending" and page.ids() == ["a", "b"]  # a missing value stays last
    page.search("<!--")
    assert page.ids() == ["a"]
