"""The split-row format: the JSONL rows `sftlens split` writes (training, test and dev alike) and every
stage reads (train, evaluate, kl, inject's statements): `split_row` writes one, `read_split_rows` is
the one reader (errors name file and line), `data_manifest` records a file a run read (path, sha256,
count). Below the stages that write and read rows, so none of them imports another for the format.

A row: `fact_id, relation, domain, level, question, answers, prompt, completion` (`ROW_KEYS`;
`completion` uses the first answer; `answers` is `Fact.accepted_answers`, so a fact set's aliases follow
the answers and every row reader accepts them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sftlens.data.facts import Fact
from sftlens.data.prompts import sft_completion, sft_prompt
from sftlens.errors import SftlensError

# The keys of a split row, in the order `split_row` writes them; each reader requires the ones it reads.
ROW_KEYS = ("fact_id", "relation", "domain", "level", "question", "answers", "prompt", "completion")


def split_row(fact: Fact, level: int) -> dict:
    """One JSONL row in the paper's SFT format (Appendix A); the completion uses the first answer.
    `answers` holds a fact set's aliases after the answers, so every reader of rows accepts them."""
    return {
        "fact_id": fact.id, "relation": fact.relation, "domain": fact.domain, "level": level,
        "question": fact.question, "answers": list(fact.accepted_answers),
        "prompt": sft_prompt(fact.question), "completion": sft_completion(fact.answers[0]),
    }


def read_split_rows(path: Path, required: tuple[str, ...], allow_empty: bool = False) -> list[dict]:
    """Rows of a split JSONL file; a malformed line or a missing key names the file and line.
    An empty file is an error unless `allow_empty` (a test level the base model has no facts at)."""
    path = Path(path)
    if not path.is_file():
        raise SftlensError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SftlensError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SftlensError(f"{path}:{number}: expected a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise SftlensError(f"{path}:{number}: missing key {missing[0]!r}")
            rows.append(row)
    if not rows and not allow_empty:
        raise SftlensError(f"{path}: no examples (empty file)")
    return rows


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def data_manifest(path: Path, rows: list[dict]) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "count": len(rows)}
