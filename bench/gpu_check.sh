#!/usr/bin/env bash
# The GPU path proven on a real card in one command: tests/gpu, then the throughput table of
# bench/gpu_throughput.py, within a time budget (default 6 minutes in all, so a second try fits beside a first).
#
#   bash bench/gpu_check.sh [ASSETS_DIR] [OUT_DIR]
#
# ASSETS_DIR (default .gpu-assets) is what bench/gpu_prepare.sh filled on a machine with package access: the
# tokenizer, WikiText-2 and wheels for datasets and wandb. The GPU machine needs only this working tree, that
# folder and a Python with torch and transformers. Into OUT_DIR (default $OUT, else gpu-check-out) go machine.txt,
# gpu_tests.log, measured.txt (the figures the tests measured), cast_once.md and .log (issue 34 c),
# gpu_throughput.log, gpu_table.md and .json.
#
# Environment: GPU_CHECK_BUDGET_S (360) the whole check; GPU_CHECK_TESTS_S (190) the tests' share;
# GPU_CHECK_SKIP_TESTS=1 spends the whole budget on the table (a second try, for the rows the first left out);
# GPU_CHECK_DRY_RUN=1 runs both parts on this machine's CPU with a tiny model (checks the script, measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
assets="${1:-.gpu-assets}"
out="${2:-${OUT:-gpu-check-out}}"
budget="${GPU_CHECK_BUDGET_S:-360}"
python="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
start=$SECONDS
mkdir -p "$out"
[[ -d "$assets/tokenizer" && -d "$assets/wikitext-2-raw-v1" ]] || {
    echo "gpu_check.sh: error: $assets has no tokenizer/ or wikitext-2-raw-v1/; run bash bench/gpu_prepare.sh $assets" \
        "on a machine with package access first" >&2
    exit 2
}

if compgen -G "$assets/wheels/*.whl" >/dev/null; then
    site="$(mktemp -d)/site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$assets"/wheels/*.whl \
        && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
MLM_GPU_ASSETS="$(cd "$assets" && pwd)"
export MLM_GPU_ASSETS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
dry_test_env=() dry_bench_args=()
if [[ "$dry" == "1" ]]; then
    dry_test_env=(MLM_GPU_TESTS_DRY_RUN=1) dry_bench_args=(--dry_run)
fi

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv,noheader
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    "$python" -c "import datasets, wandb; print('datasets', datasets.__version__, 'wandb', wandb.__version__)" \
        || echo "datasets/wandb: not importable (tests/gpu does not need them)"
} 2>&1 | tee "$out/machine.txt"

tests_rc=0
if [[ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]]; then
    tests_s="${GPU_CHECK_TESTS_S:-190}"
    env "${dry_test_env[@]}" timeout --signal=INT "$tests_s" "$python" -m pytest -v -rfEs -s -p no:cacheprovider -p no:logging tests/gpu \
        2>&1 | tee "$out/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    (( tests_rc == 124 )) && echo "gpu_check.sh: the tests ran past $tests_s s and were stopped" | tee -a "$out/gpu_tests.log"
    grep -o "measured: .*" "$out/gpu_tests.log" > "$out/measured.txt" || true
    # Issue 34 (c): autocast's weight casts against a low-precision copy refreshed once a step (about 40 s).
    timeout 150 "$python" bench/cast_once.py --out "$out" "${dry_bench_args[@]}" 2>&1 | tee "$out/cast_once.log"
fi

left=$(( budget - (SECONDS - start) - 10 ))
"$python" bench/gpu_throughput.py --assets "$assets" --out "$out" --budget_s "$left" "${dry_bench_args[@]}" 2>&1 \
    | tee "$out/gpu_throughput.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check.sh: tests exit $tests_rc, table exit $bench_rc, $(( SECONDS - start )) s in all" | tee -a "$out/machine.txt"
(( tests_rc == 0 && bench_rc == 0 ))
