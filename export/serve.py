"""``fedward-serve``: a local inference service for one verified release bundle.

The service serves a model only while its bundle verifies. At start it verifies the
bundle (signature, every digest, file list) and its revocation status against the
coordinator's signed revocation list (``--coordinator URL`` fetches it, ``--revocations
FILE`` reads a saved one; ``--unsafe-skip-revocation-check`` skips it with a warning), and
refuses to start otherwise. ``POST /reload`` gets the revocation list again and
re-verifies; if that fails the service stops answering predictions (503 with the reason)
until a reload succeeds. It never keeps serving a model whose bundle no longer verifies,
not even the copy already in memory: fail closed.

The model is loaded from the bytes whose digest was checked, not re-read from the path,
so a file swapped after verification is never run. ONNX Runtime runs ``model.onnx`` on
CPU; torch is not imported.

With ``--recheck-s`` (every 300 s by default) a background thread does what ``/reload``
does on a schedule, so a release revoked at the coordinator stops answering within that
interval without anyone calling ``/reload``; a later check that succeeds serves again.

Answers name the predicted class (``classes``) where the task has class names, and carry
``warnings`` for input values outside the task's plausible ranges (the feature and the
range, never the value); both come from the task named in the signed model card.

Where the release ships reference statistics, ``/metrics`` also scores the inputs it
answered lately against them, per feature (a PSI; :mod:`export.serve_drift`; the last
``--drift-window`` rows, 1000 by default); the startup log and ``/health`` say whether
drift is scored, and if not why.

Routes: ``GET /health``, ``POST /predict`` (``{"instances": [[...], ...]}``, or ``{"records":
[{"age": 63, "sex": "male"}, ...]}`` by field name, :mod:`export.serve_records`), ``POST
/reload``, ``GET /metrics`` (Prometheus, :mod:`export.serve_metrics`). It binds to
127.0.0.1 by default: put an authenticating proxy in front before exposing it to a network.
``--version`` prints the Fedward version and the commit it was built from, then exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
import typer
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from export.bundle_format import SERVING_FILE, BundleError, BundleVerificationError
from export.bundle_verify import verify_bundle
from export.parity import Predictor, load_onnx_bytes
from export.revocations import DEFAULT_MAX_AGE, RevocationSource
from export.serve_drift import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    MIN_ROWS,
    DriftCollector,
    DriftWindow,
    drift_for,
)
from export.serve_metrics import RangeCheck, ServeMetrics
from export.serve_records import RecordError, RecordReader, record_reader
from export.verify_cli import (
    UNSAFE_SKIP_WARNING,
    CoordinatorOpt,
    MaxAgeOpt,
    RevocationsOpt,
    UnsafeSkipOpt,
    revocation_source,
    version_option,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_RECHECK_S",
    "MAX_INSTANCES",
    "HealthResponse",
    "PredictRequest",
    "PredictResponse",
    "ReloadResponse",
    "create_app",
    "main",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8700
DEFAULT_RECHECK_S: Final = 300.0
MAX_INSTANCES: Final = 10_000
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)

log = logging.getLogger(__name__)

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


FieldValue = StrictBool | StrictInt | FiniteFloat | Annotated[str, Field(max_length=200)] | None


class PredictRequest(BaseModel):
    """Either ``instances``: rows of raw feature values in the model's column order (``null``
    is a missing value, accepted only in a column the model imputes, the card's
    ``input.imputed``); or ``records``: one object of named fields per patient, as the
    release's study defines them (:mod:`export.serve_records`)."""

    model_config = ConfigDict(extra="forbid")
    instances: list[list[FiniteFloat | None]] | None = Field(
        default=None, min_length=1, max_length=MAX_INSTANCES)
    records: list[dict[Annotated[str, Field(max_length=200)], FieldValue]] | None = Field(
        default=None, min_length=1, max_length=MAX_INSTANCES)

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        if (self.instances is None) == (self.records is None):
            raise ValueError("send either instances (rows in the model's column order) or "
                             "records (objects of named fields), not both or neither")
        return self


class PredictResponse(BaseModel):
    """Predicted class and class probabilities per row, with the release that made them.

    ``classes`` names each predicted class where the task has class names (else null), and
    ``class_names`` the class of each column of ``probabilities``; ``warnings`` lists input
    values outside the task's plausible ranges (empty if none).
    """

    release_id: str
    predictions: list[int]
    probabilities: list[list[float]]
    classes: list[str] | None = None
    warnings: list[str] = Field(default_factory=list)
    # The class each column of ``probabilities`` is for, where the task names them.
    class_names: list[str] | None = None


