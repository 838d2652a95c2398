"""What every serving replica has, whichever engine runs its dense model."""

from pathlib import Path

from cluster.config import ServeConfig
from cluster.node_env import ACTOR_ENV
from cluster.serving.rollout import REPLICA_CPUS

DEMO_MODEL_NAME = "moecluster-default"
REPLICA_ACTOR = {"num_cpus": REPLICA_CPUS, "runtime_env": {"env_vars": ACTOR_ENV}}  # `application` adds the GPUs
PROBE_TIMEOUT_S = 1.0  # an ejected worker that cannot answer one row within this is still out


def served_model_name(config: ServeConfig, model_dir: str) -> str:
    """The model id of /v1/models: the config's, else the checkpoint directory's name (the embedded model's own)."""
    return config.model_name or (Path(model_dir).name if config.model else DEMO_MODEL_NAME)
