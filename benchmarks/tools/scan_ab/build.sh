#!/usr/bin/env bash
# Build scan_ab from two source folders of the compiled scan (ttt/ops/scan/csrc layout):
#   benchmarks/tools/scan_ab/build.sh DIR_A DIR_B [OUT_DIR] ["extra flags A"] ["extra flags B"]
# PYTHON (default .venv/bin/python, else python3) supplies torch's headers and libraries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || { echo "usage: $0 DIR_A DIR_B [OUT_DIR] [FLAGS_A] [FLAGS_B]" >&2; exit 2; }
for d in "$1" "$2"; do
  [ -d "$d" ] || { echo "$0: no such folder: $d" >&2; exit 2; }
done
dir_a=$(cd "$1" && pwd); dir_b=$(cd "$2" && pwd)
out=${3:-$here/build}; flags_a=${4:-}; flags_b=${5:-}
for d in "$dir_a" "$dir_b"; do
  [ -f "$d/scan_linear.cpp" ] || { echo "$0: $d has no scan_linear.cpp (not a scan source folder)" >&2; exit 2; }
done
py=${PYTHON:-}
if [ -z "$py" ]; then
  root=$(cd "$here/../../.." && pwd)
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
inc=$("$py" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
lib=$("$py" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
abi=$("$py" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
# the flags of ttt/ops/extension.py's builds (OpenMP: at::parallel_for runs serially without it)
cxx=${CXX:-c++}
common="-O3 -DNDEBUG -fno-math-errno -funroll-loops -march=native -mprefer-vector-width=512 -fopenmp -std=c++17 -fPIC -D_GLIBCXX_USE_CXX11_ABI=$abi -w"
mkdir -p "$out"
rm -f "$out/a.o" "$out/b.o" "$out/main.o" "$out/scan_ab"
# shellcheck disable=SC2086
$cxx $common $inc -I"$dir_a" $flags_a -Dttt_scan=scan_a -DVARIANT_FN=forward_a -c "$here/variant.cpp" -o "$out/a.o" &
pid_a=$!
# shellcheck disable=SC2086
$cxx $common $inc -I"$dir_b" $flags_b -Dttt_scan=scan_b -DVARIANT_FN=forward_b -c "$here/variant.cpp" -o "$out/b.o" &
pid_b=$!
# shellcheck disable=SC2086
$cxx $common $inc -c "$here/main.cpp" -o "$out/main.o"
wait "$pid_a"
wait "$pid_b"
$cxx "$out/main.o" "$out/a.o" "$out/b.o" -o "$out/scan_ab" -L"$lib" -ltorch_cpu -lc10 -Wl,-rpath,"$lib" -fopenmp
echo "$out/scan_ab"
