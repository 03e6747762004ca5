"""The house: one installed namespace, layers that import bottom-up, a CLI that loads nothing heavy to show its help,
generated configuration docs, and documentation that cites only files the repository has."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"stream": "scenestream.stream", "model": "scenestream.model", "index": "scenestream.index"}
HEAVY = ("torch", "faiss", "faust", "aiokafka", "aiohttp")


def test_the_wheel_installs_only_the_scenestream_namespace(tmp_path):
    """pip builds the wheel from pyproject.toml; every file in it lives under scenestream/ (or its dist-info)."""
    had_build = (ROOT / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    finally:   # setuptools builds in the checkout's build/: leave none behind
        if not had_build:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("scenestream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"scenestream", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for folder, package in PACKAGES.items():   # every module of the three folders is in the wheel
        for path in (ROOT / folder).rglob("*.py"):
            assert f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}" in names, path


def test_the_namespace_imports_and_no_generic_name_does(tmp_path):
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    ok = run("import scenestream.stream, scenestream.model, scenestream.index")
    assert ok.returncode == 0, ok.stderr
    for name in PACKAGES:
        assert run(f"import {name}").returncode != 0, name
        # not even from the checkout itself, where the folders are on sys.path
        inside = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert inside.returncode != 0 and "scenestream." in inside.stderr, name


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved against its package."""
    rel = path.relative_to(root).parts
    package = PACKAGES[rel[0]].split(".") + list(rel[1:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1])
            out += [(f"{base}.{node.module}", node.lineno)] if node.module else \
                [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


# stream/'s layers, bottom-up: what each folder may import of the project, and which libraries it may not import.
# A layer imports only layers below it (and itself); model/ and index/ are leaves; the CLI sits on top.
KAFKA = ("faust", "aiokafka", "aiohttp")
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stream/core/": (("scenestream.stream.core",), HEAVY),
    "stream/datasets/": (("scenestream.stream.core", "scenestream.stream.datasets"), HEAVY),
    "stream/offline/": (("scenestream.stream.core", "scenestream.stream.datasets", "scenestream.stream.offline",
                         "scenestream.model", "scenestream.index"), KAFKA),
    "stream/live/": (("scenestream.stream.core", "scenestream.stream.live", "scenestream.model",
                      "scenestream.index"), ()),
    "stream/local/": (("scenestream.stream.core", "scenestream.stream.datasets", "scenestream.stream.offline",
                       "scenestream.stream.live", "scenestream.stream.local", "scenestream.model",
                       "scenestream.index"), ()),
    "stream/cli/": (("scenestream.",), ()),
    "model/": (("scenestream.model",), ()),
    "index/": (("scenestream.index",), ()),
}


