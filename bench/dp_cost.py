"""Benchmark 3: the cost of DP-SGD per local epoch, for each Opacus grad-sample mode.

Tasks: the appliance's breast-cancer MLP (Breast Cancer Wisconsin, 569 rows) and digits CNN
(scikit-learn digits, 1797 rows), all rows, the task's default batch size and learning rate,
plain SGD (what the site agent trains with), 1 torch thread (the site agent's default
``torch_threads``; ``--threads`` changes it), Poisson sampling, clip 1.0, noise multiplier
1.0, the PRV accountant; data from scikit-learn, nothing downloaded.

Modes: ``hooks``, ``ew`` (expanded weights), ``functorch`` and ``ghost`` (fast gradient
clipping, whose ``make_private`` returns a wrapped criterion). Three figures per mode:

* **epoch**: one local epoch of the DP training loop after ``make_private`` (the loop of
  ``privacy.training.train_dp``, mode by mode), against one epoch of the same loop without
  DP. One warm-up epoch per mode, then 15 timed epochs, interleaved across modes so that
  drift on a shared machine hits every mode alike; medians.
* **train_dp call**: the appliance's own ``privacy.training.train_dp`` with 1 epoch
  (``make_private`` set-up and the cleanup included), against ``train_plain`` with 1 epoch;
  median of 15, interleaved. ``train_dp`` accepts hooks, ew and functorch only; ``ghost``
  has no figure here.
* **valid**: the mode ran (set-up, an epoch, a forward pass afterwards) without raising,
  AND one noise-free DP step on a fixed batch moved the weights exactly as ``hooks`` did
  (max abs difference <= 1e-5): a mode that computes different per-sample gradients is not
  a faster DP-SGD, it is another algorithm.

Repetitions: median of 15 (the tiny MLP's epochs take milliseconds: with 5, a run
under load put ``hooks`` ahead of ``ew``, which 15 did not confirm). About a minute on
2 cores.

    .venv/bin/python bench/dp_cost.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

MODES = ("hooks", "ew", "functorch", "ghost")
TRAIN_DP_MODES = ("hooks", "ew", "functorch")
TASKS = ("breast_cancer_mlp", "digits_cnn")
NOISE = 1.0
CLIP = 1.0
EQUIV_TOL = 1e-5

# Opacus's known, harmless warnings (see shared notes); filtered by message, not globally.
for _msg in ("Secure RNG turned off", "Optimal order is the largest alpha",
             "Using a non-full backward hook", "Full backward hook"):
    warnings.filterwarnings("ignore", message=f".*{_msg}.*")


def load(task: str):
    import numpy as np
    from sklearn.datasets import load_breast_cancer, load_digits

    bunch = load_breast_cancer() if task == "breast_cancer_mlp" else load_digits()
    return np.asarray(bunch.data, np.float32), np.asarray(bunch.target, np.int64)


class Trainer:
    """One model trained epoch by epoch in one mode (``none`` = no DP)."""

    def __init__(self, task: str, mode: str, x, y, seed: int = 0) -> None:
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from fedward.tasks import build_model, get_task

        spec = get_task(task)
        self.mode = mode
        self.model = build_model(task, seed=seed)
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=spec.default_lr)
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
                            batch_size=spec.default_batch_size, shuffle=(mode == "none"),
                            generator=torch.Generator().manual_seed(seed))
        self.criterion: Any = torch.nn.CrossEntropyLoss()
        if mode == "none":
            self.net, self.opt, self.loader = self.model, opt, loader
            return
        engine = PrivacyEngine(accountant="prv")
        out = engine.make_private(
            module=self.model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE,
            max_grad_norm=CLIP, poisson_sampling=True, grad_sample_mode=mode,
            noise_generator=torch.Generator().manual_seed(seed + 1),
            criterion=self.criterion)
        if mode == "ghost":
            self.net, self.opt, self.criterion, self.loader = out
        else:
            self.net, self.opt, self.loader = out

    def epoch(self) -> float:
        import torch

        t0 = time.perf_counter()
        for xb, yb in self.loader:
            self.opt.zero_grad(set_to_none=True)
            if len(yb) == 0:  # an empty Poisson batch: train_dp takes a noise-only step
                if self.mode not in ("none", "ghost"):
                    for p in self.opt.params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                    self.opt.step()
                continue
            loss = self.criterion(self.net(xb), yb)
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        with torch.no_grad():  # a forward pass after training must work (ew needs zero_grad)
            self.net(xb[:2] if len(xb) else torch.zeros((2, xb.shape[1])))
        return elapsed


def one_step_update(task: str, mode: str, x, y) -> dict[str, Any]:
    """Weights after one noise-free DP step on a fixed batch (no Poisson sampling)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedward.tasks import build_model, get_task

    spec = get_task(task)
    model = build_model(task, seed=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.default_lr)
    n = spec.default_batch_size
    loader = DataLoader(TensorDataset(torch.from_numpy(x[:n]), torch.from_numpy(y[:n])),
                        batch_size=n)
    out = PrivacyEngine(accountant="prv").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode,
        criterion=torch.nn.CrossEntropyLoss())
    net, dp_opt = out[0], out[1]
    crit = out[2] if mode == "ghost" else torch.nn.CrossEntropyLoss()
    loader = out[-1]
    xb, yb = next(iter(loader))
    dp_opt.zero_grad(set_to_none=True)
    crit(net(xb), yb).backward()
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bench_task(task: str, reps: int) -> dict[str, Any]:
    import numpy as np

    from privacy.training import train_dp, train_plain

    x, y = load(task)
    from fedward.tasks import build_model, get_task

    spec = get_task(task)
    res: dict[str, Any] = {"task": task, "rows": len(y), "batch_size": spec.default_batch_size,
                           "lr": spec.default_lr, "modes": {}}

    # -- validity: does the mode run, and does it compute what hooks computes? ------------
    reference = one_step_update(task, "hooks", x, y)
    trainers: dict[str, Trainer] = {}
    for mode in ("none", *MODES):
        info: dict[str, Any] = {"epoch_seconds": [], "train_call_seconds": []}
        res["modes"][mode] = info
        try:
            trainers[mode] = Trainer(task, mode, x, y)
            trainers[mode].epoch()  # warm-up, and the run-without-raising check
            info["runs"] = True
        except Exception as exc:
            info["runs"] = False
            info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            info["traceback_tail"] = traceback.format_exc()[-1500:]
            trainers.pop(mode, None)
        if mode != "none" and info["runs"]:
            try:
                upd = one_step_update(task, mode, x, y)
                diff = max(float((upd[k] - reference[k]).abs().max()) for k in reference)
                info["max_abs_diff_vs_hooks"] = diff
                info["matches_hooks"] = diff <= EQUIV_TOL
            except Exception as exc:
                info["matches_hooks"] = False
                info["error"] = f"equivalence step: {type(exc).__name__}: {exc}"[:300]
        info["valid"] = bool(info["runs"] and (mode == "none" or info.get("matches_hooks")))

    # -- per-epoch loop time, interleaved -----------------------------------------------------
    for _ in range(reps):
        for mode, trainer in trainers.items():
            try:
                res["modes"][mode]["epoch_seconds"].append(trainer.epoch())
            except Exception as exc:
                res["modes"][mode].update(valid=False, runs=False,
                                          error=f"{type(exc).__name__}: {exc}"[:300])

    # -- the appliance's own calls, 1 epoch each, interleaved -------------------------------
    base = build_model(task, seed=0)
    for rep in range(reps):
        model = copy.deepcopy(base)
        res["modes"]["none"]["train_call_seconds"].append(train_plain(
            model=model, features=x, labels=y, batch_size=spec.default_batch_size, epochs=1,
            lr=spec.default_lr, seed=rep).seconds)
        for mode in TRAIN_DP_MODES:
            model = copy.deepcopy(base)
            try:
                r = train_dp(model=model, features=x, labels=y, noise_multiplier=NOISE,
                             max_grad_norm=CLIP, batch_size=spec.default_batch_size, epochs=1,
                             lr=spec.default_lr, seed=rep, grad_sample_mode=mode)
                res["modes"][mode]["train_call_seconds"].append(r.seconds)
                if not np.isfinite(np.concatenate(
                        [p.detach().numpy().ravel() for p in model.parameters()])).all():
                    res["modes"][mode]["valid"] = False
                    res["modes"][mode]["error"] = "train_dp left non-finite weights"
            except Exception as exc:
                res["modes"][mode]["train_dp_error"] = f"{type(exc).__name__}: {exc}"[:300]
                res["modes"][mode]["valid"] = False

    none_epoch = bu.median(res["modes"]["none"]["epoch_seconds"])
    none_call = bu.median(res["modes"]["none"]["train_call_seconds"])
    for info in res["modes"].values():
        info["epoch_median_s"] = bu.median(info["epoch_seconds"])
        info["epoch_ratio_vs_no_dp"] = info["epoch_median_s"] / none_epoch
        info["train_call_median_s"] = bu.median(info["train_call_seconds"])
        info["train_call_ratio_vs_no_dp"] = info["train_call_median_s"] / none_call
    valid = [m for m in MODES if res["modes"][m]["valid"]]
    res["fastest_valid_mode"] = min(valid, key=lambda m: res["modes"][m]["epoch_median_s"],
                                    default=None)
    valid_dp = [m for m in TRAIN_DP_MODES if res["modes"][m]["valid"]]
    res["fastest_valid_mode_train_dp"] = min(
        valid_dp, key=lambda m: res["modes"][m]["train_call_median_s"], default=None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15,
                    help="timed repetitions per mode (5 let load swap hooks and ew)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the site agent's default torch_threads is 1)")
    args = ap.parse_args()
    bu.exit_on_sigterm()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    results = [bench_task(task, args.reps) for task in TASKS]

    rows = []
    for r in results:
        for mode in ("none", *MODES):
            i = r["modes"][mode]
            if mode == "none":
                validity = "baseline"
            elif i["valid"]:
                validity = f"yes (diff {i.get('max_abs_diff_vs_hooks', 0):.1e})"
            else:
                validity = "NO: " + (i.get("error") or i.get("train_dp_error")
                                     or f"differs from hooks by "
                                        f"{i.get('max_abs_diff_vs_hooks', float('nan')):.1e}")
            call = ("-" if not i["train_call_seconds"] else
                    f"{1000 * i['train_call_median_s']:.1f} "
                    f"({i['train_call_ratio_vs_no_dp']:.2f}x)")
            rows.append([
                r["task"], "no DP" if mode == "none" else mode,
                bu.fmt(1000 * i["epoch_median_s"], 1) if i["epoch_seconds"] else "-",
                f"{i['epoch_ratio_vs_no_dp']:.2f}x" if i["epoch_seconds"] else "-",
                call, validity.replace("|", "/"),
            ])
    md = (
        f"Opacus {bu.machine()['opacus']}, torch {bu.machine()['torch']}; all rows of each data "
        f"set, task default batch and lr, SGD, Poisson sampling, noise {NOISE}, clip {CLIP}; "
        f"{args.threads} torch thread(s) (the site agent's default); median of {args.reps}, "
        "modes interleaved. `train_dp` call = the appliance's "
        "`privacy.training.train_dp` with 1 epoch (set-up included) against `train_plain`.\n\n"
        + bu.md_table(["task", "mode", "ms per epoch (loop)", "vs no DP",
                       "ms per train_dp call, 1 epoch (vs train_plain)", "valid"], rows)
        + "\n"
        + "".join(f"- {r['task']}: fastest valid mode {r['fastest_valid_mode']}; fastest valid "
                  f"mode `train_dp` accepts: {r['fastest_valid_mode_train_dp']}\n"
                  for r in results)
    )
    bu.write_results("dp_cost", {"reps": args.reps, "threads": args.threads,
                                 "noise_multiplier": NOISE,
                                 "max_grad_norm": CLIP, "seconds": time.monotonic() - t0,
                                 "results": results}, md)


if __name__ == "__main__":
    main()
