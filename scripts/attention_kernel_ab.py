"""Times the paged decode kernel against a variant of its source, interleaved, on a 16-session bf16 pool.

    .venv/bin/python scripts/attention_kernel_ab.py [VARIANT.cpp] [--hot]

The variant (default: the kernel's own source, which measures the noise) is built under another op
namespace (``chatkvb``) beside chatkv's kernels; both then attend the same 30 layers of SmolLM2's shape
(9 query heads, 3 KV heads, head_dim 64), 16 sequences of 150-230 tokens in shuffled 16-token blocks
laid out as the pool lays them out (``chatkv.engine.kv_blocks``), each call storing the step's new keys
and values as the engine's does, one thread, 25 rounds taking turns. ``--hot`` reuses one layer's keys and values for all 30 calls, so
they stay in cache: how much of the time is memory and how much the kernel's own arithmetic. Prints
the median per 30-layer step and the K/V bytes read per second.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from chatkv import kernels
from chatkv.engine.kv_blocks import KvLayout, layer_caches

LAYERS, SEQUENCES, BLOCK, KV_HEADS, HEADS, HEAD_DIM = 30, 16, 16, 3, 9, 64


def build_variant(source: Path):
    text = source.read_text().replace("(chatkv,", "(chatkvb,")
    copy = Path(cpp_extension._get_build_directory("chatkv_variant", verbose=False)) / "variant.cpp"
    copy.write_text(text)
    cpp_extension.load(name=f"chatkv_variant_{hashlib.sha1(text.encode()).hexdigest()[:10]}", sources=[str(copy)],
                       extra_cflags=["-O3", "-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.chatkvb.paged_decode_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", nargs="?", default=str(kernels.SOURCES[0]))
    parser.add_argument("--hot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reason = kernels.load()
    if reason:
        raise SystemExit(reason)
    ops = {"chatkv": torch.ops.chatkv.paged_decode_attention, "variant": build_variant(Path(args.variant))}
    rng = random.Random(0)
    lengths = [rng.randint(150, 230) for _ in range(SEQUENCES)]
    blocks = [-(-n // BLOCK) for n in lengths]
    order = list(range(sum(blocks)))
    rng.shuffle(order)
    tables, taken = [], 0
    for count in blocks:
        tables.append(order[taken : taken + count])
        taken += count
    width = max(blocks)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    context_lens, rows = torch.tensor(lengths, dtype=torch.long), torch.arange(SEQUENCES)
    layout = KvLayout(1 if args.hot else LAYERS, KV_HEADS, HEAD_DIM)
    pool = torch.randn(layout.pool_shape(sum(blocks), BLOCK)).bfloat16()
    caches = layer_caches(pool, BLOCK)
    packed = torch.randn(SEQUENCES, HEADS + 2 * KV_HEADS, HEAD_DIM).bfloat16()  # the step's rows, as the model makes them
    query, new_keys, new_values = packed[:, :HEADS], packed[:, HEADS : HEADS + KV_HEADS], packed[:, HEADS + KV_HEADS :]
    output = torch.empty(SEQUENCES, HEADS, HEAD_DIM, dtype=torch.bfloat16)

    def step(op) -> None:
        for layer in range(LAYERS):
            keys, values = caches[0 if args.hot else layer]
            op(query, new_keys, new_values, keys, values, block_tables, context_lens, rows, output, HEAD_DIM**-0.5)

    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(26):
        for name, op in ops.items():
            started = time.perf_counter()
            step(op)
            times[name].append(time.perf_counter() - started)
    kv_bytes = sum(lengths) * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    for name, samples in times.items():
        median = statistics.median(samples[1:])
        print(f"{name}: {median * 1e3:.2f} ms per {LAYERS}-layer step, {kv_bytes / median / 1e9:.1f} GB/s of keys and values")


if __name__ == "__main__":
    main()