class HealthResponse(BaseModel):
    """Whether predictions are being served, and if not, why; whether drift is scored and
    records of named fields are taken."""

    status: Literal["ok", "unavailable"]
    release_id: str | None
    reason: str | None
    drift: str | None = None
    # Whether ``records`` of named fields are taken, and by which names.
    records: str | None = None


class ReloadResponse(BaseModel):
    """The release now served after a successful reload."""

    status: Literal["ok"]
    release_id: str
    files: int


@dataclass(frozen=True)
class _Loaded:
    release_id: str
    n_files: int
    predictor: Predictor
    n_features: int
    ranges: RangeCheck | None
    # The input columns the model imputes itself (a study's impute-* features).
    imputed: frozenset[int] = frozenset()
    columns: tuple[str, ...] = ()
    # The release's drift window (None: not scored), and why.
    drift: DriftWindow | None = None
    drift_note: str = ""
    # How ``records`` are read (None: only ``instances``), and why.
    records: RecordReader | None = None
    records_note: str = ""


class _Service:
    """The bundle source and what is being served; swapped whole, under a lock."""

    def __init__(self, *, bundle_dir: Path, public_key: Path,
                 revocations: RevocationSource, drift_window: int = DEFAULT_WINDOW) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.public_key = Path(public_key)
        self.revocations = revocations
        self.drift_window = drift_window
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._reason: str | None = "not loaded"
        self.metrics = ServeMetrics()
        # Kept across reloads of the same release, so a scheduled recheck keeps the window.
        self.drift: DriftWindow | None = None
        self._drift_note = ""
        self.metrics.registry.register(DriftCollector(lambda: self.drift))

    def load(self) -> _Loaded:
        """Verify the bundle and load its model; raise BundleError with the reason."""
        listed = self.revocations.load(self.public_key)
        if listed is None:
            log.warning("%s", UNSAFE_SKIP_WARNING)
        verified = verify_bundle(bundle_dir=self.bundle_dir, public_key=self.public_key,
                                 revoked=frozenset() if listed is None else listed.revoked)
        if SERVING_FILE not in verified.files:
            raise BundleVerificationError(f"bundle has no {SERVING_FILE} to serve")
        data = verified.read_verified(SERVING_FILE)
        try:
            predictor = load_onnx_bytes(data)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleVerificationError(f"{SERVING_FILE} cannot be loaded by ONNX Runtime: "
                                          f"{exc}") from None
        if predictor.n_features is None:
            raise BundleVerificationError(f"{SERVING_FILE} does not declare its feature count")
        card_input = verified.model_card.get("input")
        columns = (tuple(str(c) for c in card_input.get("columns") or ())
                   if isinstance(card_input, dict) else ())
        imputed = (set(card_input.get("imputed") or ()) if isinstance(card_input, dict)
                   else set())
        ranges = RangeCheck.for_card(verified.model_card, predictor.n_features)
        current = self.drift
        drift: DriftWindow | None
        if current is not None and current.release_id == verified.release_id:
            # A recheck of the release being served keeps its window (and does not parse
            # the reference or allocate a window again).
            drift, note = current, self._drift_note
        else:
            drift, note = drift_for(verified, columns or (ranges.features if ranges else ()),
                                    self.drift_window)
        records, records_note = record_reader(verified, columns, predictor.n_features)
        return _Loaded(release_id=verified.release_id, n_files=len(verified.files),
                       predictor=predictor, n_features=predictor.n_features, ranges=ranges,
                       imputed=frozenset(i for i, c in enumerate(columns) if c in imputed),
                       columns=columns, drift=drift, drift_note=note, records=records,
                       records_note=records_note)

    def reload(self) -> _Loaded:
        """Re-verify; on failure stop serving (fail closed) and re-raise."""
        with self._reload_lock:
            try:
                loaded = self.load()
            except BundleError as exc:
                with self._lock:
                    self._loaded, self._reason = None, str(exc)
                self.metrics.now_serving(None)
                log.error("bundle %s no longer verifies, predictions stopped: %s",
                          self.bundle_dir, exc)
                raise
            with self._lock:
                self.drift, self._drift_note = loaded.drift, loaded.drift_note
                first = self._loaded is None or self._loaded.release_id != loaded.release_id
                self._loaded, self._reason = loaded, None
            self.metrics.now_serving(loaded.release_id)
            if first:
                log.info("release %s: %s", loaded.release_id, loaded.drift_note)
                log.info("release %s: %s", loaded.release_id, loaded.records_note)
            log.info("serving release %s from %s", loaded.release_id, self.bundle_dir)
            return loaded

    def current(self) -> tuple[_Loaded | None, str | None]:
        with self._lock:
            return self._loaded, self._reason

    def recheck_every(self, interval_s: float, stop: threading.Event) -> None:
        """Reload every ``interval_s`` seconds until ``stop`` is set (fail closed)."""
        while not stop.wait(interval_s):
            try:
                self.reload()
            except BundleError:
                self.metrics.checked(False)   # reload logged why and stopped predictions
            else:
                self.metrics.checked(True)


