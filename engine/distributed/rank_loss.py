"""A rank process died: the survivors drop their requests, regroup with the expert
slots they hold, and every unfinished request restarts from its prompt plus the tokens
it already produced. If some expert had all its replicas on the lost ranks, the engine
says so (RankLostError) and refuses further work."""

from __future__ import annotations

from engine.distributed.protocol import Shutdown
from engine.distributed.rank_group import EPEngineError
from engine.layers.expert_map import ExpertMap


class RankLostError(EPEngineError):
    """A rank died and the survivors cannot serve without it."""


def recover(engine, lost: list[str]) -> None:
    """Regroup `engine` (an EPEngine) without the `lost` ranks, or fail it."""
    engine.events.append(f"lost {lost} at step {engine.step_index}")
    survivors, held = engine.group.drop_lost(lost)
    expert_map = ExpertMap.concat(held, engine.num_experts) if held else engine.expert_map.resized(0)
    missing = [f"MoE layer {layer}: experts {gone}" for layer, gone in expert_map.missing().items()]
    if missing or not survivors:
        engine.failed = RankLostError(
            f"rank(s) {lost} died and held the only copies of " + "; ".join(missing or ["everything"]) +
            ". The survivors cannot serve these experts: restart the engine (or give the placement "
            "redundant replicas on different ranks so it survives a lost rank).")
        engine.events.append(str(engine.failed))
        for r in survivors:
            engine.group.send(r.name, Shutdown())
        raise engine.failed
    engine.accepting = {n for n in engine.accepting if n not in lost} or {r.name for r in survivors}
    engine.regroup(survivors, expert_map)
    engine.num_recoveries += 1
    for p in engine.plugins:
        p.on_group_changed()
    for t in engine.tracker.unfinished():
        engine.tracker.restart(t, engine._accepting_ranks())
    engine.events.append(f"recovered on {[r.name for r in survivors]}; unfinished requests restarted")
