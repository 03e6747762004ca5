"""TLS/SASL settings reach every Kafka client the worker and the CLI build (stream/live/kafka_security.py), and the
passwords never show: not in a repr, not in a log line, not as a flag. No broker: the real clients are built and
their `start` stopped before it connects; only the log test starts real clients, against a closed port."""
from __future__ import annotations

import ast
import asyncio
import logging
import ssl
from pathlib import Path
from types import SimpleNamespace

import certifi
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from click.testing import CliRunner

from scenestream.model.checkpoint import load_checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.stream.live import worker as worker_mod
from scenestream.stream.cli import main
from scenestream.stream.live.kafka_security import NO_SECURITY, SASL_PASSWORD_ENV, KafkaSecurity
from scenestream.stream.local.processes import free_port
from scenestream.stream.live.produce import produce_lines

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Pa55word-never-shown"
SECURITY = KafkaSecurity("SASL_SSL", ssl_cafile=certifi.where(), sasl_mechanism="SCRAM-SHA-512",
                         sasl_username="svc-scenestream", sasl_password=SECRET)
CLIENTS = (AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient)


class Built(Exception):
    """Raised by the patched `start`: the client is built, it never connects."""


@pytest.fixture
def built(monkeypatch) -> list:
    clients: list = []

    async def start(self):
        clients.append(self)
        raise Built

    for cls in CLIENTS:
        monkeypatch.setattr(cls, "start", start)
    return clients


async def client_built_by(coro, clients: list):
    with pytest.raises(Built):
        await coro
    client = clients[-1]
    await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
    return client


def assert_secured(client, security: KafkaSecurity = SECURITY) -> None:
    """What aiokafka's connection code reads (AIOKafkaClient: each connection gets these)."""
    k = client.client if isinstance(client, AIOKafkaProducer) else client._client
    assert k._security_protocol == security.security_protocol, type(client)
    assert k._sasl_mechanism == security.sasl_mechanism
    assert (k._sasl_plain_username, k._sasl_plain_password) == (security.sasl_username, security.sasl_password)
    if security.ssl:
        assert isinstance(k._ssl_context, ssl.SSLContext) and k._ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert k._ssl_context.check_hostname == security.ssl_check_hostname
    else:
        assert k._ssl_context is None


def model_of(checkpoint):
    """A real encoder (the session's small checkpoint) and a stand-in for its item index: these tests are about the
    clients make_app builds, and nothing here serves a recommendation."""
    return InterestEncoder(load_checkpoint(checkpoint)), SimpleNamespace(dim=8)


def test_every_client_the_worker_builds_gets_the_settings(built, monkeypatch, checkpoint):
    made = {}

    def recording(cls):
        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made[cls.__name__] = self
        return Recorded

    for name in ("ClicksFeeder", "CatalogFollower"):
        monkeypatch.setattr(worker_mod, name, recording(getattr(worker_mod, name)))
    cfg = worker_mod.WorkerConfig(broker=f"kafka://127.0.0.1:{free_port()}", app_id="sec-test", security=SECURITY)

    async def build_all():
        app, service = worker_mod.make_app(cfg, *model_of(checkpoint))
        creds = app.conf.broker_credentials
        assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == \
            ("SASL_SSL", "SCRAM-SHA-512", SECURITY.sasl_username, SECRET)
        faust_producer = app.producer._new_producer()
        assert_secured(faust_producer)                                        # Faust's own producer
        await faust_producer.stop()
        assert_secured(await client_built_by(service.store.start(), built))   # the changelog producer
        assert_secured(await client_built_by(service.store.recover(0), built))  # recovery's consumer
        service.store.applied[0] = 0
        assert_secured(await client_built_by(service._reread(0, 0, "clicks", 10), built))   # the gap re-reader
        assert_secured(await client_built_by(service.popularity.follow(cfg.popularity_topic), built))
        catalog = made["CatalogFollower"]
        assert_secured(await client_built_by(catalog.run(), built))
        catalog.applied[0] = 3
        assert_secured(await client_built_by(catalog.switch(catalog.index, lambda: None), built))
        assert_secured(await client_built_by(made["ClicksFeeder"].run(), built))
        assert_secured(await client_built_by(worker_mod.prepare_topics(cfg), built))   # partition_count's admin

        async def no_topic(*args):
            return None
        monkeypatch.setattr(worker_mod, "partition_count", no_topic)
        assert_secured(await client_built_by(worker_mod.prepare_topics(cfg), built))   # ensure_topic's admin
        assert_secured(await client_built_by(produce_lines("127.0.0.1:1", "t", [b"{}"], progress=False,
                                                           security=SECURITY.client_kwargs()), built))
    asyncio.run(build_all())
    with pytest.raises(Built):
        worker_mod.check_reachable(cfg.broker, SECURITY.client_kwargs())
    assert_secured(built[-1])
    assert len(built) == 11


def test_plaintext_stays_aiokafkas_default_and_faust_gets_no_credentials():
    assert KafkaSecurity().client_kwargs() is NO_SECURITY and KafkaSecurity().faust_credentials() is None
    cfg = worker_mod.WorkerConfig(broker="kafka://127.0.0.1:9092")
    assert worker_mod.faust_settings(cfg)["broker_credentials"] is None
    ssl_only = KafkaSecurity("SSL", ssl_check_hostname=False)
    assert set(ssl_only.client_kwargs()) == {"security_protocol", "ssl_context"}
    assert ssl_only.faust_credentials().protocol.value == "SSL"
    assert not ssl_only.client_kwargs()["ssl_context"].check_hostname


