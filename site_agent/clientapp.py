"""The Flower ClientApp of the appliance: a thin relay to the site agent's warm trainer.

Flower starts a fresh process for every message. This module therefore imports neither
torch nor the site's data: it forwards the task over a local Unix socket to the trainer
inside the long-lived site agent (the only process that reads patient data), and turns its
answer back into a Flower reply. The trainer has already passed the result through the
site's egress guard; the relay adds nothing of its own but the error codes.
"""

from __future__ import annotations

from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedward.agent_versions import REPLY_VERSIONS
from fedward.wire import (
    ADMISSION_ACTION,
    CANCEL_ACTION,
    CFG,
    PACKED,
    REPLY_ARRAYS,
    REPLY_FINGERPRINT,
    REPLY_METRICS,
    SECAGG_ACTION,
    STATISTICS_ACTION,
    TASK_ARRAYS,
    TASK_CONFIG,
    SiteErrorCode,
    pack_arrays,
    parse_layout,
    unpack_arrays,
)
from site_agent.ipc import IPCError, request

__all__ = ["SOCKET_KEY", "app"]

SOCKET_KEY = "fedward-socket"
_TIMEOUT_KEY = "fedward-timeout"
_DEFAULT_TIMEOUT_S = 600.0

app = ClientApp()


def _relay(msg: Message, context: Context, kind: str) -> Message:
    socket_path = context.node_config.get(SOCKET_KEY)
    if not isinstance(socket_path, str):
        return Message(
            Error(code=SiteErrorCode.TRAINER_UNAVAILABLE,
                  reason="trainer-unavailable: SuperNode started without the site agent"),
            reply_to=msg,
        )
    timeout = float(context.node_config.get(_TIMEOUT_KEY, _DEFAULT_TIMEOUT_S))
    try:
        config: dict[str, Any] = dict(msg.content[TASK_CONFIG])
        arrays = (
            {k: v.numpy() for k, v in msg.content.array_records[TASK_ARRAYS].items()}
            if TASK_ARRAYS in msg.content.array_records
            else {}
        )
        # A packed model (fedward.wire.PACKED): unpacked for the trainer, and the reply
        # packed again in the same order.
        layout = None
        if set(arrays) == {PACKED} and isinstance(config.get(CFG.LAYOUT), str):
            layout = parse_layout(config.pop(CFG.LAYOUT))
            arrays = unpack_arrays(arrays[PACKED], layout)
    except (KeyError, TypeError, ValueError):
        return Message(Error(code=SiteErrorCode.BAD_TASK, reason="bad-task: malformed message"),
                       reply_to=msg)
    header = {
        "kind": kind,
        "config": config,
        "flwr_run_id": msg.metadata.run_id,
        "message_id": msg.metadata.message_id,
        "group_id": msg.metadata.group_id,
    }
    try:
        reply, out_arrays = request(socket_path, header, arrays, timeout=timeout)
    except IPCError as err:
        return Message(
            Error(code=SiteErrorCode.TRAINER_UNAVAILABLE, reason=f"trainer-unavailable: {err}"),
            reply_to=msg,
        )
    if reply.get("error"):
        err_body = reply["error"]
        return Message(
            Error(code=int(err_body.get("code", SiteErrorCode.TASK_FAILED)),
                  reason=str(err_body.get("reason", "task failed at the site"))),
            reply_to=msg,
        )
    content = RecordDict()
    if out_arrays:
        if layout is not None and set(out_arrays) == {name for name, _ in layout}:
            flat, _ = pack_arrays({name: out_arrays[name] for name, _ in layout})
            content[REPLY_ARRAYS] = ArrayRecord({PACKED: Array(flat)})
        else:
            content[REPLY_ARRAYS] = ArrayRecord({k: Array(v) for k, v in out_arrays.items()})
    content[REPLY_METRICS] = MetricRecord(
        {str(k): float(v) for k, v in dict(reply.get("metrics", {})).items()}
    )
    if reply.get("fingerprint"):
        content[REPLY_FINGERPRINT] = ConfigRecord(
            {str(k): str(v) for k, v in reply["fingerprint"].items()})
    if reply.get(REPLY_VERSIONS):
        content[REPLY_VERSIONS] = ConfigRecord(
            {str(k): str(v) for k, v in reply[REPLY_VERSIONS].items()})
    if reply.get("status"):
        content["status"] = ConfigRecord({str(k): str(v) for k, v in reply["status"].items()})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the received global model at the site, then train it (one message a round)."""
    return _relay(msg, context, "train")


@app.query()
def parity(msg: Message, context: Context) -> Message:
    """Measure export parity of a release candidate on the site's held-out split."""
    return _relay(msg, context, "parity")


@app.query(ADMISSION_ACTION)
def admission(msg: Message, context: Context) -> Message:
    """Say whether the site's policy accepts the run (before round 1; no data, no charge)."""
    return _relay(msg, context, "admission")


@app.query(CANCEL_ACTION)
def cancel(msg: Message, context: Context) -> Message:
    """The coordinator cancelled the run: the site audits it (nothing leaves but an ack)."""
    return _relay(msg, context, "cancel")


@app.query(STATISTICS_ACTION)
def statistics(msg: Message, context: Context) -> Message:
    """Release the site's DP statistics for the run (before round 1; charged, then noised)."""
    return _relay(msg, context, "statistics")


@app.query(SECAGG_ACTION)
def secure_aggregation(msg: Message, context: Context) -> Message:
    """One stage of a secure-aggregation round (keys, shares, masked update, unmasking)."""
    return _relay(msg, context, "secagg")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's held-out split."""
    return _relay(msg, context, "evaluate")
