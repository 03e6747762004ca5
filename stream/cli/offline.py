"""Offline commands: generate, train, evaluate, export, replay."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from scenestream.model.config import ModelConfig, TrainConfig, presets_help

from ..core.config import StreamConfig
from .common import device_option, encoder_cache_option, torch_threads_option, load, model_and_events, source_options

log = logging.getLogger("scenestream")


@click.command()
@click.option("--users", default=2000, help="Number of synthetic users.")
@click.option("--seed", default=0, help="Random seed: the same seed writes the same log.")
@click.option("--items-per-scene", default=300, help="Catalog size per scene.")
@click.option("--clean", is_flag=True, help="Write no malformed lines (by default ~3% are, on purpose).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL path.")
def generate(users, seed, items_per_scene, clean, out):
    """Write a seeded synthetic multi-scene clickstream (JSONL, the event schema of docs/design.md)."""
    from ..offline.logs import synthetic_lines, write_jsonl
    from ..datasets.synthetic import SyntheticSpec
    lines = synthetic_lines(SyntheticSpec(users=users, seed=seed, items_per_scene=items_per_scene), clean=clean)
    write_jsonl(out, lines)
    click.echo(f"wrote {len(lines)} lines to {out}", err=True)


@click.command(help=f"""Train the interest model (next-item prediction, full-softmax CE, time-ordered leave-one-out
validation).