def test_every_client_construction_in_stream_passes_the_security_kwargs():
    """A new AIOKafka* call that forgets `**security` fails here (a `**self.X` counts when self.X = dict(...) has
    the `**security`)."""
    names = {cls.__name__ for cls in CLIENTS}
    calls, bad = 0, []
    for path in sorted((ROOT / "stream").rglob("*.py")):
        tree = ast.parse(path.read_text())
        settings = {ast.unparse(n.targets[0]): n.value for n in ast.walk(tree)
                    if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.value, ast.Call)}

        def secured(call: ast.Call) -> bool:
            for kw in call.keywords:
                if kw.arg is None:
                    text = ast.unparse(kw.value)
                    if "security" in text or (text in settings and secured(settings[text])):
                        return True
            return False
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in names:
                calls += 1
                if not secured(node):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 10 and not bad, bad


def test_the_password_shows_in_no_repr_and_no_log(caplog, checkpoint):
    caplog.set_level(logging.DEBUG)
    cfg = worker_mod.WorkerConfig(broker=f"kafka://127.0.0.1:{free_port()}", security=SECURITY)
    for shown in (repr(SECURITY), str(SECURITY), repr(cfg), repr(SECURITY.faust_credentials())):
        assert SECRET not in shown and "svc-scenestream" in shown
    assert "sasl_password='***'" in repr(SECURITY) and "sasl_password=''" in repr(KafkaSecurity())

    async def build_and_start():
        app, service = worker_mod.make_app(cfg, *model_of(checkpoint))
        with pytest.raises(Exception):   # a real start, refused: nothing listens on the port
            await service.store.start()
        await service.store.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap, **SECURITY.client_kwargs())
        with pytest.raises(Exception):
            await consumer.start()
        await consumer.stop()
    asyncio.run(build_and_start())
    with pytest.raises(Exception):
        worker_mod.check_reachable(cfg.broker, SECURITY.client_kwargs(), timeout=5)
    assert caplog.records and SECRET not in caplog.text


# ---- the CLI ------------------------------------------------------------------------------------------------------

def _commands_with_a_broker():
    return [name for name, cmd in main.commands.items() if any(p.name in ("broker_url", "broker") and "--broker" in p.opts for p in cmd.params)]


def test_no_password_flag_anywhere():
    assert set(_commands_with_a_broker()) == {"worker", "run", "produce", "catalog"}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            assert "password" not in p.name or p.name.endswith("password_file"), (name, p.name)
    for name in _commands_with_a_broker():
        result = CliRunner().invoke(main, [name, "--broker", "kafka://x:1", "--broker-sasl-password", SECRET])
        assert result.exit_code == 2 and "No such option" in result.output, (name, result.output)
        assert "--broker-security-protocol" in CliRunner().invoke(main, [name, "--help"]).output


def test_the_worker_command_reads_every_setting_from_the_environment(built, monkeypatch, tmp_path, checkpoint):
    """SECURITY.environ() is also what `scenestream run` gives its worker (run.py)."""
    env = SECURITY.environ()
    assert env[SASL_PASSWORD_ENV] == SECRET
    monkeypatch.setattr("scenestream.stream.cli.serve.open_model", lambda *a: model_of(checkpoint)[0])
    args = ["worker", "--broker", "kafka://127.0.0.1:1", "--checkpoint", str(tmp_path)]
    result = CliRunner().invoke(main, args, env=env)   # the reachability check, through the real admin client
    assert result.exit_code == 1 and "unreachable" in result.output and SECRET not in result.output
    assert_secured(built[-1])

    seen = {}

    async def prepare(cfg):
        seen["cfg"] = cfg
        raise RuntimeError("stop here")
    monkeypatch.setattr(worker_mod, "check_reachable", lambda *a: None)
    monkeypatch.setattr(worker_mod, "open_index", lambda cfg, encoder: model_of(checkpoint)[1])
    monkeypatch.setattr(worker_mod, "prepare_topics", prepare)
    result = CliRunner().invoke(main, args, env=env)
    assert "stop here" in result.output and seen["cfg"].security == SECURITY


def test_produce_and_catalog_take_the_password_from_a_file(built, tmp_path):
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    flags = ["--broker", "kafka://127.0.0.1:1", "--broker-security-protocol", "SASL_PLAINTEXT",
             "--broker-sasl-mechanism", "SCRAM-SHA-256", "--broker-sasl-username", "svc",
             "--broker-sasl-password-file", str(secret_file)]
    want = KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="svc", sasl_password=SECRET)
    log = tmp_path / "events.jsonl"
    log.write_text('{"user_id": "u1"}\n')
    for args in (["produce", *flags, "--input", str(log)], ["catalog", *flags, "--delete", "m1"]):
        result = CliRunner().invoke(main, args, env={SASL_PASSWORD_ENV: ""})
        assert result.exit_code == 1 and "could not produce" in result.output, result.output
        assert_secured(built.pop(), want)


def test_incomplete_settings_are_refused_at_start():
    for flags, said in ((["--broker-security-protocol", "SASL_SSL", "--broker-sasl-username", "u"], SASL_PASSWORD_ENV),
                        (["--broker-sasl-username", "u"], "SASL_SSL or SASL_PLAINTEXT"),
                        (["--broker-ssl-cafile", certifi.where()], "SSL or SASL_SSL")):
        result = CliRunner().invoke(main, ["produce", "--broker", "kafka://x:1", "--input", "x", *flags],
                                    env={SASL_PASSWORD_ENV: ""})
        assert result.exit_code == 2 and said in result.output, result.output
