"""The study demo's evaluation (``python -m site_agent.study_demo_eval``): was federating
worth it for each of the four hospitals?

Run by ``make demo-study`` (:mod:`coordinator.study_demo`) after the federated run, with
a JSON job file naming the study, each site's file and mapping, the run's final global
model (a coordinator checkpoint), its reference statistics and its settings. For each site
it rebuilds the site's own train / held-out split (:func:`site_agent.mapping_apply.
load_study_data`, the same deterministic function the site agent uses) and measures, on the
held-out split:

- the **federated** model (the run's preprocessing composed from its reference statistics,
  exactly as the coordinator composes it);
- the site's **local-only** DP-SGD model at the run's budget, statistics included
  (:func:`site_agent.baselines.train_local_only`);
- the **pooled** non-private model trained on every site's training rows
  (:func:`site_agent.baselines.train_pooled`).

The data set is public, so one process reads all four files; at a real deployment a
site's local-only model would be trained at the site, and no pooled model could exist.
It also encodes one raw row of the first site's file (its own column names and codes)
with that site's mapping: the record the demo's inference service is asked about.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedward.preprocessing import compose
from fedward.study import BooleanFeature, CategoricalFeature, OrdinalFeature, load_spec
from fedward.tasks import study_task
from site_agent.baselines import held_out_metrics, train_local_only, train_pooled
from site_agent.connectors import open_connector
from site_agent.mapping import Binding, load_mapping
from site_agent.mapping_apply import MappedData, check_mapping, encode, load_study_data

__all__ = ["evaluate", "main"]


def _figures(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in metrics.items()}


def _served_record(binding: Binding, path: Path, root: Path) -> dict[str, Any]:
    """The first row of a site's file as it is there, and the model's input for it."""
    with path.open(newline="", encoding="utf-8") as fh:
        raw = next(csv.DictReader(fh))
    mapped = check_mapping(binding, open_connector({"connector": "csv", "path": str(path)},
                                                   root=root))
    x, _y, dropped = encode(binding.study, mapped)
    if dropped:
        raise RuntimeError(f"{path}: rows dropped by the study's rules; the demo's served "
                           "record must be the file's first row")
    return {"raw": raw, "named": _named(binding, mapped),
            "encoded": [None if math.isnan(float(v)) else float(v) for v in x[0]]}


def _named(binding: Binding, mapped: MappedData) -> dict[str, Any]:
    """The first row in the study's own terms, as a clinician would give it by field name:
    a number in the study's unit, a level's text, true or false; a missing value left
    out."""
    named: dict[str, Any] = {}
    for f in binding.study.features:
        v = float(mapped.values[f.name][0])
        if math.isnan(v):
            continue
        named[f.name] = (f.levels[int(v)] if isinstance(f, CategoricalFeature | OrdinalFeature)
                         else bool(v) if isinstance(f, BooleanFeature) else v)
    return named


def evaluate(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the federated, local-only and pooled models for every site of ``job``.

    Args:
        job: ``study`` (spec path), ``sites`` ([{``name``, ``data``, ``mapping``}]),
            ``checkpoint`` (safetensors of the final global model), ``reference`` (the
            run's reference statistics), ``settings`` (the run's ``epsilon``, ``delta``,
            ``rounds``, ``local_epochs``, ``lr``, ``batch_size``, ``max_grad_norm``,
            ``statistics_epsilon``, ``seed``), ``work`` (a scratch folder).

    Returns:
        ``sites`` (per site: ``n_train``, ``n_test``, ``federated``, ``local_only`` with
        its ``epsilon_spent``, ``pooled``), ``pooled`` (its settings), ``served_record``.
    """
    from safetensors.numpy import load_file

    from fedward.models import set_model_arrays

    spec = load_spec(Path(job["study"]))
    task = study_task(spec, compose(spec, json.loads(Path(job["reference"]).read_text())))
    s = job["settings"]
    lr = float(s["lr"] if s.get("lr") is not None else task.default_lr)
    batch = int(s["batch_size"] if s.get("batch_size") is not None
                else task.default_batch_size)
    root = Path(job["work"])
    federated = task.build(seed=0)
    set_model_arrays(federated, dict(load_file(str(job["checkpoint"]))))

    data: dict[str, Any] = {}
    bindings: dict[str, Binding] = {}
    for site in job["sites"]:
        binding = Binding(study=spec, mapping=load_mapping(Path(site["mapping"])))
        bindings[site["name"]] = binding
        data[site["name"]] = load_study_data(binding, open_connector(
            {"connector": "csv", "path": str(site["data"])}, root=root))
    sites: dict[str, dict[str, Any]] = {}
    for name, d in data.items():
        local = train_local_only(
            task=task, train_x=d.train_x, train_y=d.train_y, epsilon=float(s["epsilon"]),
            delta=float(s["delta"]), rounds=int(s["rounds"]),
            local_epochs=int(s["local_epochs"]), batch_size=batch, lr=lr,
            max_grad_norm=float(s["max_grad_norm"]),
            statistics_epsilon=(None if s.get("statistics_epsilon") is None
                                else float(s["statistics_epsilon"])),
            seed=int(s.get("seed", 0)))
        sites[name] = {
            "n_train": len(d.train_y), "n_test": len(d.test_y),
            "federated": _figures(held_out_metrics(federated, d.test_x, d.test_y)),
            "local_only": {**_figures(held_out_metrics(local.model, d.test_x, d.test_y)),
                           "epsilon_spent": local.epsilon_spent,
                           "noise_multiplier": local.noise_multiplier}}
    epochs = int(s["rounds"]) * int(s["local_epochs"])
    pooled = train_pooled(task=task,
                          train_x=np.concatenate([d.train_x for d in data.values()]),
                          train_y=np.concatenate([d.train_y for d in data.values()]),
                          epochs=epochs, batch_size=batch, lr=lr, seed=int(s.get("seed", 0)))
    for name, d in data.items():
        sites[name]["pooled"] = _figures(held_out_metrics(pooled, d.test_x, d.test_y))
    first = job["sites"][0]
    record = _served_record(bindings[first["name"]], Path(first["data"]), root)
    return {"sites": sites, "served_record": {"site": first["name"], **record},
            "pooled": {"epochs": epochs, "lr": lr, "batch_size": batch, "private": False}}


def main(argv: list[str] | None = None) -> None:
    """``python -m site_agent.study_demo_eval JOB.json OUT.json`` (see :func:`evaluate`)."""
    parser = argparse.ArgumentParser(prog="python -m site_agent.study_demo_eval",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    result = evaluate(json.loads(args.job.read_text()))
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
