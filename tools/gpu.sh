#!/usr/bin/env bash
# The GPU checks in one place, for a CUDA host: the tests whose CUDA paths CPU CI cannot run, then
# the GPU rows of the benchmarks. Each stage fits in about 10 minutes on one H100.
#
#   bash tools/gpu.sh tests     # kernels compiled and run by Triton (not the interpreter), bf16 training,
#                               # cached attention and the generator on CUDA (every @pytest.mark.gpu test is
#                               # in these files)
#   bash tools/gpu.sh bench     # bench_logprob / bench_policy_loss / bench_decode_attention (bf16, fp32),
#                               # bench_generate on CUDA (with and without the decode step's CUDA graphs),
#                               # bench_train_step on the ~1.5B Qwen2-shaped config (MFU)
#
# Runs with whatever Python is first on PATH (a GPU image's own torch / triton), or $PYTHON. Missing
# pure-Python dependencies (msgspec, bm25s, ...) can come as wheels: ../shared/tools/gpu-wheels.sh
# fetches them into .whl/, and this script installs .whl/*.whl into /tmp/site when .whl/ exists.
# sailor-engine itself must be importable; if it is not, it is installed editable, without dependencies
# (pip install --no-deps --no-build-isolation -e .: kernels/ ships as sailor_engine.kernels).
# Benchmark records are appended to benchmarks/results/*.jsonl; with $OUT set, logs and those files are
# also copied there. Without a CUDA device it stops at once (exit 2) and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
py=${PYTHON:-python3}
case "$stage" in tests | bench) ;; *) echo "usage: tools/gpu.sh tests|bench" >&2; exit 2 ;; esac

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# one interpreter start (importing torch takes seconds): 0 CUDA, 4 no CUDA, anything else no torch
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 4)" 2> /dev/null
case $? in
  0) ;;
  4) echo "tools/gpu.sh: no CUDA device visible to $py (torch.cuda.is_available() is False); nothing run" >&2; exit 2 ;;
  *) echo "tools/gpu.sh: $py cannot import torch; set PYTHON to the interpreter that has it" >&2; exit 2 ;;
esac
if ! "$py" -c "import sailor_engine.kernels" 2> /dev/null; then
  "$py" -m pip install -q --no-deps --no-build-isolation -e . ||
    { echo "tools/gpu.sh: sailor-engine is not importable and could not be installed; pip install -e . first" >&2; exit 1; }
fi
"$py" -c "import torch, triton, sys; p = torch.cuda.get_device_properties(0); \
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, {p.name}, {p.total_memory >> 30} GiB')"

log=$(mktemp -d)/gpu-$stage.log
rc=0
run() {  # run a command, tee its output to the log, remember the first failure
  echo "+ $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local r=${PIPESTATUS[0]}
  [ "$r" -eq 0 ] || { [ "$rc" -ne 0 ] || rc=$r; }
}

if [ "$stage" = tests ]; then
  run "$py" -P -m pytest -q -p no:cacheprovider tests/kernels tests/train/test_bf16.py tests/model/test_forward_modes.py \
    tests/rollout/test_generator.py
else
  b=benchmarks
  for dt in bf16 fp32; do
    run "$py" $b/bench_logprob.py --dtype $dt --n 16384 --h 2048 --v 151936
    run "$py" $b/bench_policy_loss.py --dtype $dt --n 1048576
    run "$py" $b/bench_decode_attention.py --device cuda --dtype $dt --batch 64 --context 4096
  done
  run "$py" $b/bench_decode_attention.py --device cuda --dtype bf16 --batch 8 --context 32768
  run "$py" $b/bench_generate.py --device cuda --hidden 1024 --layers 16 --heads 16 --batch 64 --threads 0
  run "$py" $b/bench_train_step.py --config 1.5b --device cuda
fi

if [ -n "${OUT:-}" ]; then
  cp "$log" "$OUT/"
  if [ "$stage" = bench ]; then
    for f in logprob policy_loss decode_attention generate train_step; do cp "benchmarks/results/bench_$f.jsonl" "$OUT/"; done
  fi
fi
echo "tools/gpu.sh $stage: exit $rc (log: $log)"
exit "$rc"
