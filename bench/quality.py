"""Recommendation quality on MovieLens: this model against MostPop and published SASRec/BERT4Rec/gSASRec figures,
live versus stale (prequential), and cross-scene transfer. Prints the tables; ML-1M's headline figures also go to
bench/results.json and the headline tables of BENCHMARKS.md and README.md (unless --no-write).

    python bench/quality.py [--datasets ml-100k ml-1m ml-1m-5core] [--seeds 0 1 2] [--genre-seeds 0 1 2] [--no-prequential]

Every model is trained with the `scenestream train` command a user runs (its per-data-set defaults), one process per
run so each training time is a clean wall-clock figure. Checkpoints go to --workdir and are reused when present (a
rerun only evaluates), so the section can be rebuilt without retraining. Evaluation is the protocol of
`scenestream evaluate` (docs/design.md, "Metrics"): leave-one-out by time, full ranking, the user's history masked.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scenestream.model.checkpoint import load_checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.stream.offline.leave_one_out import evaluate_loo, loo_cases, most_popular_loo, sparse_scene_cases, timelines
from scenestream.stream.datasets.movielens import load_movielens

ROOT = Path(__file__).resolve().parents[1]


# Published ML-1M full-ranking figures (all items ranked). See the notes under the table for each protocol.
PUBLISHED = [
    # (model, ndcg@10, recall@10, source)
    ("SASRec+ (full-softmax CE, max length 200)", "0.1821", "0.3152", "Klenitskiy & Vasilev, RecSys 2023 [1]"),
    ("BERT4Rec", "0.1537", "0.2843", "Klenitskiy & Vasilev, RecSys 2023 [1]"),
    ("BERT4Rec", "0.1516", "0.2821", "Petrov & Macdonald, RecSys 2022, unsampled [2]"),
    ("gSASRec (gBCE)", "0.1726", "0.3003", "Petrov & Macdonald, RecSys 2023, PyTorch port [3]"),
    ("SASRec (BCE, one negative)", "0.1341", "0.2500", "Klenitskiy & Vasilev, RecSys 2023 [1]"),
]
SOURCES = """\
[1] A. Klenitskiy, A. Vasilev. Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec? RecSys 2023
    (arXiv 2309.07602); ML-1M table of github.com/antklen/sasrec-bert4rec-recsys23 (README). All items ranked,
    seen items filtered, leave-one-out (last item test, second last validation), max length 200, d=64, 2 blocks.
[2] A. Petrov, C. Macdonald. A Systematic Review and Replicability Study of BERT4Rec. RecSys 2022 (arXiv 2207.07483);
    "Unsampled" column of github.com/asash/bert4rec_repro (README).
[3] A. Petrov, C. Macdonald. gSASRec: Reducing Overconfidence in Sequential Recommendation Trained with Negative
    Sampling. RecSys 2023 (arXiv 2308.07192); pre-trained ML-1M checkpoint of github.com/asash/gSASRec-pytorch
    (README): full ranking, rated items filtered, sequence length 200, d=128.
