"""Stage: SFT of a causal LM on an SFT set (paper Section 3.3, Appendix A): full-parameter (the
paper's) or LoRA (`method = "lora"`, PEFT), whose adapter is merged into the weights at the end so
that the output is the same plain HF folder either way.

Built on the transformers Trainer, so `accelerate launch -m sftlens train ...` gives multi-GPU,
FSDP or DeepSpeed with no code change; one process by default.

A run is keyed by the model's weights, the SFT file's bytes and the result-affecting settings.
It works in a sibling folder `.{out}.partial` (Trainer checkpoints + the staged model) and only
renames the finished model folder to `out` at the end, so `out` is either absent or complete.
Re-running a finished run returns at once; an interrupted run resumes from its last checkpoint;
an `out` that holds anything else is an error and is never touched.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sftlens.config import NOT_KEYED, add_config_arguments, config_from_args, config_to_dict, keyed_dict
from sftlens.data import add_fact_source_arguments, encode_prompt
from sftlens.data.rows import data_manifest, read_split_rows
from sftlens.errors import SftlensError
from sftlens.guards import (
    GUARDS,
    ActiveGuard,
    guard_spec,
    guarded_trainer,
    mixed_examples,
    parse_guard,
    replay_per_batch,
    replay_pool,
)
from sftlens.io import KeyedOutput, atomic_write_json, atomic_write_jsonl, read_jsonl, stable_hash
from sftlens.lora import lora_targets, require_peft, save_merged, with_lora
from sftlens.models import LOSS_FILE, RUN_FILE, load_model, model_fingerprint

IGNORE_INDEX = -100  # label value the HF causal-LM loss skips
SFT_KEYS = ("prompt", "completion")
# LoRA settings exist only for LoRA runs: a full-SFT config's dict (and so its run key) is what it
# was before LoRA was added.
LORA_ONLY = {"omit_unless": ("method", "lora")}


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step (per process)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the SFT set"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "learning-rate schedule"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps of linear warm-up"})
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = field(
        default="adamw_torch", metadata={"help": "optimizer (transformers `optim` name)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and any randomness"})
    max_length: int | None = field(
        default=None, metadata={"help": "longest example in tokens (default: the model's context)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (mixed precision; weights stay fp32)"})
    # Not keyed: resuming with another checkpoint interval continues the same run.
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps (for resuming)", **NOT_KEYED})
    method: Literal["full", "lora"] = field(
        default="full", metadata={"help": "full-parameter SFT, or LoRA merged into the weights", **LORA_ONLY})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r", **LORA_ONLY})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)",
                                                  **LORA_ONLY})
    # None = found in the model (`default_lora_targets`), a value no explicit list takes, so a config
    # naming its targets keeps the key it had when Llama's projections were the default
    lora_targets: tuple[str, ...] | None = field(
        default=None, metadata={"help": "module names that get LoRA adapters (default: every linear layer "
                                        "of the transformer blocks, found in the model)", **LORA_ONLY})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input", **LORA_ONLY})
    # Off by default and then out of the config's dict, so runs without a guard keep their keys.
    guard: str | None = field(
        default=None, metadata={"help": f"a guard against forgetting, NAME=VALUE ({', '.join(GUARDS)}; "
                                        "see sftlens.guards)", "omit_if_default": True})

    def __post_init__(self):
        positive = {"batch_size": self.batch_size, "epochs": self.epochs,
                    "learning_rate": self.learning_rate, "save_steps": self.save_steps,
                    "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")
        if self.guard is not None:
            self._check_guard()

    def _check_guard(self) -> None:
        name, value = parse_guard(self.guard)
        object.__setattr__(self, "guard", guard_spec(name, value))
        if self.method == "lora":
            raise ValueError(f"guard {name}: guards apply to full SFT (LoRA is a way of its own to forget less)")
        if name == "replay":
            replay_per_batch(value, self.batch_size)
        if name == "mofo" and not self.optimizer.startswith("adamw"):
            raise ValueError(f"guard mofo needs an Adam optimizer (its first moment), not {self.optimizer}")


def encode_example(tokenizer, prompt: str, completion: str) -> dict:
    """BOS + prompt, then completion + EOS; labels hide the prompt so only the answer is learned.

    Prompt and completion are tokenized separately, exactly as evaluation feeds the prompt and
    lets the model continue, so no token straddles the boundary.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_sft_set(tokenizer, rows: list[dict], path: Path, max_length: int) -> list[dict]:
    if tokenizer.eos_token_id is None:
        raise SftlensError("the tokenizer has no EOS token, which ends every training answer")
    examples = []
    for number, row in enumerate(rows, 1):
        for key in SFT_KEYS:
            if not isinstance(row[key], str) or not row[key].strip():
                raise SftlensError(f"{path}: example {number}: {key!r} must be a non-empty string")
        example = encode_example(tokenizer, row["prompt"], row["completion"])
        if len(example["input_ids"]) > max_length:
            raise SftlensError(
                f"{path}: example {number} ({row.get('fact_id', 'no fact_id')}) is "
                f"{len(example['input_ids'])} tokens, longer than the context of {max_length}"
            )
        examples.append(example)
    return examples


