"""Build real Flower reply messages, as a SuperNode would send them, for server-side tests."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from common.records import state_to_record


def reply_from(node: int, content: RecordDict, *, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def train_reply(node: int, arrays: dict[str, np.ndarray], *, examples=100, server_round: int = 1,
                client_id: str | None = None) -> Message:
    return reply_from(node, RecordDict({
        "arrays": state_to_record(arrays),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "train-steps": 3, "train-seconds": 0.5}),
        "client": ConfigRecord({"client-id": client_id or f"c{node}", "round": server_round}),
    }))
