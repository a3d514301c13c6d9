// An explorer of a report page (sftlens.reporting.explorer): draws the rows of the JSON beside it into
// its table. A select keeps the rows whose field equals its value, the search box the rows holding
// every word typed, a click on a column header sorts by it (a second click reverses; rows without a
// value stay last). Vanilla JavaScript: no library, no network.
(function (root) {
  "use strict";
  const spec = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  const rows = spec.rows;
  const body = root.querySelector("tbody");
  const selects = Array.from(root.querySelectorAll("select[data-key]"));
  const search = root.querySelector('input[type="search"]');
  const count = root.querySelector(".explorer-count");
  const headers = Array.from(root.querySelectorAll("th[data-key]"));
  const missing = (value) => value === null || value === undefined || value === "";
  const text = rows.map((row) => spec.search.map((key) => (missing(row[key]) ? "" : String(row[key])))
    .join(" ").toLowerCase());
  let order = rows.map((_, i) => i);

  function cell(row, column) {
    const value = row[column.key];
    if (missing(value)) return "–";
    if (column.digits !== null && typeof value === "number") return value.toFixed(column.digits);
    if (column.right !== null) return (row[column.right] ? "✓ " : "✗ ") + value;
    return String(value);
  }

  function draw() {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    const chosen = selects.filter((s) => s.value !== "").map((s) => [s.dataset.key, s.value]);
    const shown = order.filter((i) => chosen.every(([key, value]) => String(rows[i][key]) === value)
      && words.every((word) => text[i].includes(word)));
    const fragment = document.createDocumentFragment();
    for (const i of shown) {
      const tr = document.createElement("tr");
      tr.dataset.id = rows[i][spec.id];
      for (const column of spec.columns) {
        const td = tr.insertCell();
        td.textContent = cell(rows[i], column);
        if (column.numeric) td.className = "num";
      }
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    count.textContent = `${shown.length} of ${rows.length} shown`;
  }

  function sortBy(th) {
    const column = spec.columns.find((c) => c.key === th.dataset.key);
    const direction = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    const compare = column.numeric ? (x, y) => x - y : (x, y) => String(x).localeCompare(String(y));
    order = rows.map((_, i) => i).sort((a, b) => {
      const x = rows[a][column.key], y = rows[b][column.key];
      if (missing(x) || missing(y)) return (missing(x) - missing(y)) || a - b;
      return direction * compare(x, y) || a - b;
    });
    for (const h of headers) {
      h.removeAttribute("aria-sort");
      h.textContent = h.textContent.replace(/ [▲▼]$/, "");
    }
    th.setAttribute("aria-sort", direction === 1 ? "ascending" : "descending");
    th.textContent += direction === 1 ? " ▲" : " ▼";
    draw();
  }

  for (const th of headers) th.addEventListener("click", () => sortBy(th));
  for (const select of selects) select.addEventListener("change", draw);
  search.addEventListener("input", draw);
  draw();
})(document.currentScript.closest(".explorer"));
