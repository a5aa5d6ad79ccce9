#!/usr/bin/env bash
# One prepared command for a GPU machine (at most 8 minutes): every script's default path end to end on tiny data
# (DFP offline -> online with evaluations, eager and --cudagraphs, --resume; DBP U-Net and MLP train + save +
# --eval-only, --resume; DBPO 2 updates from that checkpoint, --resume), the CUDA tests, and the speed benchmarks
# (DFP's update in eager / compile / cudagraphs / compile+cudagraphs against its matrix products alone, acting at batch
# 1, DBP's U-Net training step, DBPO's update on 20,000 decisions, the image encoders' training step and acting at
# batch 1). Each stage is bounded by a timeout; a failed one is reported in the final markdown table, never fatal. The
# stages: bench/gpu_check.py.
#
#   bench/gpu.sh --fetch-wheels       # here, with PyPI: .whl/ (git-ignored), the packages a bare GPU image lacks
#   bench/gpu.sh --out DIR            # on the GPU machine: DIR/{gpu,dfp,dbp,dbpo,image}_cuda.json, DIR/gpu_cuda.log
#   bench/gpu.sh --cpu                # (or DEVICE=cpu bench/gpu.sh) the same stages, tiny, on the CPU (CI's check)
#
# Other flags go to bench/gpu_check.py (--budget S, --jobs N, --only STAGE ..., --out DIR). CUDA mode writes to
# bench/results unless --out; CPU mode to a new temporary folder unless --out. Python: $PYTHON, else python.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # a GPU image may have python3 alone
DEVICE=${DEVICE:-cuda}
WHEELS=.whl  # git-ignored
# what the scripts import beyond a CUDA PyTorch image (torch, numpy, tensorboard, h5py, pytest, absl, lxml are there)
PACKAGES="gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==3.3.7 dm_control==1.0.34 dm-env==1.6 ogbench==1.2.2
glfw==2.11.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1"

fetch_wheels() {  # cp312 manylinux wheels; dm_control without its locomotion/suite assets (56 -> ~8 MB): OGBench's
  # cube envs use dm_control.mjcf only, and a call to the GPU machine carries at most 64 MiB
  mkdir -p "$WHEELS" || exit 1
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $PACKAGES || exit 1
  "$PYTHON" - "$WHEELS" <<'EOF' || exit 1
import glob, os, sys, zipfile
for path in glob.glob(os.path.join(sys.argv[1], "dm_control-*.whl")):
    drop = ("dm_control/locomotion/", "dm_control/suite/", "dm_control/blender/")
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i)) for i in z.infolist() if not i.filename.startswith(drop)]
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as z:
        for info, body in items:
            if info.filename.endswith(".dist-info/RECORD"):
                body = b"".join(l for l in body.splitlines(True) if not l.decode().startswith(drop))
            z.writestr(info, body)
    os.replace(path + ".tmp", path)
EOF
  du -sh "$WHEELS"
}

args=()
for a in "$@"; do
  case "$a" in
    --cpu) DEVICE=cpu ;;
    --fetch-wheels) fetch_wheels; exit ;;
    *) args+=("$a") ;;
  esac
done

if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU check stays on the CPU, on a GPU machine too
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export MUJOCO_GL=disable  # no stage renders, and a bare GPU image has no EGL loader (dm_control would import it)

if ! "$PYTHON" -c "import gymnasium, mujoco, ogbench, tyro" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # the wheels carried in (bench/gpu.sh --fetch-wheels, made elsewhere)
    site=$(mktemp -d -t gpu_site.XXXXXX)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
      && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c "import gymnasium, mujoco, ogbench, tyro" \
    || echo "warning: gymnasium/mujoco/ogbench/tyro missing: the end-to-end stages will fail (bench/gpu.sh --fetch-wheels)"
fi
exec "$PYTHON" bench/gpu_check.py --device "$DEVICE" --python "$PYTHON" ${args[@]+"${args[@]}"}
