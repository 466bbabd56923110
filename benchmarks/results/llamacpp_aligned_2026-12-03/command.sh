#!/usr/bin/env bash
# The grid in grid.md / grid.json (2-core AMD EPYC with AVX-512, quiet, 2026-12-03 17:26-17:34 UTC).
# The checkpoints are the ones `effideploy tune --runtime llamacpp` pruned (CFSP, 32 x 512 calibration tokens of
# WikiText-2 validation); each is rebuilt by
#   effideploy prune --model llama --method cfsp --sparsity S [--align A] --calib-samples 32 --calib-seqlen 512 \
#       --data-dir ../shared/data --output S=/tmp/tune_rec/search/cfsp-S[-alignA]
# for S in 0.1, 0.3 and A in (none), 32, 256.
set -euo pipefail
S=/tmp/tune_rec/search
python benchmarks/scripts/llamacpp_grid.py --types q8_0,q4_k_m --windows 8 --rounds 6 \
  --checkpoint cfsp-0.1=$S/cfsp-0.1 --checkpoint cfsp-0.1-align32=$S/cfsp-0.1-align32 \
  --checkpoint cfsp-0.1-align256=$S/cfsp-0.1-align256 --checkpoint cfsp-0.3=$S/cfsp-0.3 \
  --checkpoint cfsp-0.3-align32=$S/cfsp-0.3-align32 --checkpoint cfsp-0.3-align256=$S/cfsp-0.3-align256 \
  --work /tmp/res/grid-work --out benchmarks/results/llamacpp_aligned_2026-12-03

# f16/: the same for f16 GGUFs of cfsp-0.3 (2026-12-03 18:41-18:43 UTC, quiet)
python benchmarks/scripts/llamacpp_grid.py --types f16 --windows 4 --rounds 6 \
  --checkpoint cfsp-0.3=$S/cfsp-0.3 --checkpoint cfsp-0.3-align32=$S/cfsp-0.3-align32 \
  --checkpoint cfsp-0.3-align256=$S/cfsp-0.3-align256 --work /tmp/res/grid-work --out benchmarks/results/llamacpp_aligned_2026-12-03/f16
