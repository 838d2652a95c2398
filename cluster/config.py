"""The serving config: one schema for the CLI, the Python API and the Helm chart's serveConfigV2."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="Checkpoint directory; unset serves the embedded default model.")
    model_name: str = Field("moecluster-default", description="Model id reported by /v1/models.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype; auto keeps the checkpoint's own (float16 runs as float32 on CPU)."
    )
    num_workers: int = Field(2, ge=1, description="Expert worker actors; each hosts a share of the experts.")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each expert worker.")
    worker_gpus: float = Field(1.0, ge=0, description="GPUs per expert worker, used only where the cluster has GPUs.")
    worker_threads: int | None = Field(None, ge=1, description="Torch threads per worker; unset shares the node's cores.")
    serving_threads: int | None = Field(None, ge=1, description="Torch threads of the serving replica.")
    expert_timeout_s: float = Field(30.0, gt=0, description="Deadline of each router-to-worker call.")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long workers may take to be placed and load.")
    max_batch_size: int = Field(64, ge=1, description="Sequences decoded together in one step.")
    max_waiting: int = Field(1024, ge=1, description="Requests queued for a batch slot before RESOURCE_EXHAUSTED.")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request leaves it unset.")
