"""A QA fine-tune made the way most people make one: a plain `transformers.Trainer` script.

It exists to prove that `sftlens audit` works on a fine-tune sftlens did not make: it imports nothing
from sftlens. Input: JSONL rows with `prompt` and `completion` (the prompt-completion format of TRL and
of `sftlens split`'s training files); the loss is on the completion and the closing EOS only.

    python scripts/trainer_qa_finetune.py --model BASE_FOLDER --data train.jsonl --out FT_FOLDER \
        --learning-rate 1e-4 --epochs 1 --batch-size 8 --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)


def read_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if not {"prompt", "completion"} <= row.keys():
            raise SystemExit(f"{path}:{number}: a row needs 'prompt' and 'completion'")
    return rows


def encode(tokenizer, row: dict) -> dict:
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [-100] * (len(bos) + len(prompt)) + answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    examples = [encode(tokenizer, row) for row in read_rows(args.data)]
    training = TrainingArguments(
        output_dir=str(args.out.with_name(args.out.name + ".checkpoints")), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, save_strategy="no", logging_steps=10,
        report_to="none", use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training, train_dataset=examples, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    result = trainer.train()
    trainer.save_model(str(args.out))
    (args.out / "finetune.json").write_text(json.dumps(
        {"script": "scripts/trainer_qa_finetune.py", "base": args.model, "data": str(args.data),
         "rows": len(examples), "learning_rate": args.learning_rate, "epochs": args.epochs,
         "batch_size": args.batch_size, "seed": args.seed, "steps": trainer.state.global_step,
         "train_loss": result.training_loss}, indent=2) + "\n")
    print(f"{args.out}: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