def layer_violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Each module sits in a layer folder (stream/ itself holds only its __init__), imports only the project
    layers its folder may, none of the libraries its folder may not, and nothing under the old top-level names."""
    bad = []
    for path in paths:
        where = path.relative_to(root).as_posix()
        layer = next((folder for folder in LAYERS if where.startswith(folder)), None)
        if layer is None:
            if where != "stream/__init__.py":
                bad.append(f"{where} is in no layer folder ({', '.join(LAYERS)})")
            continue
        allowed, banned = LAYERS[layer]
        for module, line in _imports(path, root):
            top = module.split(".")[0]
            if top in PACKAGES:
                bad.append(f"{where}:{line} imports the generic name {module}")
            if module.startswith("scenestream.") and not any(module == a.rstrip(".") or
                                                             module.startswith(a.rstrip(".") + ".") or
                                                             (a.endswith(".") and module.startswith(a))
                                                             for a in allowed):
                bad.append(f"{where}:{line} ({layer} is below it) imports {module}")
            if top in banned:
                bad.append(f"{where}:{line} ({layer} may not use {top}) imports {module}")
    return bad


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_layers_import_bottom_up():
    bad = layer_violations(_modules("stream") + _modules("model") + _modules("index"))
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_violations(tmp_path):
    """The walk above must be able to fail: one planted violation per rule and folder, each caught once."""
    files = {"model/bad.py": "from ..stream.core import events\n",                      # a leaf imports the stream
             "index/bad.py": "import scenestream.model.infer\n",                        # a leaf imports the model
             "stream/core/bad.py": "import faust\n",                                   # the pure core uses Kafka
             "stream/core/bad2.py": "from ..live.worker import make_app\n",            # the core imports a layer
             "stream/datasets/bad.py": "from ..offline.logs import load_events\n",     # data sets import offline
             "stream/datasets/bad2.py": "import torch\n",                               # data sets use torch
             "stream/offline/bad.py": "from ..live.state import encode_state\n",       # offline imports the shell
             "stream/offline/bad2.py": "from aiokafka import AIOKafkaConsumer\n",      # offline uses Kafka
             "stream/live/bad.py": "from ..offline.replay import replay\n",            # the shell imports offline
             "stream/live/bad2.py": "from .. import cli\n",                             # the shell imports the CLI
             "stream/local/bad.py": "from ..cli import main\n",                         # local imports the CLI
             "stream/old.py": "import scenestream.stream.core\n",                       # a module outside the layers
             "stream/cli/bad.py": "from model.infer import InterestEncoder\n"}         # an old top-level name
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for name in files:
        got = layer_violations([tmp_path / name], tmp_path)
        assert len(got) == 1, (name, got)


def _all_commands(group: click.Group, path=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, (*path, name))


def test_every_command_explains_itself():
    from scenestream.stream.cli import main
    paths = [p for p, _ in _all_commands(main)]
    assert {"generate", "train", "evaluate", "export", "replay", "broker", "produce", "catalog", "worker", "run",
            "index", ("index", "build")} <= {p[0] if len(p) == 1 else p for p in paths}
    for path in [(), *paths]:
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output and len(result.output) > 150, (path, result.output)


def test_the_cli_loads_nothing_heavy_to_show_help():
    code = ("import sys\nfrom scenestream.stream.cli import main\n"
            "for args in (['--help'], ['train', '--help'], ['worker', '--help'], ['index', 'build', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_configuration_docs_are_generated_from_the_commands():
    from scenestream.stream.cli.reference import OUT, configuration_markdown
    assert OUT.read_text() == configuration_markdown(), "stale: run python -m scenestream.stream.cli.reference"
    text = OUT.read_text()
    assert "| train | `--window` |" in text and "`SCENESTREAM_WINDOW`" in text
    assert "`SCENESTREAM_BROKER`" in text and "`SCENESTREAM_SCENES`" in text


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 12_000
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"(python3 -m venv .venv && .venv/bin/pip install .+ && .venv/bin/python -m pytest)",
                             ci).group(1)
    blocks = re.findall(r"```sh\n(.+?)\n```", readme)
    assert blocks[0].endswith("scenestream run") and blocks[1] == test_command, blocks[:2]


def test_every_cited_document_exists():
    """Code, tests and docs cite documents by path; each must be in the repository."""
    files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".venv" not in p.parts and p.is_file()]
    cited = []
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *_modules("stream"), *_modules("model"),
                 *_modules("index"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for name in re.findall(r"[\w./-]*[\w-]+\.(?:md|yaml)\b", path.read_text()):
            if not (path.parent / name).exists() and not any(f == name or f.endswith("/" + name) for f in files):
                cited.append(f"{path.relative_to(ROOT)}: {name}")
    assert not cited, cited


# ---- documented defaults ----------------------------------------------------------------------------------------

DOCS = ("README.md", "SCALING.md", "docs/design.md", "docs/operations.md")
UNITS = {"h": 3600.0, "s": 1.0, "ms": 0.001, "MB": 1.0, "layer": 1.0, "layers": 1.0, "": 1.0}
# "`--flag` ... default X [unit]", and after it "(N for DATA SET[, DATA SET and DATA SET])" for a preset's value
# (a default said in words, "by default `http://WEB_HOST:WEB_PORT`", "default: the system's CAs", is not a value)
STATED = re.compile(r"`(--[a-z0-9-]+)`[^`.;]{0,40}?(?<!by )\bdefault\s+(?:(\d[\d.]*)(?:\s(h|s|ms|MB|layers?)\b)?|"
                    r"`([^`]+)`)(?:\s\((\d[\d.]*) for (?:the )?([\w\- ,]+?)(?: presets?)?\))?")


def cli_defaults() -> dict[str, set]:
    """Every option's default over all commands (an option several commands share may differ between them);
    the model's options that default per data set give the preset of other input."""
    from scenestream.model.config import preset
    from scenestream.stream.cli import main
    out: dict[str, set] = {}
    for _, cmd in _all_commands(main):
        for p in cmd.params:
            for flag in p.opts:
                default = p.default
                if default is None and (key := flag[2:].replace("-", "_")) in preset(None):
                    default = preset(None)[key]
                out.setdefault(flag, set()).add(default)
    return out