def _training_arguments(config: TrainConfig, checkpoint_dir: Path, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the steps
        optim=config.optimizer,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,  # the last checkpoint is all resuming needs
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_drop_last=False,
        remove_unused_columns=False,
    )


def _callbacks(progress: bool):
    from transformers import ProgressCallback, TrainerCallback

    class LossBar(ProgressCallback):
        """Trainer's bar, with the running loss as a postfix instead of a printed dict per step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    class NoFinalCheckpoint(TrainerCallback):
        """The finished model is saved by `train`; a last checkpoint would add an optimizer-state
        write (twice the weights) that nothing reads."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

    return [LossBar()] if progress else [], NoFinalCheckpoint()


def _build_trainer(model, tokenizer, examples: list[dict], args, progress: bool, callbacks=(),
                   guard: ActiveGuard | None = None, ordered: bool = False):
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, ProgressCallback

    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = guarded_trainer(guard, ordered)(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=collator,
        processing_class=tokenizer,
    )
    for default in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default)
    bar, no_final = _callbacks(progress)
    for callback in (*bar, no_final, *callbacks):
        trainer.add_callback(callback)
    return trainer


def loss_log(log_history: list[dict]) -> list[dict]:
    """One row per optimizer step: loss, the learning rate applied at that step, grad norm."""
    keys = ("step", "loss", "learning_rate", "grad_norm", "epoch")
    return [{k: entry.get(k) for k in keys} for entry in log_history if "loss" in entry]


def _run_identity(model: str, manifest: dict, config: TrainConfig, replay: list[dict] | None = None) -> dict:
    settings = keyed_dict(config)
    identity = {"model_fingerprint": model_fingerprint(model),
                "data": {"sha256": manifest["sha256"], "count": manifest["count"]},
                "config": settings}
    if replay:  # only a replaying run reads the pool, so only its key depends on it
        identity["replay"] = {"sha256": stable_hash(replay), "count": len(replay)}
    return {"key": stable_hash(identity), **identity}


def _finished_key(out_dir: Path) -> str | None:
    """The run key of a finished run in `out_dir`, None if absent or empty; error if foreign."""
    return KeyedOutput(out_dir, record=RUN_FILE, what="an sftlens training run").finished_key()


def _prepare_work_dir(work_dir: Path, key: str, progress: bool) -> Path | None:
    """Reuse a partial run with the same key (returning its last checkpoint), else start afresh."""
    from transformers.trainer_utils import get_last_checkpoint

    work_dir = KeyedOutput.staged_at(work_dir, key).partial(say=print if progress else None)
    checkpoints = work_dir / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and progress:
        print(f"resuming from {last}")
    return Path(last) if last else None


def _finish(trainer, work_dir: Path, out_dir: Path, record: dict) -> None:
    staged = work_dir / "model"
    if record["method"] == "lora":
        save_merged(trainer, staged)
    else:
        # Every process takes part (FSDP/DeepSpeed gather the weights); it saves the tokenizer too.
        trainer.save_model(str(staged))
    if trainer.is_world_process_zero():
        atomic_write_jsonl(staged / LOSS_FILE, loss_log(trainer.state.log_history))
        atomic_write_json(staged / RUN_FILE, record)
        # `out_dir` is absent or empty (checked by _finished_key); the staging folder goes with the rename
        KeyedOutput(out_dir, record["key"], RUN_FILE).publish(staged)
    trainer.accelerator.wait_for_everyone()


