"""Creating the topics the worker needs, and telling the operator what differs in the ones that exist (an existing
topic is never changed)."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from .kafka_security import NO_SECURITY

log = logging.getLogger(__name__)

# The changelog, the catalog and the popularity topic keep each key's newest record forever: compacted by key, never
# deleted by age (a user idle for a week must not lose their windows, nor an offset marker expire).
COMPACTED = {"cleanup.policy": "compact", "retention.ms": "-1"}


async def ensure_topic(bootstrap: str, topic: str, partitions: int, replication_factor: int,
                       config: dict[str, str], security: Mapping[str, Any] = NO_SECURITY) -> list[str]:
    """Create the topic with these partitions, replication factor and configs. If it exists already, change
    nothing and return what differs, one sentence each, for the operator (checked with DescribeTopics and
    DescribeConfigs, which the embedded Tansu answers too)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        created = await admin.create_topics([NewTopic(topic, partitions, replication_factor, topic_configs=config)])
        code = created.topic_errors[0][1]
        if code == 0:
            log.info("created topic %s: %d partitions, replication factor %d, %s", topic, partitions,
                     replication_factor, config)
            return []
        if code != 36:   # TOPIC_ALREADY_EXISTS
            raise RuntimeError(f"could not create topic {topic}: {created.topic_errors[0]}")
        problems = []
        (meta,) = await admin.describe_topics([topic])
        have = len(meta["partitions"])
        if have < partitions:
            problems.append(f"topic {topic} has {have} partitions, fewer than the {partitions} it needs")
        replicas = min((len(p["replicas"]) for p in meta["partitions"]), default=0)
        if replicas < replication_factor:
            problems.append(f"topic {topic} has replication factor {replicas}, below {replication_factor}")
        (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        current = {entry[0]: entry[1] for entry in described.resources[0][4]}
        for name, want in config.items():
            if current.get(name) != want:
                problems.append(f"topic {topic} has {name}={current.get(name, '(broker default)')}, "
                                f"it should be {want}")
        return problems
    finally:
        await admin.close()


async def partition_count(bootstrap: str, topic: str, security: Mapping[str, Any] = NO_SECURITY) -> Optional[int]:
    """Partitions of an existing topic; None when it does not exist (yet)."""
    from aiokafka.admin import AIOKafkaAdminClient
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
        return len(meta["partitions"]) if meta["error_code"] == 0 and meta["partitions"] else None
    finally:
        await admin.close()
