"""Training: mesh and sharding rules, data, loss, optimizer step, checkpoints, offline target cache, trainer.

Run a training job from Python::

    from dspark_jax.train import Trainer, load_train_config
    cfg = load_train_config("tiny", ["optim.max_steps=100"])   # a preset name or a YAML file + overrides
    result = Trainer(cfg).run()                                  # resumes from <output_dir>/checkpoints

or from the shell: ``dspark train --config tiny optim.max_steps=100`` (``--dry-run`` sizes a job).
"""

from dspark_jax.train.config import TrainConfig, load_train_config
from dspark_jax.train.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "TrainConfig", "load_train_config"]
