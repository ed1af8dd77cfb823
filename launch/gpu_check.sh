#!/usr/bin/env bash
# gpu_check.sh: the CUDA backend's tests, the GPU model tests, the NCCL tests and the throughput
# benchmark on the lent GPU machine, in ONE device `run`.
#
# 1. Here (the CPU machine: nvcc present, no GPU), from the repository root, build for sm_90 (the
#    project's default architecture) into an ignored build folder (/build*/ is in .gitignore):
#        cmake -S . -B build-cuda -DCMAKE_CUDA_ARCHITECTURES=90
#        cmake --build build-cuda -j2 --target test_cuda_kernels test_cuda_model test_nccl_comm freqkv \
#            compress_crossover attention_bench
#        bash launch/gpu_check.sh --prepare build-cuda
#    --prepare writes build-gpu/: what the device needs -- the ctest files, the test binaries, the
#    freqkv binary (for `freqkv bench`), bench/compress_crossover when built, and libs.tar.gz, the
#    shared libraries they link that are neither glibc nor CUDA/NCCL (OpenBLAS, MPI, HDF5,
#    libstdc++, ...), compressed: about 30 MB.
#    test_nccl_comm exists when NCCL was found. Optionally also run
#    `bash ../shared/device/devdeps.sh` to get .devdeps/ (its devenv.sh sets up the machine's CUDA
#    library paths and a matching Open MPI for the 2-rank NCCL test).
# 2. On the device machine, tool `run`:
#        carry:   ["build-gpu"]          (add ".devdeps" when it exists)
#        command: bash launch/gpu_check.sh build-gpu           timeout_s: 600
#    Stages, in this order, each under its own time limit and all within GPU_CHECK_BUDGET seconds
#    (default 570, under the run's 600): tests (ctest -L gpu without the MPI test: the CUDA
#    kernels against the CPU, the whole model and 20 training steps against the CPU; 150 s),
#    bench (freqkv bench --shape tinyllama-1.1b --device cuda --recompute --lengths 8192,32768,131072
#    --compare-full, the issue's setting, 210 s; then bench/attention_bench, 60 s),
#    torch-reference (bench/torch_reference_step.py with the machine's python3 and PyTorch: its
#    --self-check, then the same step in PyTorch -- SDPA, the DCT as one GEMM -- at 8192 and 32768,
#    and the authors' FFT formulation at 32768, into torch-reference.md; 140 s), nccl
#    (test_nccl_comm under mpirun -np 2, two ranks sharing the GPU through distinct NCCL_HOSTIDs;
#    90 s), crossover (bench/compress_crossover: FreqKV compression as a GEMM vs cuFFT DCTs by
#    length, the table in compress-crossover.md; 90 s), sanitizers (compute-sanitizer memcheck and
#    racecheck of the kernel tests; what time is left). The caps of tests, bench and
#    attention-bench were cut (from 180, 270 and 90 s) so that, whatever those take, 140 s remain
#    for torch-reference: 150 + 210 + 60 + 140 = 560 s, with the 10 s reporting margin. A stage
#    the budget cannot fit is reported as skipped. At the end the script prints freqkv's tokens/s
#    over PyTorch's at 32768 tokens with FreqKV (from the two tables), also into
#    torch-reference-ratio.txt. Name stages after the folder to run only those:
#    bash launch/gpu_check.sh build-gpu sanitizers
#    Everything that travels (working tree + carry) must stay under 64 MiB.
#
# On the device it sources .devdeps/devenv.sh when present, prints nvidia-smi, makes the absolute
# paths that CMake wrote into the ctest files resolve (a symlink from the configure-time build
# folder to the carried one when the repository sits elsewhere there), unpacks the carried
# libraries and links those the machine lacks into a fallback folder on LD_LIBRARY_PATH (never
# shadowing the machine's own), looks for the CUDA libraries the loader does not know (libnccl in
# the CUDA toolkit or a Python venv's nvidia/*/lib), then runs the stages. Logs and the bench tables
# (bench-tinyllama.md, torch-reference.md, compress-crossover.md) go to $OUT (or ./gpu-check-logs).
# Exit status: 0 when every stage ran and passed, 1 when one failed, 3 when all that ran passed but
# the budget skipped some.
set -uo pipefail

