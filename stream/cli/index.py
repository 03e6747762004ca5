"""`scenestream index ...`: build and save the item index for a checkpoint, so serving loads it instead of
building it (the point for ANN kinds at large catalogs)."""
from __future__ import annotations

import json
import time

import click

from scenestream.index.spec import DEVICES, KINDS, IndexSpec


@click.group("index")
def index_group() -> None:
    """Item index: build it from a checkpoint and save it next to the model."""


@index_group.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--kind", type=click.Choice(KINDS), default="auto", show_default=True,
              help="auto: exact up to 100k items per scope, else the benchmark's ANN kind.")
@click.option("--nlist", type=int, default=IndexSpec.nlist, show_default=True,
              help="IVF lists (capped at 4*sqrt(n)).")
@click.option("--nprobe", type=int, default=IndexSpec.nprobe, show_default=True, help="IVF lists scanned a query.")
@click.option("--m", "hnsw_m", type=int, default=IndexSpec.hnsw_m, show_default=True, help="HNSW links per node.")
@click.option("--ef-search", type=int, default=IndexSpec.ef_search, show_default=True,
              help="HNSW search candidate list.")
@click.option("--pq-m", type=int, default=IndexSpec.pq_m, show_default=True,
              help="IVF-PQ bytes per vector (sub-quantizers).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Device the saved spec asks for when the index is loaded (flat and IVF kinds only).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
def build(checkpoint, kind, nlist, nprobe, hnsw_m, ef_search, pq_m, device, out):
    """Build the item index over a checkpoint's item vectors and save it with the model version."""
    from scenestream.index import ItemIndex, save_index
    from scenestream.model.checkpoint import CheckpointError, load_checkpoint
    from scenestream.model.infer import InterestEncoder
    try:
        spec = IndexSpec(kind=kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, pq_m=pq_m,
                         device=device)
        encoder = InterestEncoder(load_checkpoint(checkpoint, "cpu"))
    except (CheckpointError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    t0 = time.perf_counter()
    index = ItemIndex.build(*encoder.item_vectors(), spec=spec)
    seconds = time.perf_counter() - t0
    save_index(index, out, encoder.version)
    kinds = {("*" if s is None else s): k for s, k in index.kinds.items()}
    click.echo(json.dumps({"out": str(out), "model_version": encoder.version, "items": len(index),
                           "build_s": round(seconds, 3), "kinds": kinds}))


COMMANDS = (index_group,)