def train(model: str, sft_path: Path, out_dir: Path, config: TrainConfig = TrainConfig(),
          progress: bool = True, *, callbacks=(), replay: list[dict] | None = None) -> Path:
    """SFT `model` (a --model spec) on the JSONL at `sft_path`; return the finished model folder.

    `callbacks` are extra transformers TrainerCallbacks (logging, early stopping, ...); `replay` are the
    SFT rows of the known facts `--guard replay=r` mixes in (`sftlens.guards.known_rows`).
    """
    from transformers import set_seed

    if config.method == "lora":
        require_peft()
    sft_path, out_dir = Path(sft_path), Path(out_dir)
    rows = read_split_rows(sft_path, SFT_KEYS)
    manifest = data_manifest(sft_path, rows)
    replay = replay_pool(config, replay, sft_path)
    identity = _run_identity(model, manifest, config, replay)
    finished = _finished_key(out_dir)
    if finished == identity["key"]:
        if progress:
            print(f"{out_dir}: already trained, skipping")
        return out_dir
    if finished is not None:
        raise SftlensError(f"{out_dir}: holds another training run (key {finished}); choose another --out")

    set_seed(config.seed)
    net, tokenizer = load_model(model, dtype="float32", device="cpu")
    context = config.max_length or getattr(net.config, "max_position_embeddings", None) or 2048
    examples = encode_sft_set(tokenizer, rows, sft_path, context)
    settings = config_to_dict(config)
    if config.method == "lora":
        targets = lora_targets(net, model, config)
        settings["lora_targets"] = list(targets)  # the record names the targets auto chose
        if progress:
            print(f"LoRA on {', '.join(targets)}")
        net = with_lora(net, targets, config)
    guard = ActiveGuard(*parse_guard(config.guard), net) if config.guard else None
    guard_record, ordered = None, False
    if guard:
        guard_record = {"name": guard.name, "value": guard.value, "cost": GUARDS[guard.name].cost,
                        "extra_bytes": guard.extra_bytes(net), "frozen": guard.frozen}
        if replay:
            pool = encode_sft_set(tokenizer, replay, Path(f"{sft_path} (replayed facts)"), context)
            examples, guard_record["replayed"] = mixed_examples(examples, pool, replay, config, guard)
            ordered = True

    work_dir = out_dir.with_name(f".{out_dir.name}.partial")
    args = _training_arguments(config, work_dir / "checkpoints", progress)
    # Under `accelerate launch` rank 0 sets the work folder up before the others look at it.
    with args.main_process_first(local=False, desc="preparing the work folder"):
        last_checkpoint = _prepare_work_dir(work_dir, identity["key"], progress and args.process_index == 0)
    trainer = _build_trainer(net, tokenizer, examples, args, progress, callbacks, guard, ordered)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    record = {
        **identity, "model": model, "data": manifest, "method": config.method, "config": settings,
        "steps": trainer.state.global_step, "train_seconds": round(time.perf_counter() - started, 3),
        "train_loss": result.training_loss, "resumed_from": last_checkpoint and last_checkpoint.name,
        **({"guard": guard_record} if guard_record else {}),
    }
    _finish(trainer, work_dir, out_dir, record)
    return out_dir


def _guard_from_args(args: argparse.Namespace) -> str | None:
    guards = args.guard or []
    if len(guards) > 1:
        raise SftlensError(f"--guard: one guard per run, got {', '.join(guards)}")
    return guards[0] if guards else None


def _replay_from_args(args: argparse.Namespace, config: TrainConfig) -> list[dict] | None:
    """The known training facts of --probe-store (read with the fact source flags), for --guard replay."""
    from sftlens.data import fact_set_from_args
    from sftlens.guards import known_rows, replays
    from sftlens.probe import load_probe

    if not replays(config):
        if args.probe_store:
            raise SftlensError("--probe-store is read by --guard replay only")
        return None
    if not args.probe_store:
        raise SftlensError(f"--guard {config.guard} needs the base's probe store (--probe-store DIR): "
                           "the facts it answers right are the ones replayed")
    own = {row.get("fact_id") for row in read_split_rows(Path(args.data), SFT_KEYS)}
    return known_rows(load_probe(args.probe_store), fact_set_from_args(args, splits=("train",)).facts, own)


def _run_train(args: argparse.Namespace) -> None:
    args.guard = _guard_from_args(args)
    config = config_from_args(TrainConfig, args)
    replay = _replay_from_args(args, config)
    out = train(args.model, Path(args.data), Path(args.out), config, progress=True, replay=replay)
    run = json.loads((out / RUN_FILE).read_text())
    losses = [row["loss"] for row in read_jsonl(out / LOSS_FILE)]
    print(f"{out}: {run['steps']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("train", help="supervised fine-tuning on an SFT set (JSONL)")
    parser.add_argument("--model", required=True, help="built-in name, local HF folder or hub id")
    parser.add_argument("--data", required=True, help="SFT set: JSONL rows with prompt and completion")
    parser.add_argument("--out", required=True, help="folder for the fine-tuned model")
    add_config_arguments(parser, TrainConfig, exclude=("guard",))
    parser.add_argument("--guard", action="append", metavar="NAME=VALUE",
                        help=f"a guard against forgetting ({', '.join(GUARDS)}; one per run; see sftlens.guards)")
    parser.add_argument("--probe-store", help="with --guard replay: the base model's probe store, whose known "
                                              "training facts (level 4) are replayed")
    add_fact_source_arguments(parser)
    parser.set_defaults(func=_run_train, writes="out")