\b
Defaults per data set (any flag overrides them):
{presets_help()}""")
@source_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--epochs", type=int, default=None, help="Planned epochs: the learning rate decays to 0 over them; "
              "early stopping on validation NDCG@10 may end sooner. [default: per data set, see below]")
@click.option("--cutoff", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Train only on the first fraction F of events by time (recorded in the checkpoint).")
@device_option
@click.option("--window", type=int, default=None, envvar="SCENESTREAM_WINDOW",
              help="Events kept per (user, scene): L. [default: layers*span+2]")
@click.option("--dim", default=ModelConfig.d_model, help="Model width d.")
@click.option("--layers", default=ModelConfig.n_layers, help="Attention layers of the merged timeline's stack (and of every window's, "
                                          "with --scene-layers 0).")
@click.option("--scene-layers", type=click.IntRange(min=0), default=None, help="Attention layers of a stack of their own for the "
              "per-scene windows (0: they share the timeline's blocks; ignored with one scene). [default: per data "
              "set]")
@click.option("--span", type=int, default=None, help="Attention look-back per layer (window >= layers*span+2 keeps "
                                                     "encoding independent of where the window starts). [default: "
                                                     "per data set]")
@click.option("--batch-users", type=int, default=None, help="User segments per training step. [default: per data "
                                                            "set]")
@click.option("--segment", type=int, default=None, help="Targets per user segment. [default: per data set]")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate. [default: per data set]")
@click.option("--patience", default=TrainConfig.patience, help="Epochs without improvement before stopping.")
@click.option("--seed", default=TrainConfig.seed, help="Training seed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
def train(dataset, input_path, scenes_mode, out, epochs, cutoff, device, window, dim, layers, scene_layers, span,
          batch_users, segment, lr, patience, seed, as_json):
    from scenestream.model.checkpoint import save_checkpoint
    from scenestream.model.infer import resolve_device
    from scenestream.model.config import preset, receptive_field

    from ..offline.leave_one_out import fit
    from ..offline.logs import time_cutoff
    given = {"epochs": epochs, "batch_users": batch_users, "segment": segment, "lr": lr, "span": span,
             "scene_layers": scene_layers}
    chosen = {**preset(dataset), **{k: v for k, v in given.items() if v is not None}}
    span, scene_layers = chosen.pop("span"), chosen.pop("scene_layers")
    window = window or receptive_field(max(layers, scene_layers), span)
    try:
        config = StreamConfig.from_env(window=window)
    except ValueError as exc:
        raise click.UsageError(f"event vocabulary: {exc}") from exc
    loaded = load(dataset, input_path, scenes_mode, config)
    events = loaded.events
    cutoff_ts = None
    if cutoff is not None:
        cutoff_ts = time_cutoff(events, cutoff)
        events = [e for e in events if e.ts < cutoff_ts]
        log.info("cutoff %.2f: training on %d of %d events (ts < %d)", cutoff, len(events), len(loaded.events),
                 cutoff_ts)
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    ckpt, history = fit(events, loaded.scenes, loaded.actions, window,
                        model_cfg={"d_model": dim, "n_layers": layers, "span": span, "scene_layers": scene_layers},
                        cfg=TrainConfig(patience=patience, seed=seed, **chosen), device=str(dev), progress=True)
    meta = {"dataset": dataset or str(input_path), "scenes_mode": scenes_mode, "cutoff": cutoff,
            "cutoff_ts": cutoff_ts if cutoff_ts is not None else max(e.ts for e in loaded.events) + 1,
            "device": str(dev), **history}
    version = save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, window, meta)
    summary = {"checkpoint": str(out), "model_version": version, "seconds": history["seconds"],
               "epochs": len(history["epochs"]), "best_val_ndcg@10": round(history["best_val_ndcg@10"], 4),
               "train_events": history["train_events"], "users": history["users"], "items": history["items"]}
    click.echo(json.dumps(summary) if as_json else
               f"saved {out} (model {version}): best validation NDCG@10 {summary['best_val_ndcg@10']} "
               f"after {summary['epochs']} epochs, {summary['seconds']} s")


def _test_cases(checkpoint, device, dataset, input_path, scenes_mode):
    from ..offline.leave_one_out import loo_cases, timelines
    encoder, loaded = model_and_events(checkpoint, device, dataset, input_path, scenes_mode)
    return encoder, loo_cases(timelines(loaded.events), holdout=1)


@click.command()
@source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@device_option
@click.option("--vector", type=click.Choice(["global", "fused", "scene"]), default="global",
              help="global: the global fused vector ranks all items. fused: H_j of the test event's scene j ranks "
                   "scene j's items. scene: the scene-only h_j (fusion off) ranks scene j's items.")
@click.option("--scene-history", type=(int, int), default=None, metavar="MIN MAX",
              help="Only test events whose scene the user has MIN..MAX earlier events in (e.g. 1 2: sparse scenes, "
                   "where interest transfer matters).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object on the last line.")
def evaluate(dataset, input_path, scenes_mode, checkpoint, device, vector, scene_history, as_json):
    """Full-ranking leave-one-out test metrics: each user's last event (ties in time ordered by event_id, which for
    MovieLens is the file's line order) ranked among all items by the global fused vector built from everything
    before it, the user's other history items masked."""
    from ..offline.leave_one_out import evaluate_loo, sparse_scene_cases
    encoder, cases = _test_cases(checkpoint, device, dataset, input_path, scenes_mode)
    if scene_history is not None:
        cases = sparse_scene_cases(cases, at_least=scene_history[0], at_most=scene_history[1])
    if vector == "scene" and any(not any(e.scene == c.target.scene for e in c.history) for c in cases):
        raise click.UsageError("--vector scene needs history in the test event's scene: add --scene-history 1 N")
    metrics = evaluate_loo(encoder, cases, target=vector)
    click.echo(json.dumps(metrics) if as_json else
               "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


@click.command()
@source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@device_option
def export(dataset, input_path, scenes_mode, checkpoint, out, device):
    """Export item and user vectors with the held-out test items, so anyone can recompute `evaluate` with numpy:
    item_ids.txt, item_vectors.npy, user_ids.txt, user_vectors.npy, test_items.txt, history_items.txt."""
    from ..offline.leave_one_out import export_loo
    encoder, cases = _test_cases(checkpoint, device, dataset, input_path, scenes_mode)
    click.echo(json.dumps({"out": str(out), **export_loo(encoder, cases, out)}))


@click.command()
@source_options
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint folder from `train`.")
@click.option("--eval-cutoff", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.8,
              help="Prequential evaluation starts after this fraction of events by time.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write the final per-user records to OUT/users.jsonl (the worker's output schema).")
@click.option("--batch-size", default=1000, help="Most events in one micro-batch (the worker's --batch-max is the "
              "same kind of cap).")
@click.option("--batch-wait", default=0.2, type=click.FloatRange(min=0), help="After the cutoff, a micro-batch "
              "spans less than this many seconds of event time, as the worker's --batch-wait at the log's own "
              "pace; 0 = cut by --batch-size only (fastest; fresh state then lags a batch behind).")
@click.option("--k", default=10, help="K of the prequential Recall@K.")
@device_option
@encoder_cache_option
@torch_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on the last line.")
def replay(dataset, input_path, scenes_mode, checkpoint, eval_cutoff, out, batch_size, batch_wait, k, device,
           encoder_cache_mb, as_json):
    """Replay an event log through the live worker's code path; report prequential Recall@K for live, stale
    and most-popular recommendations."""
    from scenestream.index import ItemIndex

    from ..core.output import record_json
    from ..offline.replay import replay as run_replay
    encoder, loaded = model_and_events(checkpoint, device, dataset, input_path, scenes_mode, encoder_cache_mb)
    index = ItemIndex.build(*encoder.item_vectors())
    result = run_replay(loaded, encoder, index, batch_size=batch_size, eval_cutoff=eval_cutoff, k=k,
                        checkpoint_cutoff_ts=encoder.ckpt.meta.get("cutoff_ts"), batch_wait_ms=round(batch_wait * 1000))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "users.jsonl", "wb") as f:
            for user in sorted(result.records):
                f.write(record_json(result.records[user]) + b"\n")
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        p = summary["prequential"]
        click.echo(f"events {summary['events']}  invalid {summary['invalid']}  late-dropped "
                   f"{summary['late_dropped']}  users {summary['users']}  {summary['events_per_s']} events/s")
        for m in ("live", "stale", "popular"):
            click.echo(f"prequential recall@{k} {m:8s} {p[m][f'recall@{k}']:.4f}  ({p[m]['evaluated']} events)")


COMMANDS = (generate, train, evaluate, export, replay)
