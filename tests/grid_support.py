"""The coordinator's round loop on an in-process Flower Grid: ``SiteGrid``, whose sites
answer in the test's process, sites that train soundly, the model's arrays, and the rows
the loop records.

The fixtures of these tests (``grid_engine``, the database with the Grid's sites
registered; ``make_plan``; ``task_identity``) are in ``conftest.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
from sqlalchemy import Engine
from sqlmodel import select

from coordinator.db import session_scope
from coordinator.models import Round, Run
from fedward.wire import (
    ADMISSION_MESSAGE_TYPE,
    CFG,
    MSG,
    PACKED,
    REPLY_ARRAYS,
    REPLY_CONFIG,
    REPLY_METRICS,
    TASK_ARRAYS,
    TASK_CONFIG,
    parse_layout,
    unpack_arrays,
)

with warnings.catch_warnings():
    # flwr imports typer, which touches aliases that Click 8.3+ deprecates: harmless here.
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.serverapp import Grid

    from fedward.run_config import RunPlan

EXPECTED = {"w": (2, 3), "b": (3,)}


def arrays_of(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in EXPECTED.items()}



SiteFn = Callable[[Message], Message | None]
NODES = {"hospital-a": 11, "hospital-b": 12, "hospital-c": 13}


def accepting(msg: Message) -> Message:
    """A site whose policy accepts the run (the answer to the admission question)."""
    return Message(RecordDict({REPLY_CONFIG: ConfigRecord({MSG.STATUS: MSG.ACCEPTED})}),
                   reply_to=msg)


class SiteGrid(Grid):
    """A Grid whose sites answer in-process: ``sites[node_id](msg)`` returns the reply (or
    None: the site never answers). Only nodes in ``online`` are reported connected.

    Admission questions go to ``admission[node_id]`` (default: the run is accepted) and are
    kept in ``asked``; every other message is kept in ``sent``."""

    def __init__(self, sites: dict[int, SiteFn], online: Iterable[int],
                 admission: dict[int, SiteFn] | None = None) -> None:
        self.sites = sites
        self.online = list(online)
        self.admission = admission or {}
        self.sent: list[Message] = []
        self.asked: list[Message] = []
        self._replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id  # what the SuperLink would set
            if msg.metadata.message_type == ADMISSION_MESSAGE_TYPE:
                self.asked.append(msg)
                reply = self.admission.get(msg.metadata.dst_node_id, accepting)(msg)
            else:
                self.sent.append(msg)
                reply = self.sites[msg.metadata.dst_node_id](msg)
            if reply is not None:
                self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]


def task_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The model a task message carries (packed on the wire, see fedward.wire.PACKED)."""
    record = msg.content.array_records[TASK_ARRAYS]
    arrays = {k: v.numpy() for k, v in record.items()}
    if set(arrays) == {PACKED}:
        return unpack_arrays(arrays[PACKED], parse_layout(msg.content[TASK_CONFIG][CFG.LAYOUT]))
    return arrays


def good_site(delta: float, n: float = 100.0) -> SiteFn:
    """A site that adds ``delta`` to every weight when training and reports metrics."""

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({REPLY_METRICS: MetricRecord(
                {"eval-accuracy": 0.75, "eval-loss": math.nan})}), reply_to=msg)
        incoming = task_arrays(msg)
        return Message(RecordDict({
            REPLY_ARRAYS: ArrayRecord({k: Array(v + np.float32(delta))
                                       for k, v in incoming.items()}),
            REPLY_METRICS: MetricRecord({"num-examples": n, "train-loss": 0.3}),
        }), reply_to=msg)

    return answer


PlanFactory = Callable[..., RunPlan]



def rounds_of(engine: Engine, run_id: int) -> list[Round]:
    with session_scope(engine) as session:
        rows = session.exec(select(Round).where(Round.run_id == run_id)
                            .order_by(Round.number)).all()
        session.expunge_all()
        return list(rows)


def run_row(engine: Engine, run_id: int) -> Run:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        session.expunge(run)
        return run
