"""Benchmark 5: inference latency of the exported formats against PyTorch eager.

For the breast-cancer MLP and the digits CNN (the appliance's models, seeded weights: the
latency of these dense models does not depend on the weight values), exported with the
appliance's own exporters (``export.onnx_export``): ONNX fp32, ONNX Runtime INT8 (dynamic,
no calibration; and static QDQ calibrated on 256 rows of the scikit-learn data), OpenVINO IR
run with ``INFERENCE_PRECISION_HINT: f32`` (OpenVINO is imported only through
``export.parity.import_openvino()``, telemetry off).

Latency of one call at batch 1 and batch 64, measured call by call with
``perf_counter_ns``; engines are interleaved in 5 blocks so that drift on a shared machine
hits all of them alike; the figure is the median over all calls (2000 calls at batch 1,
500 at batch 64, after 100 warm-up calls). Every engine gets the same number of CPU threads
(``--threads``, default 1: these models are far too small to gain from more, and on a
shared 2-core machine extra threads mostly spin). A second, smaller table times the
appliance's own ``export.parity.load_session`` predictors (library-default threads, a new
OpenVINO infer request per call, input checks), which is what parity checks and
``fedward-serve`` pay. The parity columns give the largest |logit difference| against
PyTorch and the argmax agreement on 512 real rows.

    .venv/bin/python bench/exports.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

TASKS = ("breast_cancer_mlp", "digits_cnn")
BATCHES = (1, 64)
CALLS = {1: 2000, 64: 500}
BLOCKS = 5
WARMUP = 100

warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def data(task: str):
    import numpy as np
    from sklearn.datasets import load_breast_cancer, load_digits

    bunch = load_breast_cancer() if task == "breast_cancer_mlp" else load_digits()
    x = np.ascontiguousarray(bunch.data, dtype=np.float32)
    return x[np.random.default_rng(0).permutation(len(x))]


def engines(task: str, out: Path, threads: int, x) -> dict[str, Callable[[Any], Any]]:
    """name -> predict(x) for the raw engines, all at ``threads`` threads."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_onnx, export_onnx_int8, export_openvino
    from export.parity import import_openvino
    from fedward.tasks import build_model

    model = build_model(task, seed=0).eval()
    onnx_path = export_onnx(model=model, task=task, out_dir=out / "fp32")
    int8_dyn = export_onnx_int8(onnx_path=onnx_path, out_dir=out / "int8-dynamic",
                                calibration=None)
    int8_static = export_onnx_int8(onnx_path=onnx_path, out_dir=out / "int8-static",
                                   calibration=x[:256])
    ov_xml = export_openvino(onnx_path=onnx_path, out_dir=out / "openvino")

    def torch_eager(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    def ort_session(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda a: sess.run(None, {name: a})[0]

    ov = import_openvino()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(ov_xml)), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def openvino_f32(a: np.ndarray) -> np.ndarray:
        return request.infer({0: a})[output]

    return {
        "PyTorch eager": torch_eager,
        "ONNX Runtime fp32": ort_session(onnx_path),
        "ONNX Runtime INT8 (dynamic)": ort_session(int8_dyn),
        "ONNX Runtime INT8 (static QDQ)": ort_session(int8_static),
        "OpenVINO (f32 hint)": openvino_f32,
        "_paths": {"onnx": onnx_path, "onnx-int8": int8_dyn, "openvino": ov_xml},  # type: ignore[dict-item]
    }


def time_calls(fns: dict[str, Callable], batch, calls: int) -> dict[str, list[float]]:
    per_block = max(1, calls // BLOCKS)
    lat: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(WARMUP):
            fn(batch)
    clock = time.perf_counter_ns
    for _ in range(BLOCKS):
        for name, fn in fns.items():
            out = lat[name]
            for _ in range(per_block):
                t = clock()
                fn(batch)
                out.append((clock() - t) / 1000.0)  # microseconds
    return lat


def bench_task(task: str, threads: int) -> dict[str, Any]:
    import numpy as np

    from export.parity import load_session

    x = data(task)
    res: dict[str, Any] = {"task": task, "engines": {}, "appliance_predictors": {}}
    with tempfile.TemporaryDirectory(prefix="fedward-exports-") as tmp:
        fns = engines(task, Path(tmp), threads, x)
        paths = fns.pop("_paths")
        ref = fns["PyTorch eager"](x[:512])
        for name, fn in fns.items():
            got = fn(x[:512])
            res["engines"][name] = {
                "max_abs_diff_vs_torch": float(np.max(np.abs(got - ref))),
                "argmax_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
            }
        for b in BATCHES:
            batch = np.ascontiguousarray(x[:b])
            lat = time_calls(fns, batch, CALLS[b])
            for name, values in lat.items():
                res["engines"][name][f"b{b}_median_us"] = bu.median(values)
                res["engines"][name][f"b{b}_p90_us"] = bu.percentile(values, 90)
                res["engines"][name][f"b{b}_calls"] = len(values)
        # The appliance's own predictors (library-default threads), as parity and serve use.
        preds = {f"load_session('{fmt}')": load_session(fmt, path)  # type: ignore[arg-type]
                 for fmt, path in paths.items()}
        preds = {"PyTorch eager": fns["PyTorch eager"], **preds}
        for b in BATCHES:
            batch = np.ascontiguousarray(x[:b])
            lat = time_calls(preds, batch, CALLS[b] // 2)
            for name, values in lat.items():
                res["appliance_predictors"].setdefault(name, {})[f"b{b}_median_us"] = (
                    bu.median(values))
    for group in ("engines", "appliance_predictors"):
        base = res[group]["PyTorch eager"]
        for info in res[group].values():
            for b in BATCHES:
                info[f"b{b}_speedup_vs_torch"] = base[f"b{b}_median_us"] / info[f"b{b}_median_us"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    bu.exit_on_sigterm()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    results = [bench_task(task, args.threads) for task in TASKS]

    rows, rows2 = [], []
    for r in results:
        for name, i in r["engines"].items():
            rows.append([r["task"], name,
                         bu.fmt(i["b1_median_us"], 1), f"{i['b1_speedup_vs_torch']:.2f}x",
                         bu.fmt(i["b64_median_us"], 1), f"{i['b64_speedup_vs_torch']:.2f}x",
                         f"{i['max_abs_diff_vs_torch']:.1e}", f"{i['argmax_agreement']:.3f}"])
        for name, i in r["appliance_predictors"].items():
            rows2.append([r["task"], name,
                          bu.fmt(i["b1_median_us"], 1), f"{i['b1_speedup_vs_torch']:.2f}x",
                          bu.fmt(i["b64_median_us"], 1), f"{i['b64_speedup_vs_torch']:.2f}x"])
    md = (
        f"Median latency per call in microseconds, {args.threads} thread(s) for every engine; "
        f"{CALLS[1]} calls at batch 1 and {CALLS[64]} at batch 64, engines interleaved in "
        f"{BLOCKS} blocks. Speed-up = PyTorch eager median / engine median (>1 is faster than "
        "PyTorch). Parity on 512 rows.\n\n"
        + bu.md_table(["task", "engine", "batch 1 us", "speed-up b1", "batch 64 us",
                       "speed-up b64", "max abs diff", "argmax agreement"], rows)
        + "\nThe appliance's predictors (`export.parity.load_session`, library-default "
          "threads, a new OpenVINO infer request per call), half the calls:\n\n"
        + bu.md_table(["task", "predictor", "batch 1 us", "speed-up b1", "batch 64 us",
                       "speed-up b64"], rows2)
    )
    bu.write_results("exports", {"threads": args.threads, "calls": CALLS, "blocks": BLOCKS,
                                 "seconds": time.monotonic() - t0, "results": results}, md)


if __name__ == "__main__":
    main()
