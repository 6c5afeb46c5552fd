#!/bin/bash
# On the GPU machine, from the repo root: unpack what .gpu/ carries (qscript.xz, gpu-tests.xz and
# any *.tar.xz: peers, bnb, smol-tok), then `bench/compare.py --cases CASES` into $OUT/compare.
#   bench/gpu_run.sh CASES            e.g. peers | unsloth | trainer,long,dequant
#   TESTS=1 PROFILE=1 DECODE=1 bench/gpu_run.sh CASES   also the GPU tests, the 3B step's per-op
#                                      profile and 4-bit greedy decode (135M and 3B shapes)
set -e; OUT=${OUT:?}
cd .gpu && for f in *.tar.xz; do [ -e "$f" ] && tar xJf "$f"; done; xz -dkf qscript.xz && chmod +x qscript && cd ..
export PYTHONPATH=$PWD/.gpu/peers:$PWD/.gpu/bnb PEER_TOKENIZER_DIR=$PWD/.gpu/smol-tok NCCL_NVLS_ENABLE=0
if [ -n "$TESTS" ] && [ -f .gpu/gpu-tests.xz ]; then
  xz -dkf .gpu/gpu-tests.xz && chmod +x .gpu/gpu-tests
  (cd /tmp && QSCRIPT_BIN="$OLDPWD/.gpu/qscript" timeout 240 "$OLDPWD/.gpu/gpu-tests" --test-threads=1 > "$OUT/gpu-tests.txt" 2>&1; grep -E "test result|FAILED|panicked" "$OUT/gpu-tests.txt" | head)
fi
python3 bench/compare.py --qscript .gpu/qscript --anchor .gpu/hf_qlora_anchor.py --peer-anchor .gpu/peer_anchor.py \
  --tokenizer .gpu/smol-tok --steps 10 --cases "$1" --out "$OUT/compare" 2> "$OUT/compare.log"
if [ -n "$DECODE" ]; then
  for s in smollm2-135m llama-3.2-3b; do
    .gpu/qscript bench generate --shape $s --device cuda --quant nf4 --dtype bfloat16 --prompt-tokens 32 --new-tokens 128 --repeat 3
  done > "$OUT/decode.jsonl" 2>&1
fi
if [ -n "$PROFILE" ]; then
  QSCRIPT_PROFILE=1 .gpu/qscript bench train --shape llama-3.2-3b --device cuda --batch 4 --seq 1024 --lora-dropout 0 --steps 4 > "$OUT/profile-3b.txt" 2>&1
fi
