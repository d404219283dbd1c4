#!/usr/bin/env bash
# Bundles what a GPU run of this project needs and the GPU machine (Python 3.12, CUDA 13 torch, no network)
# lacks, into .gpu/ (git-ignored), to travel with the working tree (the device tool's `carry`: at most 64 MiB a
# call, the tree included):
#
#   .gpu/wheels      hydra-core, omegaconf, antlr4 (built here: it is an sdist), transformers 5.24 and peft 0.21
#                    (the versions this project is tested with; the image has transformers 5.17), pydantic and hjson
#                    (for deepspeed), and bitsandbytes 0.50.2 for QLoRA with only its CUDA 13 and CPU libraries
#                    (the whole wheel is 43 MB: its libraries for CUDA 11/12, ROCm and XPU are left out)
#   .gpu/sdist       deepspeed 0.19.8, built there against the image's CUDA torch (its ops compile when used)
#   .gpu/shared.tgz  the real tokenizer and the release's SFT demo data, from ../shared (never committed)
#
# Usage, here: bash scripts/bundle_gpu.sh        then on the GPU machine: bash scripts/gpu_bench.sh PART
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${TELECHAT_SHARED:-../shared}
PYTHON=${PYTHON:-python3}
BINARY=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/sdist .gpu/download
$PYTHON -m pip download -q "${BINARY[@]}" -d .gpu/wheels \
    hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.24.0 peft==0.21.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 hjson==3.1.0
$PYTHON -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
$PYTHON -m pip download -q --no-deps --no-binary=:all: -d .gpu/sdist deepspeed==0.19.8
$PYTHON -m pip download -q "${BINARY[@]}" -d .gpu/download bitsandbytes==0.50.2

# bitsandbytes without the libraries the image cannot use (the wheel's RECORD is rewritten to match)
$PYTHON - .gpu/download/bitsandbytes-*.whl .gpu/wheels <<'EOF'
import re, sys, zipfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2]) / Path(sys.argv[1]).name
unused = re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if unused.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not unused.search(l.split(",")[0])) + "\n").encode()
        dst.writestr(item, data)
EOF
rm -rf .gpu/download

tar czf .gpu/shared.tgz -C "$SHARED" telechat2/tokenizer.model data/telechat2_sft_demo

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
size=$(du -sb .gpu | cut -f1)
echo ".gpu: $((size / 1024 / 1024)) MiB; with the working tree $(((size + tree) / 1024 / 1024)) of the 64 MiB a call carries"
