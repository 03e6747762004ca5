"""Records sent as one record batch per partition: the same partition as the default partitioner gives a key, and
every record back in the order added, at the offsets the batch's acknowledgement says (real embedded broker)."""
import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner, murmur2 as python_murmur2
from hypothesis import given, settings, strategies as st

from scenestream.stream.live.record_batches import RecordBatches, key_partitions, murmur2

from .conftest import run


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=30))
def test_murmur2_is_kafka_s_hash_for_every_key_length(keys):
    assert murmur2(keys).tolist() == [python_murmur2(k) for k in keys]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=30), st.integers(1, 64))
def test_keys_go_to_the_default_partitioner_s_partition(ids, partitions):
    keys = [i.encode("utf-8", "surrogatepass") for i in ids]
    everything = list(range(partitions))
    assert key_partitions(keys, partitions) == [DefaultPartitioner()(k, everything, everything) for k in keys]


def test_batches_keep_each_partition_s_order_and_report_its_offsets(broker):
    """Two partitions; a batch size small enough that each partition's records fill several builders."""
    topic = f"rb-{uuid.uuid4().hex[:8]}"

    async def scenario():
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_batch_size=4096)
        await producer.start()
        try:
            batches = RecordBatches(producer)
            added = {0: [], 1: []}
            for k in range(120):
                value = f"{k:04d}".encode() * (k % 50 + 1)
                batches.add(topic, k % 3 % 2, f"k{k}".encode(), value)
                added[k % 3 % 2].append(value)
            sent = await batches.send()
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        got = {0: [], 1: []}
        try:
            consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
            while sum(map(len, got.values())) < 120:
                for tp, msgs in (await consumer.getmany(timeout_ms=2000)).items():
                    got[tp.partition] += [(m.offset, m.value) for m in msgs]
        finally:
            await consumer.stop()
        return sent, added, got

    sent, added, got = run(scenario())
    assert len(sent) > 4                                          # several builders per partition
    for partition in (0, 1):
        assert [v for _, v in got[partition]] == added[partition]
    reported = sorted((b.future.result().partition, o) for b in sent for o in b.offsets())
    assert reported == sorted((p, o) for p, msgs in got.items() for o, _ in msgs)
