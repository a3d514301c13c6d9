"""Fact importances and the score of the guided repair (`METHODS["guided"]`): which weight elements to
set back to the base, chosen with the facts the fine-tune forgot and the facts it learned.

Importances (one pass over the facts, at the fine-tuned weights theta = f)
-------------------------------------------------------------------------
For a set S of facts, each a prompt q and an answer a,

    F_S[i] = sum over (q, a) in S of ( d/d theta_i  log p_f(a | q) )^2

a diagonal (empirical) Fisher: one forward and backward per fact (the square of a batch's summed
gradient would not be the sum of the facts' squares), squares accumulated in fp32. log p(a | q) sums
the log-probabilities of a's tokens after q's: q is encoded as greedy decoding encodes its prompts
(`sftlens.data.encode_prompt` with the caller's tokenizer: the plain format, or a chat-rendered
prompt through `sftlens.audit.prompts.Templated`), a alone as its text with a leading space when q
ends in a non-space (the plain format asks "... <answer>" and answers " {a}"; a chat prompt ends in
its own separator). Two sets: S = forgotten (facts right on the base, wrong on the fine-tune; a = the
base model's greedy answer, judged right) and S = learned (wrong on the base, right on the fine-tune;
a = the fine-tuned model's greedy answer). Every floating-point tensor of the checkpoint gets both.

Score and knob
--------------
With b the base and f the fine-tuned weights, n_forgotten and n_learned the facts in each set, and
per-fact means Fbar_S = F_S / n_S,

    score[i] = |f[i] - b[i]| * Fbar_forgotten[i] / (Fbar_learned[i] + eps)
    eps      = the mean of Fbar_learned over the region's elements

in fp32, in that order (|f - b|, then each mean, the sum, the quotient, the product; eps is a Python
float from the file's fp64 sums); a NaN (0 * inf, only where f = b) counts 0 and an overflow the
largest float. The size of the update times how much more the forgotten answers depend on the element,
per fact, than the learned ones do; eps floors the learned importance at its average, so an element
no learned fact touches is not infinitely attractive. The knob k in (0, 100]: the exactly floor(n k /
100) elements of the region with the top scores take their base values (`sftlens.weights.selection`,
global scope, ties by sorted tensor name then flat index; nested across k); neutral value k = 0 (no
element: the fine-tuned model bit for bit).

The file
--------
One safetensors file: tensors `forgotten/{name}` and `learned/{name}` (fp32, the checkpoint's shapes),
metadata `format`, `key` (the caller's: models, facts, answers, settings), `counts` {forgotten,
learned}, `sums` {name: [sum F_forgotten, sum F_learned]} (fp64, for eps), `finetuned` (the fine-tuned
model's fingerprint: an edit of another model is refused). The score reads it in blocks of the same
rows as the checkpoints (`safe_open` slices), so selecting stays streamed, memory flat in model size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlens.data.prompts import encode_prompt
from sftlens.errors import SftlensError
from sftlens.weights.checkpoints import CheckpointPair, Chunk, tensors_by_checkpoint_name

FORMAT = "sftlens-importances/1"
KINDS = ("forgotten", "learned")
_FLOAT_MAX = torch.finfo(torch.float32).max


# --- computing -------------------------------------------------------------------------------


def answer_text(prompt: str, answer: str) -> str:
    """The answer as it continues the prompt: a leading space after a prompt that ends in a non-space."""
    answer = answer.strip()
    return answer if not prompt or prompt[-1].isspace() else f" {answer}"


def fact_tokens(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's BOS, answer ids) of one fact."""
    return encode_prompt(tokenizer, prompt), tokenizer(answer_text(prompt, answer), add_special_tokens=False)["input_ids"]


def answer_log_likelihood(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """log p(answer | prompt), summed over the answer's tokens, as a differentiable scalar."""
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids, device=logits.device)[:, None]).sum()


def fisher_diagonals(model, tokenizer, facts: dict[str, list[tuple[str, str]]], names: list[str],
                     progress: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """{kind: {checkpoint name: F_kind}} (fp32, on the CPU) and the facts counted per kind, for
    `facts` = {kind: [(prompt, answer), ...]} (see the module doc); a fact without answer tokens is
    left out. The model's gradients are cleared afterwards and its `requires_grad` flags kept."""
    from tqdm.auto import tqdm

    params = tensors_by_checkpoint_name(model, keep_vars=True)
    missing = [n for n in names if not isinstance(params.get(n), torch.nn.Parameter)]
    if missing:
        raise SftlensError(f"the model has no parameter {missing[0]} of its checkpoint: its importances cannot be "
                           "computed")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(params[n]) for n in names}
    sums = {kind: {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names}
            for kind in facts}
    counts = dict.fromkeys(facts, 0)
    kind_now = [None]
    # Each parameter's square goes into the sums the moment its gradient is complete, and the gradient is
    # dropped: never a whole model's gradients at once (memory: the model, the sums, one tensor's gradient).
    names_of: dict[int, list[str]] = {}
    for n in names:  # a tied tensor: every checkpoint name it has, from its one gradient
        names_of.setdefault(id(params[n]), []).append(n)

    def accumulate(param: torch.nn.Parameter) -> None:
        square = param.grad.float().square()
        for n in names_of[id(param)]:
            sums[kind_now[0]][n].add_(square)
        param.grad = None

    handles = []
    try:
        model.zero_grad(set_to_none=True)  # a gradient left by the caller must not enter the first fact's square
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        for group in names_of.values():  # one at a time, so a failure leaves only registered hooks to remove
            handles.append(params[group[0]].register_post_accumulate_grad_hook(accumulate))
        with torch.enable_grad(), tqdm(total=sum(map(len, facts.values())), desc="fact importances", unit="fact",
                                       disable=not progress) as bar:
            for kind, pairs in facts.items():
                kind_now[0] = kind
                for prompt, answer in pairs:
                    prompt_ids, answer_ids = fact_tokens(tokenizer, prompt, answer)
                    bar.update()
                    if not answer_ids:
                        continue
                    answer_log_likelihood(model, prompt_ids, answer_ids).backward()
                    counts[kind] += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return {kind: {n: t.cpu() for n, t in by_name.items()} for kind, by_name in sums.items()}, counts


