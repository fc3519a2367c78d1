"""Build real Flower reply messages, as a SuperNode would send them, for server-side tests."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from common.records import state_to_record


def reply_from(node: int, content: RecordDict | Error, *, message_type: str = MessageType.TRAIN,
               reply_to: str = "") -> Message:
    """A reply from `node` (content, or an Error) answering the message with id `reply_to`."""
    metadata = Metadata(run_id=1, message_id=f"m{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=reply_to, group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    if isinstance(content, Error):
        return Message(content, metadata=metadata)
    return Message(content=content, metadata=metadata)


def sent_message(node: int, message_id: str, *, message_type: str = MessageType.TRAIN) -> Message:
    """A server message to `node` as it is after the Grid pushed it (its id set)."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict(), metadata=metadata)


def train_reply(node: int, arrays: dict[str, np.ndarray], *, examples=100, server_round: int = 1,
                client_id: str | None = None, reply_to: str = "") -> Message:
    return reply_from(node, reply_to=reply_to, content=RecordDict({
        "arrays": state_to_record(arrays),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "train-steps": 3, "train-seconds": 0.5}),
        "client": ConfigRecord({"client-id": client_id or f"c{node}", "round": server_round}),
    }))
