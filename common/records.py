"""Conversion between adapter states (name -> numpy array) and Flower's ArrayRecord.

Thin glue shared by client and server; with `common/flower.py`, the only module of `common/` that imports Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

if TYPE_CHECKING:  # the server's and the client's query paths use this module without loading torch
    from common.model import AdapterState

# The metrics a training reply carries; the server rejects replies with other or non-finite ones.
TRAIN_METRICS = ("num-examples", "train-loss", "train-steps", "train-seconds")
# With lora-freeze-a, the server's fingerprint of the frozen A matrices, beside the run config.
FROZEN_KEY = "frozen-fingerprint"
REVEAL_CANARIES = "reveal-canaries"  # a query record: after the last round, each client reveals its canary seed


def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def record_to_state(record: ArrayRecord) -> AdapterState:
    # Array.numpy() rebuilds from raw bytes, dtype and shape; no pickle is involved.
    return {name: array.numpy() for name, array in record.items()}