usage() { sed -n '2,49p' "$0"; }

# ---- --prepare BUILD_DIR: here, on the CPU machine -----------------------------------------------
if [ "${1:-}" = "--prepare" ]; then
  set -e
  build="${2:?usage: gpu_check.sh --prepare BUILD_DIR}"
  build="$(cd "$build" && pwd)"
  binaries=()
  for required in tests/test_cuda_kernels tests/test_cuda_model freqkv; do
    if [ ! -x "$build/$required" ]; then
      echo "gpu_check: $build/$required is missing: build the targets test_cuda_kernels," \
           "test_cuda_model and freqkv first" >&2
      exit 1
    fi
    binaries+=("$required")
  done
  if [ -x "$build/tests/test_nccl_comm" ]; then
    binaries+=(tests/test_nccl_comm)
  else
    echo "gpu_check: no tests/test_nccl_comm (NCCL not found at build time?): the nccl stage" \
         "will be skipped on the device" >&2
  fi
  if [ -x "$build/bench/compress_crossover" ]; then
    binaries+=(bench/compress_crossover)
  else
    echo "gpu_check: no bench/compress_crossover (build that target): the crossover stage" \
         "will be skipped on the device" >&2
  fi
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  out="$root/build-gpu"
  rm -rf "$out" && mkdir -p "$out/tests" "$out/bench"
  cp "$build/CTestTestfile.cmake" "$out/"
  # bench/attention_bench (flash vs CUDA-core attention kernels), run by the bench stage, when
  # that target was built.
  if [ -x "$build/bench/attention_bench" ]; then
    binaries+=(bench/attention_bench)
    mkdir -p "$out/bench"
  else
    echo "gpu_check: no bench/attention_bench (build that target): the bench stage will not" \
         "time the attention kernels" >&2
  fi
  # tests/CTestTestfile.cmake includes every test executable's *_include.cmake (tiny): without
  # their *_tests.cmake, the binaries left behind register as *_NOT_BUILT tests, unlabelled.
  cp "$build/tests/CTestTestfile.cmake" "$build"/tests/*_include.cmake "$out/tests/"
  for binary in "${binaries[@]}"; do
    cp "$build/$binary" "$out/$binary"
    name="$(basename "$binary")"
    [ -f "$build/tests/${name}[1]_tests.cmake" ] && cp "$build/tests/${name}[1]_tests.cmake" "$out/tests/"
  done
  echo "$build" > "$out/ORIGINAL_BUILD_DIR"
  # Shared libraries beyond glibc and CUDA/NCCL (the device has those), under their sonames.
  staging="$(mktemp -d)"
  mkdir -p "$staging/libs"
  for binary in "${binaries[@]}"; do
    ldd "$build/$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
  done | sort -u | while read -r soname path; do
    case "$soname" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|linux-vdso*) continue ;;
      libcuda.so.*|libcudart.so.*|libcublas.so.*|libcublasLt.so.*|libnccl.so.*) continue ;;
      libcufft.so.*) continue ;;  # hundreds of MB: the device's CUDA has it
    esac
    cp -L "$path" "$staging/libs/$soname"
  done
  tar -C "$staging" -czf "$out/libs.tar.gz" libs
  echo "gpu_check: wrote $out ($(du -sh "$out" | cut -f1)); binaries: ${binaries[*]};" \
       "libraries carried: $(cd "$staging/libs" && echo *)"
  rm -rf "$staging"
  echo "gpu_check: on the device: carry [\"build-gpu\"]," \
       "command: bash launch/gpu_check.sh build-gpu (timeout_s 600)"
  exit 0
fi

case "${1:-}" in -h|--help|"") usage; [ -n "${1:-}" ] && exit 0; exit 2 ;; esac

# ---- BUILD_DIR [STAGE...]: on the device machine --------------------------------------------------
build_arg="$1"
build="$(cd "$build_arg" && pwd)" || { echo "gpu_check: no build folder $build_arg (was it carried?)" >&2; exit 2; }
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench torch-reference nccl crossover sanitizers)
logs="${OUT:-$PWD/gpu-check-logs}"
mkdir -p "$logs"
started=$SECONDS
budget="${GPU_CHECK_BUDGET:-570}"
status=0
skipped=()

wanted() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# The limit for a stage: its own cap, or what is left of the budget (less a margin to report).
limit_for() { local left=$((budget - (SECONDS - started) - 10)); echo $(( $1 < left ? $1 : left )); }
# run_stage NAME CAP MIN COMMAND...: runs COMMAND under `timeout` unless fewer than MIN seconds
# are left; its output goes to the console and $logs/NAME.log.
run_stage() {
  local name="$1" cap="$2" minimum="$3"
  shift 3
  local limit; limit="$(limit_for "$cap")"
  if [ "$limit" -lt "$minimum" ]; then
    echo "==== $name: SKIPPED (only ${limit}s of the ${budget}s budget left, needs ${minimum}s)"
    skipped+=("$name")
    return 0
  fi
  echo "==== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local rc="${PIPESTATUS[0]}"
  if [ "$rc" -eq 124 ]; then
    echo "gpu_check: $name: stopped at its ${limit}s limit" >&2
  fi
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check: $name FAILED (exit status $rc)" >&2
    status=1
  fi
  return 0
}

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

binaries=()
for binary in tests/test_cuda_kernels tests/test_cuda_model tests/test_nccl_comm freqkv \
              bench/compress_crossover; do
  [ -x "$build/$binary" ] && binaries+=("$build/$binary")
done
[ -x "$build/bench/attention_bench" ] && binaries+=("$build/bench/attention_bench")
fallback="$(mktemp -d /tmp/gpu-check-libs.XXXXXX)"
# PyTorch (stage torch-reference) runs with the machine's own library path, not the fallbacks.
machine_library_path="${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing_sonames() {
  local b
  for b in "${binaries[@]}"; do ldd "$b" 2>&1; done | grep "not found" | while read -r line; do
    case "$line" in
      *"=> not found"*) echo "${line%% *}" ;;                        # libfoo.so.1 => not found
      *"version"*) basename "${line%%:*}" ;;                         # /x/libfoo.so.1: version `V' not found
    esac
  done | sort -u
}
# Carried libraries, only for sonames this machine lacks (or has in too old a version).
if [ -f "$build/libs.tar.gz" ]; then
  carried="$(mktemp -d /tmp/gpu-check-carried.XXXXXX)"
  tar -C "$carried" -xzf "$build/libs.tar.gz"
  for soname in $(missing_sonames); do
    [ -e "$carried/libs/$soname" ] && ln -sfn "$carried/libs/$soname" "$fallback/$soname" &&
      echo "gpu_check: using the carried $soname"
  done
fi
# CUDA libraries the loader does not know: the toolkit's folders and a Python venv's wheels.
site_packages="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)"
for soname in $(missing_sonames); do
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
             ${site_packages:+$site_packages/nvidia/cu13/lib} ${site_packages:+$site_packages/nvidia/*/lib}; do
    if [ -e "$dir/$soname" ]; then
      ln -sfn "$dir/$soname" "$fallback/$soname" && echo "gpu_check: using $dir/$soname"
      break
    fi
  done
