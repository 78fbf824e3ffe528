#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-batched-bench from the copy of llama.cpp inside
# the PyPI sdist of llama-cpp-python (no other source is reachable here). The build is cached by version
# and flags; a second run only prints where the binaries are.
#
# AMX is turned off: the native build's AMX kernels SIGILL on this CPU under gcc 12.
#
# Usage: scripts/build_llama_cpp.sh            -> prints the bin folder on stdout (build log on stderr)
# Env:   CHATKV_LLAMA_CPP_DIR overrides the cache folder (default ~/.cache/chatkv-build/llama.cpp-VERSION)
set -euo pipefail
VERSION=0.3.36
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PREFIX="${CHATKV_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/chatkv-build/llama.cpp-$VERSION}"
BIN="$PREFIX/bin"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-batched-bench" ]; then
    echo "$BIN"; exit 0
fi
PYTHON="${PYTHON:-python3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
        -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS"
    cmake --build "$work/build" -j "$(nproc)" --target llama-server llama-bench llama-batched-bench
    mkdir -p "$BIN.tmp"
    cp "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$work/build/bin/llama-batched-bench" "$BIN.tmp/"
    rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
} >&2
echo "$BIN"
