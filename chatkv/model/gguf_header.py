"""What a GGUF file says about itself, read from its header before any tensor is touched.

A GGUF file starts with its metadata (key/value pairs: architecture, context length, tokenizer, chat
template) and its tensor table (name, shape, type, offset), then the tensor data. ``read_gguf_header``
reads the scalar and string values and the tensor table and only steps over arrays (the vocabulary,
the merges), so it answers in milliseconds: ``gguf.GGUFReader`` builds a numpy view for every array
element and took 2.2 s on SmolLM2's 49k-token vocabulary here. The format's constants (magic, value
and tensor types, block sizes) come from the ``gguf`` package. Format: ggml's docs/gguf.md.

``check_chat_gguf`` turns what the header says into a refusal with what to do, before the seconds and
the disk that loading or converting the tensors would take: a truncated file, an architecture
transformers cannot load from GGUF, a model with no chat template.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# llama.cpp's architecture names that transformers' GGUF loader knows by another name
TRANSFORMERS_ARCHITECTURE_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                                   "minimax-m2": "minimax_m2"}


class GgufHeaderError(ValueError):
    """The file is not a GGUF file chatkv can use; the message says why and what to do."""


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # as stored: the fastest-varying dimension first
    type_name: str  # GGML type, e.g. "Q4_K"
    offset: int  # from the start of the data section, bytes
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    """The metadata values (arrays left out) and the tensor table; ``data_end``: where the last tensor ends, bytes."""

    version: int
    metadata: dict[str, object]
    tensors: list[GgufTensorInfo] = field(repr=False)
    data_end: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template.strip() else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def tensor_types(self) -> set[str]:
        return {tensor.type_name for tensor in self.tensors}


def read_gguf_header(path: Path) -> GgufHeader:
    """Read ``path``'s metadata and tensor table. Raises ``GgufHeaderError`` for a file that is not GGUF or ends early."""
    try:
        with open(path, "rb") as stream:
            header = _read(stream)
    except (struct.error, EOFError, UnicodeDecodeError) as exc:
        raise GgufHeaderError(f"{path} ends inside its header ({exc}): the file is truncated or not a GGUF file") from None
    size = path.stat().st_size
    if header.data_end > size:
        raise GgufHeaderError(f"{path} is truncated: its tensors need {header.data_end:,} bytes, the file has {size:,} "
                              "(an interrupted download or copy?); fetch it again")
    return header


def check_chat_gguf(path: Path, supported_architectures: set[str]) -> GgufHeader:
    """The header of a GGUF that chatkv can chat with; raises ``GgufHeaderError`` saying what to do otherwise.

    ``supported_architectures``: the GGUF architecture names transformers loads (``supported_gguf_architectures``).
    """
    header = read_gguf_header(path)
    architecture = header.architecture
    if TRANSFORMERS_ARCHITECTURE_NAMES.get(architecture, architecture) not in supported_architectures:
        raise GgufHeaderError(
            f"{path.name} holds a {architecture or 'unnamed'} model, which chatkv cannot load from GGUF. "
            f"Architectures it can load: {', '.join(sorted(supported_architectures))}.")
    if header.chat_template is None:
        raise GgufHeaderError(
            f"{path.name} has no chat template in its metadata (tokenizer.chat_template), so it is most likely a base "
            "model, which continues text rather than answering. Use the instruction-tuned GGUF of the same model "
            "(its name usually says Instruct, -it or chat).")
    return header


def supported_gguf_architectures() -> set[str]:
    """The architectures transformers' GGUF loader maps to a config (without importing torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def _read(stream: BinaryIO) -> GgufHeader:
    magic, version = struct.unpack("<II", _exactly(stream, 8))
    if magic != GGUF_MAGIC:
        raise GgufHeaderError(f"{stream.name} is not a GGUF file (it does not start with 'GGUF')")
    if version < 2:
        raise GgufHeaderError(f"{stream.name} is GGUF version {version}; chatkv reads versions 2 and later")
    n_tensors, n_values = struct.unpack("<QQ", _exactly(stream, 16))
    metadata: dict[str, object] = {}
    for _ in range(n_values):
        key = _string(stream)
        value_type = GGUFValueType(_unpack(stream, "<I"))
        value = _value(stream, value_type)
        if value is not None:
            metadata[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = _string(stream)
        n_dims = _unpack(stream, "<I")
        shape = tuple(_unpack(stream, "<Q") for _ in range(n_dims))
        tensor_type = GGMLQuantizationType(_unpack(stream, "<I"))
        offset = _unpack(stream, "<Q")
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        elements = 1
        for dim in shape:
            elements *= dim
        tensors.append(GgufTensorInfo(name, shape, tensor_type.name, offset, elements // block_size * type_size))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-stream.tell() // alignment) * alignment
    data_end = data_start + max((tensor.offset + tensor.n_bytes for tensor in tensors), default=0)
    return GgufHeader(version, metadata, tensors, data_end)


def _value(stream: BinaryIO, value_type: GGUFValueType) -> object:
    """A scalar or string value; an array is stepped over (None)."""
    if value_type == GGUFValueType.STRING:
        return _string(stream)
    if value_type == GGUFValueType.ARRAY:
        item_type = GGUFValueType(_unpack(stream, "<I"))
        count = _unpack(stream, "<Q")
        if item_type in SCALAR_FORMATS:
            stream.seek(count * struct.calcsize(SCALAR_FORMATS[item_type]), 1)
        else:
            for _ in range(count):
                _value(stream, item_type)
        return None
    return _unpack(stream, SCALAR_FORMATS[value_type])


def _string(stream: BinaryIO) -> str:
    length = _unpack(stream, "<Q")
    return _exactly(stream, length).decode("utf-8")


def _unpack(stream: BinaryIO, fmt: str):
    return struct.unpack(fmt, _exactly(stream, struct.calcsize(fmt)))[0]


def _exactly(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise EOFError(f"wanted {count} bytes at {stream.tell() - len(data)}, found {len(data)}")
    return data
