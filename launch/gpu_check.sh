#!/usr/bin/env bash
# gpu_check.sh: the CUDA backend's tests on the lent GPU machine, in ONE device `run`.
#
# 1. Here (the CPU machine: nvcc present, no GPU), from the repository root, build for sm_90 (the
#    project's default architecture) into an ignored build folder (/build*/ is in .gitignore):
#        cmake -S . -B build-cuda -DCMAKE_CUDA_ARCHITECTURES=90
#        cmake --build build-cuda -j2 --target test_cuda_kernels        (a few minutes on 2 cores)
#        bash launch/gpu_check.sh --prepare build-cuda
#    --prepare writes build-gpu/: what `ctest -L gpu` needs (the ctest files, the test binary)
#    plus the shared libraries the binary links that are not glibc or CUDA (OpenBLAS, libgomp,
#    libstdc++, ...), a few MiB instead of the whole build folder. Optionally also run
#    `bash ../shared/device/devdeps.sh` to get .devdeps/ (its devenv.sh sets up the machine's CUDA
#    library paths; this test needs no MPI).
# 2. On the device machine, tool `run`:
#        carry:   ["build-gpu"]          (add ".devdeps" when it exists)
#        command: bash launch/gpu_check.sh build-gpu           timeout_s: 600
#    (ctest takes about a minute; memcheck and racecheck are capped at 5 and 2.5 minutes.)
#    Everything that travels (working tree + carry) must stay under 64 MiB.
#
# On the device it sources .devdeps/devenv.sh when present, prints nvidia-smi, makes the absolute
# paths that CMake wrote into the ctest files resolve (a symlink from the configure-time build
# folder to the carried one when the repository sits elsewhere there), links the carried
# libraries that the machine lacks into a fallback folder on LD_LIBRARY_PATH (never shadowing the
# machine's own), runs `ctest -L gpu --output-on-failure`, then, when compute-sanitizer exists,
# the test binary under memcheck (all but the largest tests) and racecheck (the attention tests
# of two head sizes). Logs go to $OUT (or ./gpu-check-logs). Exit status: 0 when every step passed.
set -uo pipefail

usage() { sed -n '2,26p' "$0"; }

