"""The per-rank load window and EPLB's metric hooks (one process, no group)."""

from __future__ import annotations

import torch

from engine.layers.ep_dispatch import expert_maps
from engine.layers.moe import FusedMoE
from eplb.load_stats import ExpertLoadWindow
from eplb.metrics import EplbStats


def _layers() -> list[FusedMoE]:
    """Two layers of 3 experts in 4 slots; slot 3 starts empty."""
    torch.manual_seed(0)
    layers = [FusedMoE(3, 8, 4, num_physical=4) for _ in range(2)]
    for moe in layers:
        moe.set_placement(*expert_maps(torch.tensor([0, 1, 2, -1]), 3))
    return layers


def _route(moe: FusedMoE, ids: list[list[int]]) -> None:
    ids_t = torch.tensor(ids)
    x = torch.randn(len(ids), 8)
    with torch.inference_mode():
        moe(x, torch.ones(ids_t.shape), ids_t)


def test_window_folds_counts_through_the_current_map_and_slides() -> None:
    a, b = _layers()
    win = ExpertLoadWindow([a, b], window_size=2)
    _route(a, [[0, 1], [0, 2]])
    win.record()
    assert int(a.expert_load.sum()) == 0, "record() hands the step's counts to the window"
    # Swap layer a's map: expert 0 now has two replicas (slots 0 and 3).
    a.set_placement(*expert_maps(torch.tensor([0, 1, 2, 0]), 3))
    win.rebind()
    _route(a, [[1, 0], [2, 0]])     # pairs 1 and 3 pick expert 0: replica (index % 2) = slot 3
    win.record()
    logical, physical = win.collect()
    assert logical.tolist() == [[4, 2, 2], [0, 0, 0]]
    assert physical.tolist() == [[2, 2, 2, 2], [0, 0, 0, 0]]
    _, physical = win.collect()
    assert int(physical.sum()) == 0, "physical counts restart at each collection"
    for _ in range(2):                    # two empty steps push both out of the window
        win.record()
    logical, _ = win.collect()
    assert int(logical.sum()) == 0


def test_stats_emit_what_cluster_metrics_records() -> None:
    seen = []
    stats = EplbStats()
    stats.subscribe(lambda kind, name, value, labels: seen.append((kind, name, value, labels)))
    stats.set_balancedness([0.5, 0.75])
    stats.add_bytes_moved(0)
    stats.add_bytes_moved(1024)
    stats.add_rebalance(0.25)
    assert seen == [("set", "tandem_eplb_balancedness", 0.5, {"layer": "0"}),
                    ("set", "tandem_eplb_balancedness", 0.75, {"layer": "1"}),
                    ("inc", "tandem_eplb_bytes_moved_total", 1024.0, {}),
                    ("observe", "tandem_eplb_rebalance_seconds", 0.25, {})]
    assert stats.bytes_moved_total == 1024 and stats.num_rebalances == 1


def test_stats_record_into_cluster_metrics() -> None:
    from prometheus_client import generate_latest

    from cluster.metrics import Metrics
    metrics = Metrics("tiny", "decode")
    stats = EplbStats()
    stats.forward_to(metrics)
    stats.set_balancedness([0.5, 0.9])
    stats.add_bytes_moved(4096)
    stats.add_rebalance(0.3)
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_eplb_balancedness{layer="1",model_name="tiny",pool="decode"} 0.9' in text
    assert 'tandem_eplb_bytes_moved_total{model_name="tiny",pool="decode"} 4096.0' in text
    assert 'tandem_eplb_rebalance_seconds_count{model_name="tiny",pool="decode"} 1.0' in text