def _service(request: Request) -> _Service:
    service: _Service = request.app.state.service
    return service


ServiceDep = Annotated[_Service, Depends(_service)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
    e = np.exp(shifted)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what is wrong, never the submitted values.

    FastAPI's default handler echoes each bad input back, which fails on NaN (not JSON)
    and would copy patient feature values into responses and client logs.
    """
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    service: _Service = request.app.state.service
    service.metrics.refusals.labels(reason="invalid-request").inc()
    detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in errors]
    return JSONResponse(status_code=422, content={"detail": detail})


def _record_rows(records: list[dict[str, Any]], loaded: _Loaded, refused: Counter
                 ) -> np.ndarray:
    """The model's rows for records of named fields, or a 422 with every problem."""
    if loaded.records is None:
        refused.labels(reason="records-unsupported").inc()
        raise HTTPException(status_code=422, detail=(
            f"this release takes instances only: {loaded.records_note}"))
    try:
        return loaded.records.rows(records)
    except RecordError as err:
        refused.labels(reason="record").inc()
        raise HTTPException(status_code=422, detail=str(err)) from None


def _answer(svc: _Service, loaded: _Loaded, x: np.ndarray, t0: float) -> PredictResponse:
    """Run the model on rows in its column order (NaN: a missing value it imputes)."""
    # Finite as a JSON number, infinite as float32 (NaN: a missing value, imputed).
    given = x[~np.isnan(x)]
    if given.size and np.abs(given).max() > _FLOAT32_MAX:
        svc.metrics.refusals.labels(reason="out-of-float32").inc()
        raise HTTPException(status_code=422, detail="feature values must fit in float32")
    logits = loaded.predictor(x.astype(np.float32))
    probs = _softmax(logits.astype(np.float64))
    predicted = [int(c) for c in logits.argmax(axis=1)]
    ranges = loaded.ranges
    answer = PredictResponse(
        release_id=loaded.release_id, predictions=predicted, probabilities=probs.tolist(),
        classes=None if ranges is None else ranges.names(predicted),
        warnings=[] if ranges is None else ranges.warnings(x, svc.metrics),
        class_names=list(ranges.class_names) if ranges and ranges.class_names else None)
    svc.metrics.predictions.inc(len(predicted))
    window = svc.drift
    if window is not None:
        window.add(x)
    svc.metrics.latency.observe(time.perf_counter() - t0)
    return answer


def create_app(*, bundle_dir: Path, public_key: Path, revocations: RevocationSource,
               recheck_s: float | None = None, drift_window: int = DEFAULT_WINDOW) -> FastAPI:
    """Build the inference service for one bundle, verifying it first.

    Args:
        bundle_dir: The release bundle folder.
        public_key: The release public key (PEM).
        revocations: Where the signed revocation list comes from, at start and at every
            reload (see :class:`export.revocations.RevocationSource`).
        recheck_s: Re-read the revocation list and re-verify the bundle this often, while
            the app runs (its lifespan); None: only at start and at ``POST /reload``.
        drift_window: Answered rows the drift gauges score (:mod:`export.serve_drift`).

    Returns:
        The FastAPI application.

    Raises:
        BundleError: The bundle is tampered, unsigned, revoked or unusable: the service
            refuses to start.
        ValueError: ``drift_window`` is outside ``MIN_ROWS .. MAX_WINDOW``.
    """
    if not MIN_ROWS <= drift_window <= MAX_WINDOW:
        raise ValueError(f"the drift window must hold {MIN_ROWS} to {MAX_WINDOW} rows, not "
                         f"{drift_window}")
    service = _Service(bundle_dir=bundle_dir, public_key=public_key,
                       revocations=revocations, drift_window=drift_window)
    service.reload()  # raises: refuse to start on a bundle that does not verify

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        if recheck_s is not None:
            threading.Thread(target=service.recheck_every, args=(recheck_s, stop),
                             name="revocation-recheck", daemon=True).start()
        try:
            yield
        finally:
            stop.set()

    app = FastAPI(title="Fedward inference service", version="1", lifespan=lifespan)
    app.state.service = service
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.get("/health", response_model=HealthResponse)
    def health(svc: ServiceDep, response: Response) -> HealthResponse:
        loaded, reason = svc.current()
        if loaded is None:
            response.status_code = 503
            return HealthResponse(status="unavailable", release_id=None, reason=reason)
        return HealthResponse(status="ok", release_id=loaded.release_id, reason=None,
                              drift=loaded.drift_note, records=loaded.records_note)

    @app.post("/predict", response_model=PredictResponse)
    def predict(body: PredictRequest, svc: ServiceDep) -> PredictResponse:
        t0 = time.perf_counter()
        loaded, reason = svc.current()
        refused = svc.metrics.refusals
        if loaded is None:
            refused.labels(reason="not-serving").inc()
            raise HTTPException(status_code=503, detail=f"not serving: {reason}")
        if body.records is not None:
            return _answer(svc, loaded, _record_rows(body.records, loaded, refused), t0)
        assert body.instances is not None
        bad = [i for i, row in enumerate(body.instances) if len(row) != loaded.n_features]
        if bad:
            refused.labels(reason="feature-count").inc()
            shown = ", ".join(str(i) for i in bad[:10])
            raise HTTPException(status_code=422, detail=(
                f"each instance needs {loaded.n_features} features; instance(s) {shown} "
                f"have {len(body.instances[bad[0]])}"))
        missing = [(i, j) for i, row in enumerate(body.instances)
                   for j, v in enumerate(row) if v is None and j not in loaded.imputed]
        if missing:
            refused.labels(reason="missing-value").inc()
            i, j = missing[0]
            name = loaded.columns[j] if j < len(loaded.columns) else f"column {j}"
            imputes = ", ".join(loaded.columns[k] for k in sorted(loaded.imputed))
            raise HTTPException(status_code=422, detail=(
                f"instance {i}: {name} is missing (null) and this model does not impute it "
                f"({len(missing)} such value(s)); give its value ("
                + (f"this model imputes only {imputes})" if imputes else
                   "this model imputes no missing value)")))
        x = np.asarray([[np.nan if v is None else v for v in row] for row in body.instances],
                       dtype=np.float64)
        return _answer(svc, loaded, x, t0)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(svc: ServiceDep) -> Response:
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload", response_model=ReloadResponse)
    def reload(svc: ServiceDep) -> ReloadResponse:
        try:
            loaded = svc.reload()
        except BundleError as exc:
            raise HTTPException(status_code=503, detail=f"not serving: {exc}") from None
        return ReloadResponse(status="ok", release_id=loaded.release_id, files=loaded.n_files)

    return app


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Serve predictions from a verified Fedward release bundle.")


@cli.command()
def serve(
    bundle: Annotated[Path, typer.Option("--bundle", help="The release bundle folder.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The release public key "
                                             "(PEM), as published on the release portal.")],
    coordinator: CoordinatorOpt = None,
    revocations: RevocationsOpt = None,
    unsafe_skip_revocation_check: UnsafeSkipOpt = False,
    max_revocation_age_days: MaxAgeOpt = DEFAULT_MAX_AGE.days,
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback by "
                                      "default.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = DEFAULT_PORT,
    recheck_s: Annotated[float, typer.Option(
        "--recheck-s", min=0, help="Re-read the revocation list (and re-verify the bundle) "
        "this often, in seconds; a revoked release stops answering within it. 0: only at "
        "start and at POST /reload.")] = DEFAULT_RECHECK_S,
    drift_window: Annotated[int, typer.Option(
        "--drift-window", min=MIN_ROWS, max=MAX_WINDOW, help="Score drift (/metrics) on the "
        f"last this many answered rows; a feature's PSI is shown from {MIN_ROWS} of its "
        "values.")] = DEFAULT_WINDOW,
    version: Annotated[bool, version_option("fedward-serve")] = False,
) -> None:
    """Verify the bundle, then serve /predict, /health and /reload."""
    import uvicorn

    try:
        source = revocation_source(coordinator=coordinator, revocations=revocations,
                                   unsafe_skip=unsafe_skip_revocation_check,
                                   max_age_days=max_revocation_age_days)
        if source.unsafe_skip:
            typer.echo(UNSAFE_SKIP_WARNING, err=True)
        app = create_app(bundle_dir=bundle, public_key=public_key, revocations=source,
                         recheck_s=None if recheck_s == 0 or source.unsafe_skip else recheck_s,
                         drift_window=drift_window)
    except BundleError as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(1) from None
    uvicorn.run(app, host=host, port=port, log_level="info")


def main() -> None:
    """Console entry point of ``fedward-serve``."""
    cli()