done
for b in "${binaries[@]}"; do
  if ldd "$b" | grep "not found"; then
    echo "gpu_check: $b still lacks the libraries above" >&2
    status=1
  fi
done

if wanted tests; then
  # -LE mpi: the NCCL test needs mpirun and runs as its own stage.
  run_stage tests 150 30 bash -c "cd '$build' && ctest -L gpu -LE mpi --output-on-failure --timeout 140"
  # The tests skip themselves without a device; here, on the GPU machine, a skip is a failure.
  if [ -f "$logs/tests.log" ] && grep -q "(Skipped)" "$logs/tests.log"; then
    echo "gpu_check: tests were skipped: the CUDA device was not visible to them" >&2
    status=1
  fi
fi

if wanted bench; then
  # One warm-up and one timed step per case (a step takes seconds: one is a steady timing). Each
  # case prints its row when done and the costliest (full attention at 32K) runs last, so a run
  # cut off by the limit still leaves the rows before it.
  # Activation recomputation on, as the PyTorch reference figures (24K tokens/s SDPA, 11K the
  # authors' FFT code, TinyLlama at 32K on one H100) were taken.
  run_stage bench 210 60 bash -o pipefail -c "'$build/freqkv' bench --shape tinyllama-1.1b --device cuda \
      --recompute --lengths 8192,32768,131072 --compare-full --warmup 1 --steps 1 \
      | tee '$logs/bench-tinyllama.md'"
  # The attention kernels alone, flash (tensor cores) against simple (CUDA cores), one layer of
  # FreqKV chunks per shape: the table in attention-bench.md.
  if [ -x "$build/bench/attention_bench" ]; then
    run_stage attention-bench 60 20 bash -o pipefail -c "'$build/bench/attention_bench' --reps 3 \
        | tee '$logs/attention-bench.md'"
  else
    echo "==== attention-bench: not run (no bench/attention_bench carried: build that target)"
  fi