# ---- --prepare BUILD_DIR: here, on the CPU machine -----------------------------------------------
if [ "${1:-}" = "--prepare" ]; then
  set -e
  build="${2:?usage: gpu_check.sh --prepare BUILD_DIR}"
  build="$(cd "$build" && pwd)"
  test_binary="$build/tests/test_cuda_kernels"
  if [ ! -x "$test_binary" ]; then
    echo "gpu_check: $test_binary is missing: build the target test_cuda_kernels first" >&2
    exit 1
  fi
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  out="$root/build-gpu"
  rm -rf "$out" && mkdir -p "$out/tests" "$out/libs"
  cp "$build/CTestTestfile.cmake" "$out/"
  # tests/CTestTestfile.cmake includes every test executable's *_include.cmake (tiny): without
  # their *_tests.cmake, the binaries left behind register as *_NOT_BUILT tests, unlabelled.
  cp "$build/tests/CTestTestfile.cmake" "$build"/tests/*_include.cmake "$out/tests/"
  cp "$build/tests/test_cuda_kernels[1]_tests.cmake" "$test_binary" "$out/tests/"
  echo "$build" > "$out/ORIGINAL_BUILD_DIR"
  # Shared libraries beyond glibc and CUDA (the device has those), copied under their sonames.
  ldd "$test_binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
    case "$soname" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|linux-vdso*) continue ;;
      libcuda.so.*|libcudart.so.*|libcublas.so.*|libcublasLt.so.*) continue ;;
    esac
    cp -L "$path" "$out/libs/$soname"
  done
  echo "gpu_check: wrote $out ($(du -sh "$out" | cut -f1));" \
       "libraries carried: $(cd "$out/libs" && echo *)"
  echo "gpu_check: on the device: carry [\"build-gpu\"]," \
       "command: bash launch/gpu_check.sh build-gpu (timeout_s 600)"
  exit 0
fi

case "${1:-}" in -h|--help|"") usage; [ -n "${1:-}" ] && exit 0; exit 2 ;; esac

# ---- BUILD_DIR: on the device machine ---------------------------------------------------------------
build="$(cd "$1" && pwd)" || { echo "gpu_check: no build folder $1 (was it carried?)" >&2; exit 2; }
logs="${OUT:-$PWD/gpu-check-logs}"
mkdir -p "$logs"
status=0

if [ -f .devdeps/devenv.sh ]; then
  # shellcheck disable=SC1091
  source .devdeps/devenv.sh || echo "gpu_check: devenv.sh failed; going on with the machine's paths" >&2
fi

nvidia-smi 2>&1 | tee "$logs/nvidia-smi.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: nvidia-smi failed: no usable GPU?" >&2; status=1; }

# The ctest files name the folder where CMake configured the build: make that path lead here.
original=""
[ -f "$build/ORIGINAL_BUILD_DIR" ] && original="$(cat "$build/ORIGINAL_BUILD_DIR")"
[ -z "$original" ] && [ -f "$build/CMakeCache.txt" ] &&
  original="$(sed -n 's/^CMAKE_CACHEFILE_DIR:INTERNAL=//p' "$build/CMakeCache.txt")"
if [ -n "$original" ] && [ "$original" != "$build" ]; then
  if [ -e "$original" ]; then
    echo "gpu_check: $original exists here and is not $build: ctest will use what is there" >&2
  else
    mkdir -p "$(dirname "$original")" && ln -s "$build" "$original" &&
      echo "gpu_check: linked $original -> $build"
  fi
fi

# Carried libraries, only for sonames this machine lacks (or has in too old a version).
test_binary="$build/tests/test_cuda_kernels"
if [ -d "$build/libs" ]; then
  fallback="$(mktemp -d /tmp/gpu-check-libs.XXXXXX)"
  ldd "$test_binary" 2>&1 | grep "not found" | while read -r line; do
    case "$line" in
      *"=> not found"*) soname="${line%% *}" ;;                       # libfoo.so.1 => not found
      *"version"*) soname="$(basename "${line%%:*}")" ;;  # /x/libfoo.so.1: version `V' not found
      *) continue ;;
    esac
    [ -e "$build/libs/$soname" ] && ln -sfn "$build/libs/$soname" "$fallback/$soname" &&
      echo "gpu_check: using the carried $soname"
  done
  export LD_LIBRARY_PATH="$fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ldd "$test_binary" | grep "not found"; then
  echo "gpu_check: $test_binary still lacks the libraries above" >&2
  status=1
fi

echo "==== ctest -L gpu"
(cd "$build" && ctest -L gpu --output-on-failure --timeout 300) 2>&1 | tee "$logs/ctest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# The tests skip themselves without a device; here, on the GPU machine, a skip is a failure.
if grep -q "(Skipped)" "$logs/ctest.log"; then
  echo "gpu_check: tests were skipped: the CUDA device was not visible to them" >&2
  status=1
fi

sanitizer="$(command -v compute-sanitizer || true)"
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$sanitizer" ]; then
  echo "==== compute-sanitizer memcheck"
  # All but the tests whose sizes make memcheck slow (4M-value transfers, 1M-value vectors,
  # cuBLAS GEMMs, a 128k vocabulary).
  timeout 300 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 99 "$test_binary" \
    --gtest_filter='-*UploadAndDownload*:*VectorOperations*:*GemmEvery*:*CrossEntropyLosses*' \
    2>&1 | tee "$logs/memcheck.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "==== compute-sanitizer racecheck (attention)"
  timeout 150 "$sanitizer" --tool racecheck --error-exitcode 99 "$test_binary" \
    --gtest_filter='*CudaAttentionTest*D64:*CudaAttentionTest*D128' \
    2>&1 | tee "$logs/racecheck.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "gpu_check: no compute-sanitizer on this machine: skipped memcheck and racecheck"
fi

echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED); logs in $logs"
exit $status
