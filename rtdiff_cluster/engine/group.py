"""Creates a model's replicas as Ray actors; the only place that knows their Ray options."""

from __future__ import annotations

import os

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.replica import EngineReplica


def gpus_per_replica(config: ModelConfig) -> float:
    import ray

    if config.num_gpus >= 0:
        return config.num_gpus
    return 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def spawn_replicas(config: ModelConfig, stats_interval_s: float) -> list:
    import ray

    actor_class = ray.remote(EngineReplica).options(
        num_cpus=config.num_cpus,
        num_gpus=gpus_per_replica(config),
        max_restarts=config.max_restarts,
        max_task_retries=0,  # a batch that died with its replica is answered UNAVAILABLE, not re-run
    )
    return [actor_class.remote(config, stats_interval_s) for _ in range(config.replicas)]


def connect_ray(address: str, cpus_needed: float) -> None:
    """Joins `address` (`auto` or host:port), or starts a local Ray in this process when empty."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Logical CPUs: enough for every replica's reservation even on a 2-core laptop.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=False,
                 logging_level=logging.WARNING)