fi

if wanted torch-reference; then
  # The issue's PyTorch figures (about 24,000 tokens/s with SDPA and the DCT as one GEMM, 11,000
  # with the authors' FFT DCTs, TinyLlama at 32K on one H100) measured here, on this machine in
  # this run: same shape, FreqKV settings, recomputation and FLOP count as the bench stage. The
  # self-check first (SDPA's lower-right causal chunks against an explicit softmax, GEMM against
  # FFT, on a small model), so the timed code is known to compute the step.
  repository="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if env LD_LIBRARY_PATH="$machine_library_path" python3 -c \
      'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    run_stage torch-reference 140 60 env LD_LIBRARY_PATH="$machine_library_path" bash -c '
      cd "$1" || exit 2
      table="$2/torch-reference.md"
      step=(python3 bench/torch_reference_step.py --shape tinyllama-1.1b --device cuda --warmup 1 --steps 1)
      failed=0
      python3 bench/torch_reference_step.py --self-check --device cuda || failed=1
      "${step[@]}" --lengths 8192,32768 | tee "$table"
      [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
      "${step[@]}" --lengths 32768 --dct fft | tee -a "$table"
      [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
      exit "$failed"' torch-reference "$repository" "$logs"
  else
    echo "==== torch-reference: not run (python3 here has no PyTorch with CUDA)"
  fi
fi

if wanted nccl; then
  if [ -x "$build/tests/test_nccl_comm" ]; then
    # Open MPI for ranks on one machine (as tests/CMakeLists.txt's FREQKV_MPI_TEST_ENVIRONMENT).
    run_stage nccl 90 40 env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
      OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_osc=^ucx,pt2pt OMPI_MCA_plm_rsh_agent=false \
      OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo \
      mpirun -np 2 --oversubscribe "$build/tests/test_nccl_comm"
  else
    echo "==== nccl: not run (no test_nccl_comm carried: NCCL was not found at build time)"
  fi
fi

if wanted crossover; then
  if [ -x "$build/bench/compress_crossover" ]; then
    # A few seconds per channel count; rows are printed as they are measured.
    run_stage crossover 90 30 bash -o pipefail -c "'$build/bench/compress_crossover' \
        | tee '$logs/compress-crossover.md'"
  else
    echo "==== crossover: not run (no bench/compress_crossover carried: build that target)"
  fi
fi

if wanted sanitizers; then
  test_binary="$build/tests/test_cuda_kernels"
  sanitizer="$(command -v compute-sanitizer || true)"
  [ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
  if [ -n "$sanitizer" ]; then
    # All but the tests whose sizes make memcheck slow (4M-value transfers, 1M-value vectors,
    # cuBLAS GEMMs, a 128k vocabulary, FreqKV-size compressions).
    run_stage memcheck 300 120 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 99 \
      "$test_binary" \
      --gtest_filter='-*UploadAndDownload*:*VectorOperations*:*GemmEvery*:*CrossEntropyLosses*:*CompressionTest*N2048*:*CompressionTest*N4092*'
    run_stage racecheck 150 60 "$sanitizer" --tool racecheck --error-exitcode 99 "$test_binary" \
      --gtest_filter='*CudaAttentionTest*D64:*CudaAttentionTest*D128:*FlashAttention*'
  else
    echo "gpu_check: no compute-sanitizer on this machine: skipped memcheck and racecheck"
  fi
fi

# freqkv's tokens/s over PyTorch's, FreqKV at 32768 tokens, from the two markdown tables.
tokens_per_second() {  # FILE ATTENTION: the tokens/s cell of the row | 32768 | ATTENTION | ...
  [ -f "$1" ] || return 0
  awk -F'|' -v want="$2" '{ gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $3); gsub(/^ +| +$/, "", $6) }
    $2 == "32768" && $3 == want && $6 ~ /^[0-9.]+$/ { print $6; exit }' "$1"
}
freqkv_rate="$(tokens_per_second "$logs/bench-tinyllama.md" freqkv)"
torch_gemm_rate="$(tokens_per_second "$logs/torch-reference.md" freqkv)"
torch_fft_rate="$(tokens_per_second "$logs/torch-reference.md" "freqkv (fft)")"
if [ -n "$freqkv_rate" ] && { [ -n "$torch_gemm_rate" ] || [ -n "$torch_fft_rate" ]; }; then
  {
    echo "TinyLlama-1.1B, FreqKV (cache 4096, sink 4, ratio 0.5), recompute, 32768 tokens, this GPU:"
    echo "  freqkv (CUDA): $freqkv_rate tokens/s"
    [ -n "$torch_gemm_rate" ] && awk -v a="$freqkv_rate" -v b="$torch_gemm_rate" 'BEGIN {
      printf "  PyTorch, SDPA + DCT as one GEMM: %s tokens/s; freqkv / PyTorch = %.2fx\n", b, a / b }'
    [ -n "$torch_fft_rate" ] && awk -v a="$freqkv_rate" -v b="$torch_fft_rate" 'BEGIN {
      printf "  PyTorch, SDPA + FFT DCTs (the authors'"'"' formulation): %s tokens/s; freqkv / PyTorch = %.2fx\n", b, a / b }'
  } | tee "$logs/torch-reference-ratio.txt"
elif wanted torch-reference; then
  echo "gpu_check: no freqkv / PyTorch ratio: the 32768-token FreqKV row is missing from" \
       "bench-tinyllama.md or torch-reference.md"
fi

elapsed=$((SECONDS - started))
if [ $status -ne 0 ]; then
  echo "gpu_check: FAILED after ${elapsed}s; logs in $logs"
  exit 1
fi
if [ ${#skipped[@]} -gt 0 ]; then
  # memcheck and racecheck are the stage "sanitizers".
  again="$(printf '%s\n' "${skipped[@]}" | sed 's/^memcheck$/sanitizers/; s/^racecheck$/sanitizers/' |
           sort -u | tr '\n' ' ')"
  echo "gpu_check: PASSED what ran after ${elapsed}s; skipped: ${skipped[*]}" \
       "(run them: bash launch/gpu_check.sh $build_arg ${again% }); logs in $logs"
  exit 3
fi
echo "gpu_check: PASSED after ${elapsed}s; logs in $logs"
exit 0
