#!/usr/bin/env bash
# One short device lease, prepared in advance: the CUDA conformance kit, greedy parity with
# transformers, the quantized-matmul timings, and decode / serving figures, each stage with its
# own time limit so one slow stage cannot eat the others. Run on the GPU machine from the repository root:
#
#     bash tools/lease/cuda_lease.sh DEV OUT
#
# DEV holds what the lease must carry (made here by `tools/lease/cuda_lease.sh --prepare DEV`):
# wheels for the packages the GPU image lacks (whl/) and the default model's config and
# tokenizer (like/). Logs land in OUT. STAGES="parity decode" limits the run to those stages
# (conformance, qmatmul, quant, parity, decode, serving, serving_overlap,
# serving_overlap_ab, step_profile, kit; make_model always
# runs). The model is SmolLM2-135M-shaped with seeded random weights
# (tools/lease/cuda_check.py make-model): the real 98 MB file does not fit a lease.
# KIT_EXTRA adds pytest arguments (no spaces inside one) to the conformance stage, e.g.
# KIT_EXTRA=--deselect=tests/backends/test_registered_backends.py::TestCudaDevice::test_greedy_parity_with_cpu
set -u
if [ "${1:-}" = "--prepare" ]; then
    dev=$2; mkdir -p "$dev/whl" "$dev/like"
    src=$(.venv/bin/python -c "from plait.models.default import default_model_path as p; print(p())")
    cp "$src"/config.json "$src"/tokenizer.json "$src"/tokenizer_config.json "$dev/like/"
    cp "$src"/chat_template.jinja "$dev/like/" 2>/dev/null
    pkgs="fastapi starlette pydantic pydantic_core typing-inspection annotated-types annotated-doc
          uvicorn pyzmq xgrammar apache-tvm-ffi gguf jsonschema referencing rpds-py
          jsonschema-specifications opentelemetry-api"
    for p in $pkgs; do
        v=$(.venv/bin/pip show "$p" 2>/dev/null | awk '/^Version/{print $2}')
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dev/whl" "$p==$v"
    done
    exit 0
fi

DEV=${1:?DEV folder}; OUT=${2:?OUT folder}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, note the status
    local name=$1 limit=$2; shift 2
    # STAGES="decode serving" runs only those (make_model always runs)
    if [ -n "${STAGES:-}" ] && [ "$name" != make_model ] && [[ " $STAGES " != *" $name "* ]]; then
        return 0
    fi
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$DEV"/whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
# entry points (plait.backends) come from the package metadata: install Plait itself, no deps
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/env.txt"

MODEL=/tmp/smol-random
stage make_model 40 python3 -m tools.lease.cuda_check make-model --like "$DEV/like" --out $MODEL
stage conformance 300 env PLAIT_KIT_GRID=full python3 -m pytest -q -rs -p no:cacheprovider \
    tests/backends/test_registered_backends.py::TestCudaDevice \
    tests/backends/test_triton_kernels.py tests/backends/test_triton_qmatmul.py \
    tests/backends/test_graph_runner.py ${KIT_EXTRA:-}
stage qmatmul 90 python3 -m tools.lease.cuda_check qmatmul
stage quant 150 python3 -m tools.lease.cuda_check quant --model $MODEL --device cuda
stage parity 90 python3 -m tools.lease.cuda_check parity --model $MODEL --device cuda
stage decode 200 python3 -m tools.lease.cuda_check decode --model $MODEL --device cuda --repeats 2 \
    --new 64
stage serving 120 python3 -m benchmarks.serving.serving --launch --model-path $MODEL \
    --dataset random --num-prompts 256 --input-len 256 --output-len 128 --max-concurrency 64 \
    --baseline-args "--device cuda --disable-graph-capture" --candidate-args "--device cuda"
# the overlap schedule's own gain: same workload, graphs on in both, overlap off then on
stage serving_overlap 120 python3 -m benchmarks.serving.serving --launch --model-path $MODEL \
    --dataset random --num-prompts 256 --input-len 256 --output-len 128 --max-concurrency 64 \
    --baseline-args "--device cuda --disable-overlap-schedule" --candidate-args "--device cuda"
# the same comparison with both servers up at once, ABBA order, and each step split into phases
stage serving_overlap_ab 300 python3 -m benchmarks.serving.overlap_ab --model-path $MODEL --rounds ${AB_ROUNDS:-3} \
    --dataset random --num-prompts 256 --input-len 256 --output-len 128 --max-concurrency 64 \
    --baseline-args="--device cuda --disable-overlap-schedule" --candidate-args="--device cuda"
# where a batch-64 decode's GPU time goes, kernel by kernel (eager), then the same with graphs
stage step_profile 150 bash -c "python3 -m tools.lease.step_profile --model-path $MODEL \
    --device cuda --dtype bfloat16 --batch 64 --input-len 256 --new 64 --rows 30 \
    --disable-graph-capture && python3 -m tools.lease.step_profile --model-path $MODEL \
    --device cuda --dtype bfloat16 --batch 64 --input-len 256 --new 64 --rows 30"
# issue 41's lease kit in one stage (benchmarks/lease_kit.py): null host step, SmolLM2- and
# Llama-3-8B-shaped bf16 decode, busy fraction, attention bandwidth, serving. sglang's
# bench_serving drives the server where the lease carries it, else Plait's httpx client.
client=httpx; python3 -c "import sglang.bench_serving" 2>/dev/null && client=bench_serving
stage kit 560 python3 -m benchmarks.lease_kit --out "$OUT/kit" --device cuda --serving-client $client
cat "$OUT/summary.txt"