def write_importances(path: str | Path, fishers: dict[str, dict[str, torch.Tensor]], counts: dict[str, int],
                      key: str, finetuned: str) -> Path:
    """The file of the module doc, written atomically (`finetuned`: the fine-tuned model's fingerprint)."""
    from safetensors.torch import save_file

    path = Path(path)
    names = sorted(fishers["forgotten"])
    tensors = {f"{kind}/{n}": fishers[kind][n].float().contiguous() for kind in KINDS for n in names}
    sums = {n: [float(fishers[kind][n].double().sum()) for kind in KINDS] for n in names}
    metadata = {"format": FORMAT, "key": key, "counts": json.dumps({k: counts[k] for k in KINDS}),
                "sums": json.dumps(sums), "finetuned": finetuned}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata)
    os.replace(tmp, path)
    return path


# --- reading and scoring ---------------------------------------------------------------------


@dataclass(frozen=True)
class Importances:
    """A stored importances file (see the module doc)."""

    path: Path
    key: str
    counts: dict[str, int]
    sums: dict[str, list[float]]
    finetuned: str
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, path: str | Path) -> Importances:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise SftlensError(f"{path}: no such importances file")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {name.partition("/")[2]: tuple(f.get_slice(name).get_shape())
                          for name in f.keys() if name.startswith("forgotten/")}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
            return cls(path, meta["key"], json.loads(meta["counts"]), json.loads(meta["sums"]), meta["finetuned"],
                       shapes)
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise SftlensError(f"{path}: not an importances file ({err})") from None

    def read(self, kind: str, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows [start, stop) of `kind`'s importance of tensor `name` (the whole tensor for None)."""
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            key = f"{kind}/{name}"
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]

    def check(self, pair: CheckpointPair, names: list[str]) -> None:
        """One-line errors: importances of another fine-tuned model, or without a region tensor."""
        from sftlens.models import model_fingerprint

        if self.finetuned != model_fingerprint(str(pair.finetuned.root)):
            raise SftlensError(f"{self.path}: importances of another fine-tuned model than {pair.finetuned.root}")
        for name in names:
            if self.shapes.get(name) != pair.base.shapes[name]:
                raise SftlensError(f"{self.path}: no importance of shape {list(pair.base.shapes[name])} for tensor "
                                   f"{name}")
        if min(self.counts[k] for k in KINDS) < 1:
            empty = next(k for k in KINDS if self.counts[k] < 1)
            raise SftlensError(f"{self.path}: no {empty} fact counted")

    def epsilon(self, names: list[str]) -> float:
        """eps: the mean over the region's elements of the learned facts' per-fact importance."""
        total = sum(self.sums[n][1] for n in names)
        elements = sum(math.prod(self.shapes[n]) for n in names)
        eps = total / self.counts["learned"] / elements
        if not eps > 0 or not math.isfinite(eps):
            raise SftlensError(f"{self.path}: the learned facts have no finite importance in the region "
                               f"({len(names)} tensors): nothing to weigh the forgotten ones against")
        return eps


def guided_score(diff: torch.Tensor, forgotten: torch.Tensor, learned: torch.Tensor, n_forgotten: int,
                 n_learned: int, eps: float) -> torch.Tensor:
    """The module doc's score of fp32 blocks: diff = f - b, forgotten and learned the two F blocks."""
    ratio = (forgotten / n_forgotten).div_(learned / n_learned + eps)
    return diff.abs().mul_(ratio).nan_to_num_(nan=0.0, posinf=_FLOAT_MAX).contiguous()


def score_source(importances: Importances, pair: CheckpointPair, names: list[str]):
    """The selection's `Score` of the guided repair over the region `names` (checked first)."""
    importances.check(pair, names)
    eps = importances.epsilon(names)
    n_forgotten, n_learned = importances.counts["forgotten"], importances.counts["learned"]

    def score(name: str, chunk: Chunk) -> torch.Tensor:
        blocks = [importances.read(kind, name, chunk.rows).float() for kind in KINDS]
        if not all(math.isfinite(float(b.sum())) for b in blocks):
            raise SftlensError(f"{importances.path}: the importance of tensor {name} contains NaN or Inf")
        return guided_score(chunk.finetuned.float() - chunk.base.float(), *blocks, n_forgotten, n_learned, eps)

    return score
