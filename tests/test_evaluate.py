"""`evaluate` agrees with an independent numpy evaluator run on `export`'s files alone."""
import json
import subprocess
import sys

import numpy as np

from scenestream.stream.offline.logs import synthetic_lines, write_jsonl
from scenestream.stream.datasets.synthetic import SyntheticSpec


def cli(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "scenestream.stream.cli", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def numpy_evaluator(folder) -> dict[str, float]:
    """Written from docs/design.md's metric definitions only: full ranking over all exported items, the user's other
    history items masked, one held-out item per user; an item missing from the catalog is a miss."""
    items = folder.joinpath("item_ids.txt").read_text().split("\n")[:-1]
    I = np.load(folder / "item_vectors.npy").astype(np.float64)
    U = np.load(folder / "user_vectors.npy").astype(np.float64)
    tests = folder.joinpath("test_items.txt").read_text().split("\n")[:-1]
    histories = [line.split() for line in folder.joinpath("history_items.txt").read_text().split("\n")[:-1]]
    pos = {item: n for n, item in enumerate(items)}
    recall, ndcg = {10: [], 20: []}, {10: [], 20: []}
    for u, target, history in zip(U, tests, histories):
        if target not in pos:
            rank = np.inf
        else:
            scores = I @ u
            masked = [pos[h] for h in history if h in pos and h != target]
            scores[masked] = -np.inf
            rank = float((scores > scores[pos[target]]).sum())
        for k in (10, 20):
            recall[k].append(float(rank < k))
            ndcg[k].append(1.0 / np.log2(rank + 2.0) if rank < k else 0.0)
    return {"users": len(tests), **{f"{m}@{k}": float(np.mean(v[k])) for k in (10, 20)
                                    for m, v in (("recall", recall), ("ndcg", ndcg))}}


def test_evaluate_matches_a_numpy_evaluator_on_the_export(tmp_path):
    log = tmp_path / "log.jsonl"
    write_jsonl(log, synthetic_lines(SyntheticSpec(users=300, seed=21)))
    cli("train", "--input", str(log), "--epochs", "1", "--out", str(tmp_path / "ckpt"))
    metrics = json.loads(cli("evaluate", "--input", str(log), "--checkpoint", str(tmp_path / "ckpt"),
                             "--json").strip().splitlines()[-1])
    cli("export", "--input", str(log), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export"))
    mine = numpy_evaluator(tmp_path / "export")
    assert metrics["users"] == mine["users"] > 250
    assert 0 < metrics["ndcg@10"] < 1
    for key in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert abs(metrics[key] - mine[key]) <= 1e-6, (key, metrics[key], mine[key])
