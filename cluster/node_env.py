"""The environment of moecluster's Ray processes.

ACTOR_ENV goes with the actors moecluster starts (the serving replica, the expert workers) in their
`runtime_env`, on any cluster. NODE_ENV reaches processes that Ray or Serve start, such as Serve's proxies:
local clusters set it before `ray.init`, and the Helm chart sets it on every Ray container.
"""

import os

# Idle OpenMP threads sleep rather than spin: a spinning router or worker steals the cores the others compute on.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

# Serve's proxies reach the replica over gRPC instead of Ray actor calls. Each streamed message then costs the
# proxy a fraction of the CPU (docs/performance.md has the measurement).
NODE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply_node_env() -> None:
    """Set NODE_ENV in this process, for the Ray processes it starts; a variable already set is kept."""
    for name, value in NODE_ENV.items():
        os.environ.setdefault(name, value)
