#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, no network): what bitconvert and its benchmarks need
# beyond the machine's image (torch, transformers, accelerate, peft, triton, ... are there already).
#   benchmarks/device/wheels.sh [DIR]      (default .whl, which .git/info/exclude keeps out of the tree)
# On the machine: pip install --no-index --no-deps --target /tmp/site DIR/*.whl; PYTHONPATH=/tmp/site
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
binary=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        gguf==0.19.0 lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
        pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
        tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 more-itertools==11.2.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${binary[@]}"
# Pure-Python packages published only as source: built into wheels here.
python3 -m pip wheel -q --no-deps -w "$dir" sqlitedict==2.1.0 word2number==1.1 rouge_score==0.1.2
ls "$dir" | wc -l; du -sh "$dir"
