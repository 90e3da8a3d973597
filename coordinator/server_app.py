"""The appliance's Flower ServerApp (``coordinator.server_app:app``): one process per run.

The SuperLink starts this module in a ``flwr-serverapp`` process; it inherits
``FEDWARD_HOME`` and ``FEDWARD_DATABASE_URL_FILE`` from the coordinator. :func:`main`
reads the run's plan (:func:`load_plan`) and carries out what the Flower run is for: a
release candidate's export parity (:mod:`coordinator.parity_task`), an evaluation on demand
(:mod:`coordinator.evaluation_task`), or the training run itself, with the round loop
(:mod:`coordinator.round_loop`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from sqlalchemy.engine import Engine

from coordinator import repository, run_statistics
from coordinator.parity_task import parity_dir, run_parity
from coordinator.round_loop import RoundLoop
from fedward.flower.serverapp import shorten_object_pulls
from fedward.run_config import RunPlan

__all__ = ["app", "load_plan", "main"]


def _evaluation(grid: Grid, engine: Engine, home: Path, plan: RunPlan,
                context: Context) -> bool:
    """Carry out an evaluation on demand if this Flower run is one (it trains nothing)."""
    from coordinator.evaluation_task import EVALUATION_KEY, run_evaluation

    evaluation = int(str(context.run_config.get(EVALUATION_KEY, "0")))
    if evaluation:
        run_evaluation(grid=grid, engine=engine, home=home, plan=plan,
                       evaluation_id=evaluation, flwr_run_id=str(context.run_id))
    return bool(evaluation)


def load_plan(engine: Engine, run_id: int) -> RunPlan:
    """Read a run's plan from the database (with its preprocessing, once composed)."""
    plan = RunPlan.model_validate(repository.run_config(engine, run_id))
    return plan.model_copy(update={
        "preprocessing": run_statistics.preprocessing_json(engine, plan)})


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink calls for every run of the appliance's app."""
    from coordinator.db import make_engine
    from coordinator.study_registry import plan_task
    from fedward.models import model_arrays
    from fedward.tasks import build_model

    logging.basicConfig(level=logging.INFO, force=True,   # Opacus configures it on import
                        format="%(asctime)s %(name)s %(message)s")
    # httpx logs every request at INFO, the 0.1 s reply pulls included; Flower uploads each
    # line to the SuperLink's database: noise that costs round time (benchmark 1).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A reply pulled while its objects are still being uploaded waits 1 s in Flower before
    # the first retry; a short, bounded back-off instead.
    shorten_object_pulls()
    run_id = int(str(context.run_config["fedward-run-id"]))
    home = Path(os.environ["FEDWARD_HOME"])
    # The URL may hold a password: it comes in a 0600 file, never in the environment.
    engine = make_engine(Path(os.environ["FEDWARD_DATABASE_URL_FILE"]).read_text().strip())
    plan = load_plan(engine, run_id)
    candidate = int(str(context.run_config.get("fedward-parity-candidate", "0")))
    if candidate:
        # Not a training run: the sites measure a release candidate's export parity.
        run_parity(grid=grid, engine=engine, plan=plan, request_dir=parity_dir(home, candidate))
        return
    if _evaluation(grid, engine, home, plan, context):
        return
    repository.mark_run_started(engine, run_id, str(context.run_id))

    def initial() -> dict[str, np.ndarray]:
        # A run of a study: the model its registered spec (pinned by hash) describes.
        return model_arrays(build_model(plan_task(engine, plan), seed=plan.seed))

    RoundLoop(grid=grid, engine=engine, home=home, plan=plan, initial=initial).run()
