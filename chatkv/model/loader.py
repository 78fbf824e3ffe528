"""Load a model and its tokenizer with the chosen dtype and device, and fingerprint it.

The fingerprint (model id, config hash, dtype with its weight quantization) says which model a KV
cache belongs to: a snapshot written under one fingerprint is never restored under another.

Llama-family models also get a ``LeanLlama`` (fused, optionally int8/int4 weights) that the engine
runs; the transformers model stays beside it for ``generate``, the baselines and other architectures.
Quantized weights are computed once and cached under ``models_dir/quantized``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from chatkv.model.errors import ModelError
from chatkv.model.source import ModelSource, ModelSourceError, Progress, _print_progress, resolve

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Fingerprint:
    model_id: str
    config_hash: str
    dtype: str

    def as_string(self) -> str:
        return f"{self.model_id}|{self.config_hash}|{self.dtype}"


@dataclass
class ModelBundle:
    model: Any  # a transformers causal LM
    tokenizer: Any
    fingerprint: Fingerprint
    dtype: torch.dtype
    device: torch.device
    load_seconds: float
    lean: Any = None  # chatkv.model.lean_llama.LeanLlama where the architecture allows; the engine runs it
    quant: str = "none"  # weight quantization of ``lean``: none, int8 or int4

    @property
    def engine_model(self) -> Any:
        """What the engine runs: the lean forward where there is one, else the transformers model."""
        return self.lean if self.lean is not None else self.model

    @property
    def reference_model(self) -> Any:
        """The full-recompute reference with the engine's own weights: transformers unless quantized."""
        return self.lean if self.quant != "none" else self.model

    @property
    def model_id(self) -> str:
        return self.fingerprint.model_id

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """``temperature``, ``top_p`` and ``repetition_penalty`` where the model's generation config sets them."""
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is None:
            return {}
        # only what the model's own file sets, not transformers' defaults
        given = generation_config.to_diff_dict()
        return {name: float(given[name]) for name in ("temperature", "top_p", "repetition_penalty")
                if isinstance(given.get(name), (int, float)) and not isinstance(given.get(name), bool)}

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX); plain AVX2 emulates bf16 slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"Unknown device {device!r}: choose auto, cpu or cuda.")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"Unknown dtype {dtype!r}: choose auto, bfloat16 or float32.")
    return DTYPES[dtype]


def config_hash(config: Any) -> str:
    """A hash of what shapes the computation, not of load-time details (path, dtype, versions)."""
    data = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset",
                "quantization_config", "use_cache"):
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


QUANT_CHOICES = ("auto", "none", "int8", "int4")
AUTO_QUANT = "int4"  # chosen by measurement: see docs/benchmarks.md, "Weights"


def choose_quant(quant: str, dtype: torch.dtype, device: torch.device, config: Any) -> str:
    """``auto``: int4 on CPU in bf16 for Llama-family models; fp32 stays unquantized, the exact reference mode."""
    from chatkv.model.lean_llama import lean_supported

    if quant not in QUANT_CHOICES:
        raise ModelError(f"Unknown quantization {quant!r}: choose auto, none, int8 or int4.")
    if quant == "auto":
        return AUTO_QUANT if device.type == "cpu" and dtype == torch.bfloat16 and lean_supported(config) else "none"
    if quant != "none":
        if device.type != "cpu":
            raise ModelError(f"--quant {quant} uses torch's CPU kernels; use --quant none with --device cuda.")
        if not lean_supported(config):
            raise ModelError(f"--quant {quant} is available for Llama-family models only; use --quant none for this one.")
    return quant


def load_model(
    spec: str,
    models_dir: Path,
    dtype: str = "auto",
    device: str = "auto",
    progress: Progress = _print_progress,
    allow_pull: bool = True,
    quant: str = "none",
) -> ModelBundle:
    """Resolve ``spec`` (fetching and converting the default model on first use) and load it.

    ``quant`` is auto, none, int8 or int4. ``load_seconds`` counts reading the checkpoint, not importing
    transformers, so every command reports the same figure for the same model. transformers' own progress
    bars are switched off: ``progress`` says what happens. Raises ``ModelError`` with a message for the user.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    try:
        source = resolve(spec, models_dir, progress, allow_pull=allow_pull)
    except ModelSourceError as exc:
        raise ModelError(str(exc)) from None
    try:
        tokenizer, model = _from_pretrained(source, torch_dtype)
    except OSError as exc:
        raise ModelError(_explain_load_failure(source, exc)) from None
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"{source.model_id} has no chat template in its tokenizer; chatkv needs a chat model.")
    chosen = choose_quant(quant, torch_dtype, torch_device, model.config)
    lean = _lean_model(model, chosen, torch_dtype, torch_device, source, models_dir, progress)
    weights = dtype_name(torch_dtype) if chosen == "none" else f"{dtype_name(torch_dtype)}+{chosen}"
    fingerprint = Fingerprint(source.model_id, config_hash(model.config), weights)
    return ModelBundle(model, tokenizer, fingerprint, torch_dtype, torch_device, time.perf_counter() - started,
                       lean=lean, quant=chosen)


def _lean_model(model: Any, quant: str, dtype: torch.dtype, device: torch.device, source: ModelSource,
                models_dir: Path, progress: Progress) -> Any:
    from chatkv.model.lean_llama import LeanLlama, QuantError, lean_supported
    from chatkv.model.quant_cache import load_or_quantize

    if not lean_supported(model.config):
        return None
    try:
        tensors = None
        if quant != "none":
            tensors = load_or_quantize(model, quant, source, config_hash(model.config), models_dir / "quantized", progress)
        return LeanLlama(model, quant, dtype, tensors)
    except (QuantError, RuntimeError) as exc:
        raise ModelError(f"Could not prepare {quant} weights for {source.model_id}: {exc}. Try --quant none.") from None


def _from_pretrained(source: ModelSource, torch_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**options):
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, **options)
        if source.gguf_file is None:
            options["use_safetensors"] = True  # never unpickle weights (pytorch_model.bin)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=torch_dtype, attn_implementation="sdpa", **options
        )
        return tokenizer, model

    if not source.is_hub_id:
        return load()
    try:
        return load(local_files_only=True)  # already in the Hugging Face cache: no network needed
    except OSError:
        if not _hub_reachable():
            raise OSError("the hub cannot be reached from here and the model is not in the local cache") from None
        return load()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before downloading: offline, transformers would retry for most of a minute."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _explain_load_failure(source: ModelSource, exc: OSError) -> str:
    reason = str(exc).strip().rstrip(".")
    if "safetensors" in reason.lower():
        return (
            f"{source.path} has no safetensors weights. chatkv does not load pickled weights (pytorch_model.bin); "
            "convert the model to safetensors, or pass a .gguf file"
        )
    if source.is_hub_id:
        return (
            f"Could not load {source.path!r} from the Hugging Face hub: {reason}. Download it where you have a "
            "network and pass --model with the local folder, or use a .gguf file; leave --model out for SmolLM2."
        )
    return f"Could not load the model from {source.path}: {reason}"
