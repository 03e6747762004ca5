"""deploy/: no Docker engine or cluster here, so the files are checked by schema, offline. The compose file against
the Compose specification (check-jsonschema's vendored vendor.compose-spec), every Kubernetes document against
kubernetes-validate's strict schemas for K8S_VERSION (both ship their schemas in the wheel), and the worker
containers against the click commands themselves: their SCENESTREAM_* variables are settings the CLI reads and their
arguments parse as `scenestream worker`. Each check is also run on a broken copy, which it must reject."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import kubernetes_validate
import yaml
from scenestream.stream.cli import main
from scenestream.stream.cli.reference import ENVIRONMENT, _commands
from scenestream.stream.live.config import bind_problem, is_loopback

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE, KUBERNETES, DOCKERFILE = DEPLOY / "docker-compose.yml", DEPLOY / "kubernetes.yaml", DEPLOY / "Dockerfile"
K8S_VERSION = "1.33.0"     # a stated version, not kubernetes-validate's moving default (its latest)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, (source, old)
    out = tmp_path / f"broken-{source.stem}.yml"
    out.write_text(text.replace(old, new, 1))
    return out


# ---- the Compose specification --------------------------------------------------------------------------------

def compose_errors(path: Path) -> str:
    """check-jsonschema's output when the file breaks the Compose spec, else ''."""
    exe = Path(sys.executable).with_name("check-jsonschema")
    proc = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", "--color", "never", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr   # 1 = invalid; anything else = the tool failed
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def test_the_compose_file_follows_the_compose_spec(tmp_path):
    assert compose_errors(COMPOSE) == ""
    unknown_key = _broken_copy(tmp_path, COMPOSE, "\nservices:", "\nservice:")
    assert "service" in compose_errors(unknown_key)
    typo = _broken_copy(tmp_path, COMPOSE, "    depends_on:", "    depend_on:")
    assert "depend_on" in compose_errors(typo)


# ---- Kubernetes -------------------------------------------------------------------------------------------------

def kubernetes_errors(path: Path) -> list[str]:
    errors = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        try:
            checked = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            assert checked == K8S_VERSION.rsplit(".", 1)[0], checked   # that version's schemas, no older fallback
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} {exc.json_path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc.get('apiVersion')} {doc.get('kind')}: no such kind in Kubernetes {K8S_VERSION}")
    return errors


def test_every_kubernetes_document_passes_strict_validation(tmp_path):
    kinds = [d["kind"] for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    assert "StatefulSet" in kinds and "Service" in kinds, kinds
    assert kubernetes_errors(KUBERNETES) == []
    typo = _broken_copy(tmp_path, KUBERNETES, "  replicas: 2", "  replicass: 2")
    assert any("replicass" in e for e in kubernetes_errors(typo)), kubernetes_errors(typo)
    wrong_type = _broken_copy(tmp_path, KUBERNETES, "containerPort: 6066", "containerPort: http")
    assert any("http" in e for e in kubernetes_errors(wrong_type)), kubernetes_errors(wrong_type)
    unknown_kind = _broken_copy(tmp_path, KUBERNETES, "kind: Service", "kind: Servce")
    assert any("no such kind" in e for e in kubernetes_errors(unknown_kind)), kubernetes_errors(unknown_kind)


# ---- the worker containers against the CLI ----------------------------------------------------------------------

def cli_settings() -> tuple[set[str], set[str]]:
    """(every SCENESTREAM_* variable the CLI reads, those `scenestream worker` reads), from the click commands (the
    same walk that writes docs/configuration.md) and the environment-only settings."""
    env_only = {var for var, _, _ in ENVIRONMENT}
    every, worker = set(env_only), set(env_only)
    root = click.Context(main, info_name="scenestream", **main.context_settings)
    for path, cmd, ctx in _commands(main, root):
        for p in cmd.params:
            if isinstance(p, click.Option):
                names = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or []) or \
                    [f"{ctx.auto_envvar_prefix}_{p.name.upper()}"]
                every.update(names)
                if path == "worker":
                    worker.update(names)
    return every, worker


