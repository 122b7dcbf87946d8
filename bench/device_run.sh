#!/usr/bin/env bash
# The benchmark suite's accelerator rows: full-size cases on one GPU against diffusers/torch on the same GPU,
# each module under its own time limit (a module that runs out keeps the rows it wrote), the most telling
# cases first.
#
#     bash bench/device_run.sh 1      # forward fp32, whole sampling runs, full-size train steps, attention
#     bash bench/device_run.sh 2      # forward bf16, SDXL, torch.compile
#     bash bench/device_run.sh 3      # SD 1.5 train step, whole SD 1.5 pipeline call
#     bash bench/device_run.sh 4      # SDXL, torch.compile of the SD 1.5 UNet
#     bash bench/device_run.sh 5      # GPU-sized 'chunked' blocks, start-up, bfloat16 for CLIP, VAE, ControlNet
#
# Each run fits one call of the device tool (under 10 minutes). The limits come from the stages the long
# cases print on an H200 with a 16-core host (2026-11-28): SD 1.5's train step took 248 s (174 s of it
# compiling), the pipeline call 130 s; SDXL spent 67 s building and running the torch reference, 32 s
# converting and 44 s compiling, and was still reloading torch's model at 165 s; start-up had not finished
# in 130 s; the twelve attention shapes took 73 s. Since then SDXL and the big train steps keep both
# libraries on a GPU and interleave them, so the reloads of torch's model are gone.
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
    step 280 bench.forward --cases=sdxl
    step 250 bench.forward --cases=sd15 --torch_compile
    ;;
5)
    step 60 bench.attention --cases=sd15_64,sdxl_128,vae_512 --blocks=1024x1024,4096x1024,4096x4096
    step 280 bench.startup
    step 220 bench.forward --cases=clip,vae,controlnet --dtype=bfloat16
    ;;
esac
