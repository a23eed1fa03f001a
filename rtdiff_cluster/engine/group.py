"""A model's replicas as Ray actors; the only place that knows their Ray options.

A replica is a ReplicaGroup: tp x cfg_parallel rank actors (engine/replica.py) in one placement
group. On GPU the group is STRICT_PACK (all of a replica's GPUs on one node, so its all-reduces run
over NVLink); on CPU it is PACK. Each rank has Ray's max_restarts; when any rank dies the
supervisor (gateway/router.py) restarts the others too, since a torch.distributed group cannot
take a new member, and starts the group again.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from rtdiff_cluster.config import ModelConfig
from rtdiff_cluster.engine.replica import EngineRank, ReplicaInfo


async def gather_refs(refs) -> list:
    """Awaits Ray calls together and returns their results, raising the first failure. Unlike a
    bare gather, the combined future never holds an exception nobody reads: when the awaiting task
    is cancelled (a timeout, shutdown) while Ray cancels the calls, asyncio would otherwise log
    "_GatheringFuture exception was never retrieved" at exit."""
    results = await asyncio.gather(*refs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def gpus_per_rank(config: ModelConfig) -> float:
    import ray

    if config.num_gpus >= 0:
        return config.num_gpus
    return 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


class ReplicaGroup:
    """The rank actors of one replica; rank 0 (the leader) takes the batches."""

    def __init__(self, config: ModelConfig, index: int, actors: list, placement_group=None):
        self.config = config
        self.index = index
        self.actors = actors
        self.placement_group = placement_group
        self._lifelines: list = []

    @property
    def leader(self):
        return self.actors[0]

    @classmethod
    def spawn(cls, config: ModelConfig, index: int, stats_interval_s: float) -> "ReplicaGroup":
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = gpus_per_rank(config)
        bundle = {"CPU": config.num_cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([dict(bundle) for _ in range(config.ranks)], strategy="STRICT_PACK" if gpus else "PACK",
                             name=f"rtdiff-{config.served_name}-{index}-{uuid.uuid4().hex[:8]}")
        actor_class = ray.remote(EngineRank)
        actors = [actor_class.options(
            num_cpus=config.num_cpus, num_gpus=gpus, max_restarts=config.max_restarts,
            max_task_retries=0,  # a batch that died with its replica is answered UNAVAILABLE, not re-run
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        ).remote(config, rank, stats_interval_s) for rank in range(config.ranks)]
        return cls(config, index, actors, pg)

    async def start(self, timeout: float | None = None) -> ReplicaInfo:
        """Rendezvous, then every rank joins the process groups and loads its shard (a no-op for
        ranks already started). Returns the leader's info."""
        host, port = await asyncio.wait_for(self.leader.rendezvous.remote(), timeout)
        infos = await asyncio.wait_for(gather_refs([a.start.remote(host, port) for a in self.actors]), timeout)
        self._lifelines = [a.lifeline.remote() for a in self.actors]
        return infos[0]

    def lifelines(self) -> list:
        """One pending Ray call per rank; each fails when its rank's process dies."""
        return list(self._lifelines)

    async def restart(self, timeout_s: float = 60.0) -> None:
        """Makes every rank restart (Ray's max_restarts permitting): the ones still alive are
        killed, and this returns once they are gone, so that no later call reaches an old process
        (the dead ones are restarting already)."""
        import ray

        lines = self._lifelines or [None] * len(self.actors)
        dying = []
        for actor, line in zip(self.actors, lines):
            ready, _ = ray.wait([line], timeout=0) if line is not None else ([], None)
            if line is None or not ready:
                try:
                    ray.kill(actor, no_restart=False)
                except Exception:
                    pass
                if line is not None:
                    dying.append(asyncio.ensure_future(line))
        self._lifelines = []
        if dying:
            await asyncio.wait(dying, timeout=timeout_s)
            for d in dying:
                d.cancel()
                if d.done() and not d.cancelled():
                    d.exception()  # retrieved: the lifeline's death is the expected outcome

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass


def spawn_replicas(config: ModelConfig, stats_interval_s: float) -> list[ReplicaGroup]:
    return [ReplicaGroup.spawn(config, i, stats_interval_s) for i in range(config.replicas)]


def connect_ray(address: str, cpus_needed: float) -> None:
    """Joins `address` (`auto` or host:port), or starts a local Ray in this process when empty."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Logical CPUs: enough for every rank's reservation even on a 2-core laptop.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=False,
                 logging_level=logging.WARNING)
