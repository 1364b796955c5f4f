#!/usr/bin/env bash
# The GPU suite on a machine without network (e.g. a lent GPU machine that receives a copy of the
# working tree): uses the machine's own CUDA torch, installs any other missing dependency from
# wheels carried in .whl/, then runs benchmarks/gpu_suite.py once.
#
#   bash benchmarks/gpu_suite.sh [OUT_JSON] [more gpu_suite.py options]
#
# OUT_JSON defaults to $OUT/gpu_suite.json when $OUT is set, else ./gpu_suite.json. Carry .gpu_data/
# (python benchmarks/gpu_suite.py --prepare-data) and, only if the machine lacks some of the
# packages below, .whl/ (pip download -d .whl PACKAGE..., where there is network; never torch).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/gpu_suite.json}"
shift || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled WANDB_SILENT=true
python=${PYTHON:-python3}

# module:package pairs the suite imports (torch is never installed here: it must be the machine's CUDA build)
missing=$("$python" - <<'EOF'
import importlib.util
pairs = {"numpy": "numpy", "gymnasium": "gymnasium", "hydra": "hydra-core", "omegaconf": "omegaconf",
         "wandb": "wandb", "tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn",
         "pyautoattack": "pyautoattack", "stable_baselines3": "stable-baselines3", "pytest": "pytest"}
print(" ".join(p for m, p in pairs.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ ! -d .whl ]; then
    echo "las-at: error: missing Python packages ($missing) and no .whl/ folder to install them from; where there is network run: pip download -d .whl $missing (and carry .whl)" >&2
    exit 1
  fi
  "$python" -m pip install -q --no-index --find-links .whl $missing
fi
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'las-at: error: torch ' + torch.__version__ + ' sees no CUDA device here; install a CUDA build of torch (pip install torch==2.13.0 on a GPU machine)')"
exec "$python" benchmarks/gpu_suite.py --out "$out" "$@"
