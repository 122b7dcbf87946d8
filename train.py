"""Train a diffusion model from a config file.

    python train.py --config=configs/digits.py --workdir=runs/digits [--config.train.steps=500 ...]

Re-running the same command resumes from the latest checkpoint in the workdir (--step=N: from step N).

Fine-tuning a pretrained model (docs/efficiency.md): --config.train.init_from=WORKDIR_OR_DIFFUSERS_FOLDER with
--config.train.finetune=full|lora|tuneqdm; --quantize=int8|int4 is TuneQDM on an int8 / int4 base.

Compiled programs are kept in XLA's persistent cache (~/.cache/diffax/xla, or JAX_COMPILATION_CACHE_DIR), so
a resumed or repeated run skips XLA's compiler; DIFFAX_XLA_CACHE=0 turns that off.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from diffax import compilation, parallel
from diffax.cli import parse_flags, run_reporting_errors
from diffax.quant import mode_bits
from diffax.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/digits.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, samples and logs go here.")
flags.DEFINE_integer("step", None, "Resume from this checkpoint step; default the newest one that reads back "
                     "intact. Later steps are moved to checkpoints/superseded/.")
flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Fine-tune the quantized train.init_from model by its "
                  "scales alone (TuneQDM: train.finetune='tuneqdm' with train.tuneqdm.bits 8 or 4).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.quantize is not None:
        if config.train.finetune == "lora":
            raise ValueError(f"--quantize={FLAGS.quantize} trains the quantization scales (TuneQDM); it does not "
                             f"combine with train.finetune='lora'")
        if not config.train.init_from:
            raise ValueError(f"--quantize={FLAGS.quantize} fine-tunes a pretrained model: set "
                             f"--config.train.init_from to a training workdir or a diffusers folder")
        config.train.finetune = "tuneqdm"
        config.train.tuneqdm.bits = mode_bits(FLAGS.quantize, "--quantize")
    parallel.initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    compilation.enable_persistent_cache()
    train_and_evaluate(config, FLAGS.workdir, step=FLAGS.step)


if __name__ == "__main__":
    app.run(run_reporting_errors(main), flags_parser=parse_flags)
