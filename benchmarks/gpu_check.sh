#!/usr/bin/env bash
# The GPU checks of curvlib as one prepared script, for a CUDA machine without network access
# (the device machine some sessions are lent: Python 3.12 with torch, pytest, hypothesis,
# pluggy, rich and matplotlib installed; pydantic and mlxtend missing). Never part of CI.
#
# What it runs, each step's output in $OUT (default /tmp/gpu_check), about 5 minutes on an H200:
#   1. the `cuda`-marked tests (pytest -m cuda), then the background-inversion and
#      batched-inversion test files whole;
#   2. host_syncs.py: host synchronisations per step kind;
#   3. batched_inversion.py, background_inversion.py and symmetric_kernels.py on the GPU;
#   4. step_cost.py --device cuda --background at batch 512 and 4096 (peers skipped).
#
# Wheels of the missing packages go in .whl/ of the checkout first (ignored by git), made on a
# machine with network access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic_core annotated_types typing_inspection typing_extensions mlxtend
# (pydantic_core must be the version the pydantic wheel requires: check its METADATA.)
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=/tmp/curvlib_site
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
# curvlib itself, with its entry points (its plugins are found through them), and the example plugins
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . \
    ./plugins/curvlib-ekfac ./plugins/curvlib-grouped-newton || exit 1
export PYTHONPATH="$site"
python3 -c "import torch, curvlib; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    | tee "$OUT/env.txt"

step() {  # step NAME TIMEOUT COMMAND...: run one check, its output in $OUT/NAME.txt, go on if it fails
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name: exit $?"
    tail -n 25 "$OUT/$name.txt"
}
step cuda_tests 240 python3 -m pytest -p no:cacheprovider -q -m cuda tests
step inversion_tests 120 python3 -m pytest -p no:cacheprovider -q tests/precond/test_background_inversion.py \
    tests/damping/test_batched_inversion.py
step host_syncs 120 python3 benchmarks/host_syncs.py
step batched_inversion 60 python3 benchmarks/batched_inversion.py
step background_inversion 120 python3 benchmarks/background_inversion.py
step symmetric_kernels 60 python3 benchmarks/symmetric_kernels.py --device cuda --widths 251 501 1001 2048 4096
step step_cost_512 150 python3 benchmarks/step_cost.py --device cuda --background --methods kfac --skip-peers
step step_cost_4096 150 python3 benchmarks/step_cost.py --device cuda --background --methods kfac --skip-peers \
    --batch 4096
