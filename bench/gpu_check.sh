#!/usr/bin/env bash
# The CUDA checks, as run on a lent GPU machine (python with a CUDA torch; a transformers
# wheel carried in .whl/ when the machine's is older than pyproject.toml asks for):
#   bash bench/gpu_check.sh OUT_DIR
# CUDA format tests, the quantized model moved to CUDA, the demo quantized on CUDA and
# reloaded, and the benchmark in bf16 at 64 and 256 experts, moeq's kernels eager and
# compiled (Triton) side by side. test_cuda.py checks the compiled kernels' bits against CPU eager.
set -uo pipefail
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/formats/test_cuda.py tests/formats/test_fused.py "tests/quantize/test_module_behaviour.py::test_move_to_cuda_after_quantize" -rfE 2>&1 | tail -30 | tee "$out/tests.txt"
python3 bench/bench_moe.py --dtype bfloat16 --device cuda --experts 64 256 --compile both --out "$out/bench_cuda_bf16.md" 2>&1 | tail -8
python3 -m moeq.cli quantize --device cuda --dtype bfloat16 --out /tmp/demo-cuda --samples 16 --seq-len 128 2>&1 | grep -v "it/s\]" | tail -12 | tee "$out/demo.txt"
python3 - <<'PY' 2>&1 | tail -3 | tee -a "$out/demo.txt"
import torch, moeq
from moeq.data import DEMO_EVAL, DEMO_MODEL
import transformers
tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
ids = torch.tensor(tok(open(DEMO_EVAL).read()[:4000])["input_ids"][:256]).view(2, 128).cuda()
q = moeq.load("/tmp/demo-cuda").cuda()
base = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16).cuda()
print("demo reload on cuda:", moeq.evaluate.compare(base, q, [ids]).as_dict())
PY
