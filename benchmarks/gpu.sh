#!/bin/bash
# The checks and figures that need a CUDA GPU, in one run: tests/test_cuda.py, then
# benchmarks/run.py with the torch backend on CUDA (replaying CUDA graphs, and eagerly)
# beside the CPU lock-step path.  Logs go to $OUT (default: the current folder); each step
# has a time cap.
set -u
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1
# the package maps specs/ and backends/ into structdsl: install it (editable, offline)
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . || exit 1
nvidia-smi -L
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 200 python3 benchmarks/run.py --backend torch,cuda-eager,cuda --specs spanning_tree,matching \
    --sizes 16,32,64 --batches 1024 --no-compile-time --markdown 2>&1 | tee "$OUT/bench.md"
# specs whose lock-step walk runs long scalar loops: smaller sizes, their own caps
timeout 75 python3 benchmarks/run.py --backend torch,cuda-eager,cuda --specs binary_tree --sizes 16 \
    --batches 1024 --no-compile-time --no-steps --markdown 2>&1 | tee "$OUT/bench_binary_tree.md"
timeout 75 python3 benchmarks/run.py --backend torch,cuda-eager,cuda --specs arborescence --sizes 8,16 \
    --batches 1024 --no-compile-time --no-steps --semantics sample --markdown 2>&1 | tee "$OUT/bench_arborescence.md"
