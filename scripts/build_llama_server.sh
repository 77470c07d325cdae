#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once from the llama.cpp sources vendored in the llama-cpp-python sdist
# (the version installed here), and cache the binary outside the clone. Idempotent: when the binary is
# already there it prints its path and does nothing else. Used by .ci/run, tests/test_lora_server.py
# and benches/bench_lora.py.
#   scripts/build_llama_server.sh              build if needed, print the binary's path
#   scripts/build_llama_server.sh --print-path print the path; exit 1 (without building) when it is absent
# Environment: MOEDB_LLAMA_SERVER (an existing llama-server binary to use instead),
#              MOEDB_LLAMA_SERVER_CACHE (default ~/.cache/moedb-test/llama-server),
#              LLAMA_CPP_PYTHON_VERSION (default: the installed llama-cpp-python, else 0.3.36),
#              BUILD_JOBS (default 2).
set -euo pipefail
CACHE="${MOEDB_LLAMA_SERVER_CACHE:-$HOME/.cache/moedb-test/llama-server}"
BIN="${MOEDB_LLAMA_SERVER:-$CACHE/bin/llama-server}"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
if [ "${1:-}" = "--print-path" ]; then
  echo "$BIN"
  exit 1
fi
if [ -n "${MOEDB_LLAMA_SERVER:-}" ]; then
  echo "MOEDB_LLAMA_SERVER=$MOEDB_LLAMA_SERVER is not an executable file" >&2
  exit 1
fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || echo 0.3.36)}"
JOBS="${BUILD_JOBS:-2}"
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server from the llama-cpp-python $VERSION sdist in $WORK" >&2
# only this package as a source archive (its build tools come as wheels: pip prepares its metadata)
python -m pip download -q --no-binary llama-cpp-python --no-deps --dest "$WORK" "llama-cpp-python==$VERSION" >&2
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" --config Release --target llama-server -j "$JOBS" >&2
mkdir -p "$CACHE/bin"
# copy then rename, so a concurrent caller never sees a half-written binary
cp "$WORK/build/bin/llama-server" "$CACHE/bin/.llama-server.tmp"
mv "$CACHE/bin/.llama-server.tmp" "$CACHE/bin/llama-server"
echo "$VERSION" > "$CACHE/VERSION"
echo "$CACHE/bin/llama-server"