def default_mismatches(text: str, where: str) -> list[str]:
    """What a document states as a default that the code does not have: a CLI option's default, or a data set's
    preset value."""
    from scenestream.model.config import preset
    defaults, bad = cli_defaults(), []
    for m in STATED.finditer(text):
        flag, number, unit, literal, preset_value, datasets = m.groups()
        value = number if number is not None else literal
        if flag not in defaults:
            bad.append(f"{where}: {flag} is no option of any command")
            continue
        if not any(_same(value, unit, d) for d in defaults[flag]):
            bad.append(f"{where}: {flag} documented default {value}{' ' + unit if unit else ''}, "
                       f"the code's {sorted(map(str, defaults[flag]))}")
        if preset_value:
            key = flag[2:].replace("-", "_")
            for name in re.split(r",\s*|\s+and\s+", datasets.strip()):
                if preset(name.strip()).get(key) != float(preset_value) or name.strip() not in _presets():
                    bad.append(f"{where}: {flag} {preset_value} for {name}, the preset's "
                               f"{preset(name.strip()).get(key)}")
    return bad


def _presets():
    from scenestream.model.config import PRESETS
    return set(PRESETS) - {None}


def _same(value: str, unit: str | None, default) -> bool:
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return value == str(default)
    try:
        return abs(float(value) * UNITS[unit or ""] - float(default)) < 1e-9
    except ValueError:
        return False


def test_every_documented_default_is_the_codes():
    found = [m for doc in DOCS for m in STATED.finditer((ROOT / doc).read_text())]
    assert len(found) >= 10, "the documents state defaults; the pattern finds too few of them"
    bad = [b for doc in DOCS for b in default_mismatches((ROOT / doc).read_text(), doc)]
    assert not bad, "\n".join(bad)


def test_the_default_check_sees_a_wrong_default():
    """One planted error of each kind: a CLI default, a unit, a preset value, a data set, an unknown option."""
    planted = ["`--batch-max` (default 500)", "`--max-clock-skew` (default 2 h)", "`--span`, default 24 (32 for ml-1m)",
               "`--span`, default 24 (48 for ml-1m and ml-2m)", "`--no-such-flag` (default 1)"]
    for text in planted:
        assert len(default_mismatches(text, "planted")) == 1, text
    assert default_mismatches("`--batch-max` (default 5000); `--max-clock-skew` (default 1 h); `--span`, default 24 "
                              "(48 for ml-1m, ml-1m-5core and ml-100k)", "right") == []


# ---- the results page ---------------------------------------------------------------------------------------------

def test_the_headline_tables_are_what_bench_results_json_gives():
    """BENCHMARKS.md and README.md hold the tables bench/results_page.py renders from bench/results.json, where each
    headline figure has its date and command; the page stays a results page."""
    sys.path.insert(0, str(ROOT / "bench"))
    import results_page
    results = results_page.load()
    for name, kind in results_page.PAGES.items():
        text = (ROOT / name).read_text()
        assert results_page.block(text) == results_page.render(results, kind), \
            f"{name}: stale headline table; run python bench/results_page.py"
    assert all(f["date"] and f["command"] and f["value"] for f in results["figures"])
    assert len((ROOT / "BENCHMARKS.md").read_bytes()) <= 20_000
    # and the check can fail: a figure changed in the source is a stale page
    results["figures"][0]["value"] += " (changed)"
    assert results_page.block((ROOT / "BENCHMARKS.md").read_text()) != results_page.render(results, "page")
