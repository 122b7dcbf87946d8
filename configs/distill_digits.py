"""Few-step distillation of the digits U-Net: progressive distillation to 2 steps and an LCM-LoRA.

    JAX_PLATFORMS=cpu python -m diffax.studies.distill --config=configs/distill_digits.py
    JAX_PLATFORMS=cpu python -m diffax.studies.distill --config=configs/distill_digits.py --quick   # a few minutes

The teacher is the `configs/digits.py` recipe with two changes distillation needs: v-prediction (a student
must express x_0 at the noisiest level, where an epsilon model cannot) and 1024 training timesteps (so the
64-, 32-, ..., 1-step DDIM grids nest: T / N is whole). Progressive distillation halves 64 -> 32 -> ... ->
final_steps, `progressive.train_steps` per round; the LCM-LoRA trains rank-`lcm.rank` factors on the
teacher's attention, convolution and time-projection layers. Every stage is a train.py run in its own
workdir under `workdir`, resumed or skipped when a rerun finds it; the evaluation then writes `results`.
Sized for about 25 minutes on an idle 2-core CPU (teacher ~8 of them); on the shared development machine
(load 14-26) it took 85. Every value can be overridden, e.g.
`--config.progressive.train_steps=300 --config.lcm.rank=8`.
"""
import ml_collections

from configs.digits import get_config as digits_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = digits_config()        # a train.py config
    c.teacher.diffusion.prediction_type = "v_prediction"
    c.teacher.diffusion.num_train_timesteps = 1024
    c.guidance_scale = 3.0             # the teacher's classifier-free guidance, distilled into the students
    c.progressive = ml_collections.ConfigDict(dict(
        teacher_steps=64, final_steps=2,   # students at 32, 16, 8, 4, 2 DDIM steps
        train_steps=100, batch_size=32, learning_rate=5e-4, warmup_steps=10, ema_decay=0.99))
    c.lcm = ml_collections.ConfigDict(dict(
        original_steps=64,                 # LCMScheduler's original_inference_steps: the distillation grid
        rank=16, alpha=16.0,
        # '/'-joined kernel paths (re.search): attention projections, convolutions, time projections
        targets=r"/(to_q|to_k|to_v|to_out_0|conv1|conv2|conv_shortcut|conv|time_emb_proj)/kernel$",
        train_steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=20, ema_decay=0.99,
        eval_steps=(1, 2, 4)))
    c.teacher_eval_steps = (64, 4, 2, 1)  # the teacher's full step count and the students' counts
    c.num_samples = 300                # digits per point, classes in turn (as the scaling study)
    c.seed = 0
    c.workdir = "runs/distill"
    c.results = "docs/results/distill_digits.json"
    return c
