#!/usr/bin/env bash
# The benchmark suite's accelerator rows: full-size cases on one GPU against diffusers/torch on the same GPU,
# each module under its own time limit (a module that runs out keeps the rows it wrote), the most telling
# cases first.
#
#     bash bench/device_run.sh 1      # forward fp32, whole sampling runs, full-size train steps, attention
#     bash bench/device_run.sh 2      # forward bf16, SDXL, torch.compile
#     bash bench/device_run.sh 3      # SD 1.5 train step, whole SD 1.5 pipeline call
#     bash bench/device_run.sh 4      # SDXL, attention shapes, start-up, torch.compile of the SD 1.5 UNet
#
# Each run fits one call of the device tool (under 10 minutes). On an H200 with a 16-core host, SD 1.5's
# train step had not printed its first result after 225 s, nor had the 90-110 s limits of the others been
# enough (2026-11-27): the limits of 3 and 4 are sized from that.
#
# Results land in bench/results/*.json as on a CPU; the machine's name is in each file.
set -u
export PYTHONUNBUFFERED=1
# Both libraries share the GPU: XLA takes half of its memory up front, torch allocates from the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5

step() {
    local limit=$1
    shift
    echo "== python -m $* (limit ${limit} s; ${SECONDS} s into the run)"
    timeout "$limit" python3 -m "$@" || echo "== stopped or failed: python -m $*"
    echo "== ${SECONDS} s into the run"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, \
'torch', torch.__version__, 'diffusers', diffusers.__version__)"
case "${1:-1}" in
1)
    step 200 bench.forward --cases=dit,sd15,clip,vae,controlnet
    step 90 bench.sampling --full
    step 120 bench.train_step --cases=dit-xl,sd15
    step 50 bench.attention
    ;;
2)
    step 70 bench.forward --cases=dit,sd15 --dtype=bfloat16
    step 60 bench.forward --cases=sdxl
    step 80 bench.forward --cases=dit,sd15 --torch_compile
    ;;
3)
    step 330 bench.train_step --cases=sd15
    step 200 bench.sampling --full --skip_loops
    ;;
4)
    step 180 bench.forward --cases=sdxl
    step 90 bench.attention
    step 150 bench.startup
    step 100 bench.forward --cases=sd15 --torch_compile
    ;;
esac
