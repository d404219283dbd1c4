#!/usr/bin/env bash
# The GPU benchmark and GPU checks, run from the repository root on a machine with one H100 / H200 (after
# `bash scripts/bundle_gpu.sh` here; the device tool carries .gpu/). With no PART it runs them all, one after the
# other (about 40 minutes); each PART stays under the device tool's 10 minutes a command:
#
#   check    pytest tests/test_gpu.py: DeepSpeed ZeRO-2/3/3-offload via Lightning, flex_attention, QLoRA, compile
#   lora     7B shape, LoRA rank 8, cutoff 2048: ours padded and packed vs HF Trainer + PEFT (the headline table)
#   qlora    7B shape, QLoRA NF4, cutoff 2048: ours packed vs HF Trainer + PEFT (peak memory)
#   compile  7B shape, LoRA, cutoff 2048, ours packed with torch.compile'd blocks
#   cutoffs  7B shape, LoRA, ours packed at cutoff 1024, 4096 and 8192 (2048 is in `lora`)
#   sizes    3B shape (ours vs HF), and the 35B shape cut to 16 of its 64 blocks (ours packed)
#   full     7B shape, full fine-tuning with DeepSpeed ZeRO-3 and CPU offload (ours)
#
# e.g. with the device tool: run(command="bash scripts/gpu_bench.sh lora", carry=[".gpu"]); results (JSON with the
# exact command, and a markdown table each) go to $OUT when set, else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
RESULTS=${OUT:-bench/results}
SITE=/tmp/telechat-site

if [ ! -f "$SITE/.ready" ]; then
    [ -d .gpu/wheels ] || { echo "no .gpu/: run 'bash scripts/bundle_gpu.sh' first, and carry .gpu"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" .gpu/sdist/deepspeed-*.tar.gz
    mkdir -p "$SITE/shared" && tar xzf .gpu/shared.tgz -C "$SITE/shared"
    touch "$SITE/.ready"
fi
export PYTHONPATH="$SITE:$PWD" TELECHAT_SHARED="$SITE/shared" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, lightning, deepspeed, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| lightning', lightning.__version__, '| deepspeed', deepspeed.__version__, '| bitsandbytes', bitsandbytes.__version__)"

bench() { python3 bench/train_throughput.py --out "$RESULTS" "$@"; }

case $PART in
    check|all) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;&
    lora|all) bench --shape telechat2_7b --adapter lora --cutoff 2048 ;;&
    qlora|all) bench --shape telechat2_7b --adapter qlora --cutoff 2048 --layouts packed ;;&
    compile|all) bench --shape telechat2_7b --adapter lora --cutoff 2048 --stacks ours --layouts packed --compile --steps 40 --warmup 10 ;;&
    cutoffs|all)
        for cutoff in 1024 4096 8192; do
            bench --shape telechat2_7b --adapter lora --cutoff "$cutoff" --stacks ours --layouts packed --steps 20 --warmup 4
        done ;;&
    sizes|all)
        bench --shape telechat2_3b --adapter lora --cutoff 2048
        bench --shape telechat2_35b --layers 16 --adapter lora --cutoff 2048 --stacks ours --layouts packed --steps 20 --warmup 4 ;;&
    full|all) bench --shape telechat2_7b --adapter full --cutoff 2048 --stacks ours --layouts packed --hardware deepspeed_zero3_offload --batch-size 1 --packed-rows 1 --steps 8 --warmup 2 ;;&
    check|lora|qlora|compile|cutoffs|sizes|full|all) ;;
    *) echo "unknown part '$PART': check, lora, qlora, compile, cutoffs, sizes, full (or none for all)"; exit 2 ;;
esac
