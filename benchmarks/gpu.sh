#!/usr/bin/env bash
# The side-by-side benchmarks of docs/benchmarks.md on one CUDA device, in one short run: Hope's
# online pass against nested-learning's, titans against titans-pytorch, the gated delta rule
# against fla's naive chunk and (at T=2048 and 8192) fla's Triton chunk_gated_delta_rule, and each
# spec's share of torch.mm's peak. Needs `pip install -e '.[bench]'` (and triton for fla's kernel).
#     bash benchmarks/gpu.sh [more peers.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/peers.py --device cuda --only titans gated_deltanet hope gflops --repeats 3 --job-timeout 300 "$@"
