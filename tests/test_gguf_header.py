"""A GGUF file's header is read before anything heavy: what it says decides, in a second, whether chatkv can chat
with it. GGUF files here are written with the ``gguf`` package's own writer (tiny, made in the test) or are the
real SmolLM2 file; the header reader is checked against ``gguf.GGUFReader``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from chatkv.model.gguf_header import GgufHeaderError, check_chat_gguf, read_gguf_header, supported_gguf_architectures
from chatkv.model.source import SMOLLM2_GGUF

def write_gguf(path: Path, architecture: str = "llama", chat_template: str | None = None) -> Path:
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_context_length(256)
    writer.add_block_count(1)
    writer.add_token_list(["<unk>", "a", "b", "c"])  # an array of strings, stepped over by the header reader
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.arange(4 * 8, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_matches_what_ggufs_own_reader_finds(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages }}")
    header = read_gguf_header(path)
    reader = GGUFReader(path)
    assert header.architecture == "llama" and header.context_length == 256
    assert header.chat_template == "{{ messages }}"
    assert [(t.name, t.type_name, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, t.tensor_type.name, t.data_offset - reader.data_offset, int(t.n_bytes)) for t in reader.tensors]
    assert 0 <= path.stat().st_size - header.data_end < 32  # the writer pads the last tensor to the alignment


@pytest.mark.real_model
def test_smollm2s_header_is_read_in_a_fraction_of_a_second_and_agrees_with_ggufs_reader(smollm2_dir, models_dir) -> None:
    path = models_dir / "gguf" / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"{path} is not in the model cache (the converted checkpoint came from elsewhere)")
    started = time.perf_counter()
    header = check_chat_gguf(path, supported_gguf_architectures())
    seconds = time.perf_counter() - started
    reader = GGUFReader(path)
    assert header.architecture == "llama" and header.context_length == 8192
    assert header.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert header.tensor_types == {"Q4_1", "Q8_0", "F32"}
    assert [(t.name, t.type_name, t.n_bytes) for t in header.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors]
    assert header.data_end == path.stat().st_size
    print(f"header read and checked in {seconds * 1000:.0f} ms")


def test_a_truncated_file_is_refused_saying_so(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "whole.gguf", chat_template="{{ messages }}").read_bytes()
    for cut in (len(whole) - 48, 40, 3):
        part = tmp_path / f"cut-{cut}.gguf"
        part.write_bytes(whole[:cut])
        with pytest.raises(GgufHeaderError, match="truncated"):
            read_gguf_header(part)


def test_a_file_that_is_not_gguf_and_an_architecture_transformers_cannot_load_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are not the weights you are looking for\n" * 4)
    with pytest.raises(GgufHeaderError, match="not a GGUF file"):
        read_gguf_header(text)
    odd = write_gguf(tmp_path / "odd.gguf", architecture="rwkv6", chat_template="{{ messages }}")
    with pytest.raises(GgufHeaderError, match="rwkv6 model, which chatkv cannot load from GGUF.*llama"):
        check_chat_gguf(odd, supported_gguf_architectures())


def test_launch_refuses_a_gguf_without_a_chat_template_before_importing_torch_or_writing_anything(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "base-model.gguf")
    script = tmp_path / "turns.jsonl"
    script.write_text('{"op":"open","tab":"a"}\n{"op":"quit"}\n')
    home = tmp_path / "home"
    # -X importtime lists every module imported, on stderr: torch must not be among them
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sys; from chatkv.cli import main; sys.exit(main())",
         "launch", "--headless", "--ephemeral",
         "--data-dir", str(home), "--model", str(model), "--script", str(script)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CHATKV_HOME": str(home)},
    )
    assert result.returncode == 1
    said = [line for line in result.stderr.splitlines() if line.startswith("chatkv:")]
    assert len(said) == 1 and "has no chat template" in said[0] and "instruction-tuned GGUF" in said[0], result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "chatkv.model.gguf_header" in imported
    assert not (home / "cache" / "models" / "converted").exists()
    assert result.stdout == ""