def _image_defaults(dockerfile: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(ENV, ENTRYPOINT, CMD) of the worker image."""
    text = dockerfile.read_text()
    env = dict(re.findall(r"^ENV\s+(\w+)=(\S+)", text, re.MULTILINE))
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE).group(1))
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])", text, re.MULTILINE).group(1))
    return env, entrypoint, cmd


def worker_containers(compose: Path, kubernetes: Path, dockerfile: Path) -> list[tuple[str, dict, list[str]]]:
    """(where, environment, scenestream arguments) of each container that runs the image of deploy/Dockerfile."""
    image_env, entrypoint, image_cmd = _image_defaults(dockerfile)
    assert entrypoint == ["scenestream"], entrypoint
    out = []
    for name, svc in yaml.safe_load(compose.read_text())["services"].items():
        if "build" not in svc:
            continue
        env = svc.get("environment", {})
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        args = svc.get("command", image_cmd)
        if "entrypoint" in svc:
            args = [*svc["entrypoint"][1:], *args] if svc["entrypoint"][:1] == ["scenestream"] else svc["entrypoint"]
        out.append((f"compose {name}", {**image_env, **env}, args))
    for doc in yaml.safe_load_all(kubernetes.read_text()):
        if not doc or doc["kind"] not in WORKLOADS:
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if not c["image"].startswith("scenestream"):
                continue
            args = c.get("args", image_cmd)
            if "command" in c:
                args = [*c["command"][1:], *args] if c["command"][:1] == ["scenestream"] else c["command"]
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            out.append((f"{doc['metadata']['name']}/{c['name']}", {**image_env, **env}, args))
    return out


def worker_problems(compose: Path, kubernetes: Path, dockerfile: Path, monkeypatch) -> list[str]:
    every, worker = cli_settings()
    problems = [f"{path.name}: {var} is no setting of the CLI" for path in (compose, kubernetes, dockerfile)
                for var in sorted(set(re.findall(r"\bSCENESTREAM_[A-Z0-9_]+", path.read_text())) - every)]
    root = click.Context(main, info_name="scenestream", **main.context_settings)
    for where, env, args in worker_containers(compose, kubernetes, dockerfile):
        problems += [f"{where}: `scenestream worker` does not read {var}"
                     for var in sorted(v for v in env if v.startswith("SCENESTREAM_") and v not in worker)]
        if not args or args[0] != "worker":
            problems.append(f"{where}: {args} does not run `scenestream worker`")
            continue
        with monkeypatch.context() as m:   # exactly the container's environment decides the settings
            for var in [v for v in os.environ if v.startswith("SCENESTREAM_")]:
                m.delenv(var)
            for var, value in env.items():
                m.setenv(var, str(value))
            try:   # parse (flags, types, required settings), do not run
                ctx = main.commands["worker"].make_context("worker", list(args[1:]), parent=root)
            except click.ClickException as exc:
                problems.append(f"{where}: {args}: {exc.format_message()}")
                continue
        # what the worker checks before it starts, and the token a listener on every address needs
        problems += [f"{where}: {p}" for p in [bind_problem(ctx.params["web_host"], ctx.params["canonical_url"])] if p]
        if not is_loopback(ctx.params["web_host"]) and "SCENESTREAM_API_TOKEN" not in env:
            problems.append(f"{where}: listens on {ctx.params['web_host']} without SCENESTREAM_API_TOKEN")
    return problems


def test_the_worker_containers_use_real_settings_and_flags(tmp_path, monkeypatch):
    assert [w for w, _, _ in worker_containers(COMPOSE, KUBERNETES, DOCKERFILE)] == \
        ["compose worker-a", "compose worker-b", "scenestream-worker/worker"]
    assert worker_problems(COMPOSE, KUBERNETES, DOCKERFILE, monkeypatch) == []

    def problems(source: Path, old: str, new: str) -> str:
        broken = _broken_copy(tmp_path, source, old, new)
        found = worker_problems(*(broken if p == source else p for p in (COMPOSE, KUBERNETES)), DOCKERFILE,
                                monkeypatch)
        assert found, (old, new)
        return "\n".join(found)

    assert "SCENESTREAM_BROKERS is no setting" in problems(KUBERNETES, "name: SCENESTREAM_BROKER,",
                                                           "name: SCENESTREAM_BROKERS,")
    assert "does not read SCENESTREAM_TRAIN_EPOCHS" in problems(COMPOSE, "SCENESTREAM_BROKER: ",
                                                                "SCENESTREAM_TRAIN_EPOCHS: 2\n      SCENESTREAM_BROKER: ")
    assert "--broker" in problems(COMPOSE, "SCENESTREAM_BROKER: ", "OTHER_BROKER: ")   # required, now unset
    assert "No such option: --web-prot" in problems(KUBERNETES, '"--web-port"', '"--web-prot"')
    assert "is not a valid integer" in problems(COMPOSE, '"6066"]', '"http"]')
    assert "does not run `scenestream worker`" in problems(KUBERNETES, 'args: ["worker"', 'args: ["wroker"')
    assert "--canonical-url" in problems(KUBERNETES, 'value: "http://$(POD_IP):6066"', 'value: ""')
    assert "without SCENESTREAM_API_TOKEN" in problems(COMPOSE, "SCENESTREAM_API_TOKEN:", "OTHER_TOKEN:")



def test_kubernetes_workers_take_the_token_from_a_secret_and_the_url_from_the_pod_ip():
    for doc in yaml.safe_load_all(KUBERNETES.read_text()):
        for c in (doc["spec"]["template"]["spec"]["containers"] if doc and doc["kind"] in WORKLOADS else []):
            env = {e["name"]: e for e in c.get("env", [])}
            assert set(env["SCENESTREAM_API_TOKEN"]) == {"name", "valueFrom"}, env   # no literal token here
            assert "secretKeyRef" in env["SCENESTREAM_API_TOKEN"]["valueFrom"]
            assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            assert env["SCENESTREAM_WORKER_CANONICAL_URL"]["value"].startswith("http://$(POD_IP):")


def test_every_worker_keeps_its_rocksdb_state_on_a_volume_of_its_own():
    """Compose: each worker service runs --state rocksdb with its state dir on a named volume of its own; Kubernetes:
    the StatefulSet's container mounts a volumeClaimTemplate (one volume per pod) at its state dir."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker")}
    volumes = []
    for name, svc in workers.items():
        env = svc["environment"]
        assert env["SCENESTREAM_WORKER_STATE"] == "rocksdb", name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        volumes.append(mounts[env["SCENESTREAM_WORKER_STATE_DIR"]])
    assert len(set(volumes)) == len(workers) >= 2 and not any(v.startswith((".", "/")) for v in volumes)
    (sts,) = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d and d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SCENESTREAM_WORKER_STATE"] == "rocksdb"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounted = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == env["SCENESTREAM_WORKER_STATE_DIR"]}
    assert mounted and mounted <= claims