How their protocol differs from ours: all three use the 5-core-filtered ML-1M of the SASRec/BERT4Rec repositories
(6,040 users, 3,416 items, 999,611 ratings) ordered as in that file; we use every rating of the raw ML-1M (3,706
items, 1,000,209 ratings) ordered by timestamp, file order breaking ties, so our catalog has 290 more (rare) items to
rank. They read up to 200 past items; our encoder reads the last layers*span+2 events (98 with the MovieLens
presets). Their figures are single runs; ours are means over seeds."""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scenestream.stream.cli", *args]


def train(dataset: str, scenes: str, seed: int, out: Path, cutoff: float | None = None,
          epochs: int | None = None, batch_users: int | None = None) -> dict:
    """Train with the user-facing command unless `out` already holds a checkpoint; return the training summary."""
    if not (out / "config.json").exists():
        cmd = cli("train", "--dataset", dataset, "--scenes", scenes, "--seed", str(seed), "--out", str(out),
                  "--device", "cpu", "--json", *(["--cutoff", str(cutoff)] if cutoff else []),
                  *(["--epochs", str(epochs)] if epochs else []),
                  *(["--batch-users", str(batch_users)] if batch_users else []))
        print("$", " ".join(cmd[3:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    meta = load_checkpoint(out).meta
    return {"seconds": meta["seconds"], "epochs": len(meta["epochs"]), "best_val_ndcg@10": meta["best_val_ndcg@10"]}


def evaluate(ckpt_dir: Path, cases, genre: bool) -> dict:
    enc = InterestEncoder(load_checkpoint(ckpt_dir), "cpu")
    out = {"global": evaluate_loo(enc, cases)}
    if genre:
        with_own = sparse_scene_cases(cases, at_least=1, at_most=10 ** 9)
        out["fused_in_scene"] = evaluate_loo(enc, with_own, target="fused")
        out["scene_only_in_scene"] = evaluate_loo(enc, with_own, target="scene")
        sparse = sparse_scene_cases(cases, at_least=1, at_most=2)
        out["sparse_fused"] = evaluate_loo(enc, sparse, target="fused")
        out["sparse_scene_only"] = evaluate_loo(enc, sparse, target="scene")
        new = sparse_scene_cases(cases, at_least=0, at_most=0)
        out["new_scene_fused"] = evaluate_loo(enc, new, target="fused")
        out["new_scene_popular"] = most_popular_loo(new, within_scene=True) | {"users": len(new)}
    return out


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def prequential(dataset: str, workdir: Path, cutoff: float, epochs: int | None) -> dict:
    ckpt = workdir / f"{dataset}-single-cut{cutoff}"
    trained = train(dataset, "single", 0, ckpt, cutoff=cutoff, epochs=epochs)
    cmd = cli("replay", "--dataset", dataset, "--scenes", "single", "--checkpoint", str(ckpt),
              "--eval-cutoff", str(cutoff), "--device", "cpu", "--json")
    print("$", " ".join(cmd[3:]), file=sys.stderr, flush=True)
    t0 = time.time()
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    return {"cutoff": cutoff, "train": trained, "replay_seconds": round(time.time() - t0, 1), **summary["prequential"],
            "events_per_s": summary["events_per_s"]}


def run(args) -> dict:
    results: dict = {}
    for dataset in args.datasets:
        res = results[dataset] = {}
        for scenes, seeds in (("single", args.seeds), ("genre", args.genre_seeds)):
            if not seeds:
                continue
            cases = loo_cases(timelines(load_movielens(dataset, scenes=scenes)), holdout=1)
            if scenes == "single":
                res["mostpop"] = most_popular_loo(cases)
            for seed in seeds:
                ckpt = args.workdir / f"{dataset}-{scenes}-s{seed}"
                epochs = args.genre_epochs if scenes == "genre" else args.epochs
                res.setdefault(scenes, []).append({"seed": seed, "train": train(dataset, scenes, seed, ckpt, epochs=epochs,
                                                                                 batch_users=args.batch_users),
                                                   **evaluate(ckpt, cases, scenes == "genre")})
                print(json.dumps({dataset: {scenes: res[scenes][-1]}}), file=sys.stderr, flush=True)
        if args.prequential and dataset == "ml-1m":
            res["prequential"] = prequential(dataset, args.workdir, args.cutoff, args.prequential_epochs)
    return results


def table(results: dict, command: str) -> str:
    lines = ["## Recommendation quality (MovieLens)", "", f"Command: `{command}`", "",
             "Leave-one-out by time (each user's last rating is the test item, the second last validates), every "
             "item ranked, the user's other rated items masked; mean ± standard deviation over seeds. Ties in "
             "timestamps keep the file's line order. Training time is wall-clock on this 2-core CPU.", ""]
    for dataset, res in results.items():
        lines += [f"### {dataset}", "", "| model | seeds | NDCG@10 | Recall@10 | NDCG@20 | Recall@20 | train time |",
                  "|---|---|---|---|---|---|---|"]
        if "mostpop" in res:
            m = res["mostpop"]
            lines.append(f"| MostPop | - | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {m['ndcg@20']:.4f} | "
                         f"{m['recall@20']:.4f} | - |")
        for scenes, label in (("single", "SceneStream, one scene"),
                              ("genre", "SceneStream, genre scenes, global fused vector")):
            runs = res.get(scenes)
            if not runs:
                continue
            cols = [spread([r["global"][m] for r in runs]) for m in ("ndcg@10", "recall@10", "ndcg@20", "recall@20")]
            secs = [r["train"]["seconds"] / 60 for r in runs]
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cols) +
                         f" | {statistics.mean(secs):.1f} min (max {max(secs):.1f}), {runs[0]['train']['epochs']} "
                         f"epochs |")
        if dataset == "ml-1m":
            for model, ndcg, recall, source in PUBLISHED:
                lines.append(f"| {model}, published | 1 | {ndcg} | {recall} | - | - | {source} |")
            lines += ["", "```", SOURCES, "```"]
        lines.append("")
        runs = res.get("genre")
        if runs:
            n = lambda key: spread([r[key]["ndcg@10"] for r in runs])  # noqa: E731
            u = lambda key: runs[0][key]["users"]  # noqa: E731
            lines += ["Genre scenes, ranking within the test item's scene (fusion on: H_j; fusion off: the scene-only "
                      "h_j of the same model):", "",
                      "| test events | users | fusion on, NDCG@10 | fusion off, NDCG@10 |", "|---|---|---|---|",
                      f"| user has history in the test scene | {u('fused_in_scene')} | {n('fused_in_scene')} | "
                      f"{n('scene_only_in_scene')} |",
                      f"| 1-2 earlier events in the test scene (transfer) | {u('sparse_fused')} | "
                      f"{n('sparse_fused')} | {n('sparse_scene_only')} |",
                      f"| no earlier event in the test scene | {u('new_scene_fused')} | {n('new_scene_fused')} | "
                      f"(MostPop in scene) {n('new_scene_popular')} |", ""]
            mean = lambda key: statistics.mean(r[key]["ndcg@10"] for r in runs)  # noqa: E731
            lines += [f"Transfer, pooled over the {len(runs)} seed(s): {u('sparse_fused') * len(runs)} evaluations "
                      f"({u('sparse_fused')} test events x {len(runs)} models) of test events whose scene the user "
                      f"has 1-2 earlier events in: fused H_j / scene-only h_j = "
                      f"{mean('sparse_fused') / mean('sparse_scene_only'):.2f}x.", ""]
        p = res.get("prequential")
        if p:
            k = "recall@10"
            lines += [f"Prequential (model trained on events before the {p['cutoff']:.0%} time cutoff, the rest "
                      f"replayed in time order through the worker's code path, each micro-batch (< 0.2 s of "
                      f"event time, as the worker's --batch-wait) scored before it is applied; "
                      f"{p['live']['evaluated']} events):", "",
                      "| live | stale (frozen at the cutoff) | popular | live / stale |", "|---|---|---|---|",
                      f"| {p['live'][k]:.4f} | {p['stale'][k]:.4f} | {p['popular'][k]:.4f} | "
                      f"{p['live'][k] / p['stale'][k]:.2f}x |", "",
                      f"Training {p['train']['seconds'] / 60:.1f} min; replay {p['replay_seconds']:.0f} s "
                      f"({p['events_per_s']:.0f} events/s).", ""]
    return "\n".join(lines)


def record(results: dict, command: str, root: Path = ROOT) -> int:
    """ML-1M's headline figures into bench/results.json, and the pages' headline tables rendered again
    (bench/results_page.py); returns how many figures were updated."""
    import results_page
    res = results.get("ml-1m", {})
    source = root / results_page.RESULTS.relative_to(results_page.ROOT)
    page = results_page.load(source)
    by_key = {f["key"]: f for f in page["figures"]}
    today, updated = time.strftime("%Y-%m-%d"), 0
    for scenes, key in (("single", "quality-single"), ("genre", "quality-genre")):
        runs = res.get(scenes)
        if runs:
            ndcg, recall = ([r["global"][m] for r in runs] for m in ("ndcg@10", "recall@10"))
            by_key[key].update(value=f"{spread(ndcg)} / {spread(recall)}", date=today, command=command,
                               figure=re.sub(r"\d+ seeds?$", f"{len(runs)} seed{'s' * (len(runs) > 1)}",
                                             by_key[key]["figure"]))
            if "readme_value" in by_key[key]:
                by_key[key]["readme_value"] = f"{statistics.mean(ndcg):.4f}"
            updated += 1
    runs = res.get("genre")
    if runs:
        fused, alone = (statistics.mean(r[k]["ndcg@10"] for r in runs) for k in ("sparse_fused", "sparse_scene_only"))
        by_key["transfer"].update(value=f"{fused:.4f} / {alone:.4f} = {fused / alone:.2f}x", date=today,
                                  command=command)
        updated += 1
    source.write_text(json.dumps(page, indent=1, ensure_ascii=False) + "\n")
    results_page.write(page, root)
    return updated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"], choices=["ml-100k", "ml-1m", "ml-1m-5core"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="Seeds of the one-scene model.")
    ap.add_argument("--genre-seeds", nargs="*", type=int, default=[0, 1, 2], help="Seeds of the genre-scene model.")
    ap.add_argument("--no-prequential", dest="prequential", action="store_false",
                    help="Skip the ML-1M prequential run (one more training run plus a full replay).")
    ap.add_argument("--cutoff", type=float, default=0.8, help="Prequential time cutoff.")
    ap.add_argument("--epochs", type=int, default=None, help="Epochs of the one-scene models (default: the data "
                    "set's training default).")
    ap.add_argument("--genre-epochs", type=int, default=None, help="Epochs of the genre-scene models (default: the "
                    "data set's training default).")
    ap.add_argument("--batch-users", type=int, default=None, help="User segments per training step of the one-scene "
                                                                   "and genre models (default: the data set's preset).")
    ap.add_argument("--prequential-epochs", type=int, default=None, help="Epochs of the prequential model.")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "quality",
                    help="Checkpoints (reused when present) and results.json.")
    ap.add_argument("--no-write", dest="write", action="store_false",
                    help="Print the table only; by default ML-1M's figures also go to bench/results.json and the "
                         "headline tables of BENCHMARKS.md and README.md.")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    section = table(results, "python bench/quality.py " + " ".join(sys.argv[1:]))
    print(section)
    if args.write:
        print(f"{record(results, 'python bench/quality.py ' + ' '.join(sys.argv[1:]))} headline figures updated")


if __name__ == "__main__":
    main()
