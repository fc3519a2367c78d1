"""A Grid whose transport is a direct call into a real ClientApp, for server-side tests of the
multi-stage secure round: every node keeps its own Context across messages, as a SuperNode does,
and the server's messages get ids as Flower's Grid gives them. Only the transport is replaced;
the ClientApp, its handlers and the server's code are the real ones. `drop(node, message)` makes
a node drop a message (no reply: a time-out); a handler that raises answers with an error reply,
as Flower's engines do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict


class InProcessGrid:
    def __init__(self, app, node_configs: dict[int, dict], *, drop: Callable[[int, Message], bool] | None = None,
                 run_id: int = 1) -> None:
        self.app, self.drop = app, drop
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config=c, state=RecordDict(), run_config={})
                         for n, c in node_configs.items()}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(node, msg):
                continue
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as err:  # noqa: BLE001 - what a ClientApp raises becomes an error reply
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return replies
