"""Settings of `loraswap serve-ray` beyond the server's own (flags or LORASWAP_<NAME> variables):
how many engine replicas, where the Ray cluster is, what each replica reserves on it. Each
replica takes every server setting as `loraswap serve` would (model, slots, KV cache, store)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", frozen=True)

    replicas: int = Field(default=2, ge=1, le=1024, description="Engine replicas, each a whole loraswap engine.")
    ray_address: str | None = Field(
        default=None, max_length=500,
        description="Ray cluster to join (auto, HOST:6379 or ray://HOST:10001); unset: start a local Ray instance.",
    )
    replica_cpus: float = Field(
        default=1.0, gt=0, le=1024, allow_inf_nan=False,
        description="CPUs Ray reserves per replica (fractions allowed); its torch threads follow, at least 1.",
    )
    replica_gpus: float = Field(
        default=0.0, ge=0, le=64, allow_inf_nan=False, description="GPUs Ray reserves per replica (fractions allowed)."
    )
    replica_max_ongoing: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Requests Ray sends one replica at once before it prefers another (or queues); unset: max_num_seqs.",
    )
    ray_num_cpus: int | None = Field(
        default=None, ge=1, le=4096,
        description="CPUs of the local Ray instance started without --ray-address; unset: all of them.",
    )
