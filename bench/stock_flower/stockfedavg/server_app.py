"""ServerApp: stock FedAvg, plus timestamps per phase written to ``timing-path``.

The only addition to Flower's template is measurement: a FedAvg subclass that notes the
time when each phase is configured and aggregated (behaviour unchanged), and an
``evaluate_fn`` that marks the end of each round (``Strategy.start`` calls it once before
round 1 and once after each round).
"""

import itertools
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stockfedavg.task import get_model

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg, unchanged, that records when each phase starts and when its replies are in."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events: list[tuple[str, int, float]] = []

    def _mark(self, what: str, server_round: int) -> None:
        self.events.append((what, server_round, time.monotonic()))

    def configure_train(self, server_round, arrays, config, grid):
        self._mark("configure_train", server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        self._mark("aggregate_train", server_round)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        self._mark("configure_evaluate", server_round)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        self._mark("aggregate_evaluate", server_round)
        return super().aggregate_evaluate(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    min_nodes = int(cfg["min-nodes"])
    timing_path = str(cfg["timing-path"])

    model = get_model(str(cfg["task"]))
    strategy = TimedFedAvg(
        min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes
    )
    round_ends: list[tuple[int, float]] = []

    def mark_round_end(server_round: int, arrays: ArrayRecord):
        round_ends.append((server_round, time.monotonic()))
        return None

    t0 = time.monotonic()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        evaluate_fn=mark_round_end,
    )
    t_end = time.monotonic()

    if timing_path:
        rounds = []
        for (_r0, a), (r1, b) in itertools.pairwise(round_ends):
            phases = {what: t - a for what, r, t in strategy.events if r == r1}
            rounds.append({"round": r1, "seconds": b - a, "phase_offsets_s": phases})
        out = {
            "num_rounds": num_rounds,
            "min_nodes": min_nodes,
            "strategy_seconds": t_end - t0,
            "rounds": rounds,
            "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
            "evaluate_metrics": {
                str(k): dict(v) for k, v in result.evaluate_metrics_clientapp.items()
            },
        }
        tmp = Path(timing_path + ".tmp")
        tmp.write_text(json.dumps(out, indent=2), encoding="utf-8")
        tmp.replace(timing_path)
