"""Distributed training: elastic launcher, worker loop, allreduce and parameter-server strategies.

`distml.train.launch(config)` starts workers through PyTorch's elastic launcher; each worker
runs `distml.train.worker`, which resumes from the run's latest checkpoint when there is one.
"""

from distml.train.config import TrainConfig, parse_config

__all__ = ["TrainConfig", "parse_config"]
