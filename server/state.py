"""What the server holds during a run, and the state a run starts from."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord

from common.config import FedtuneConfig
from common.data import LabelMap
from common.federation_data import data_fingerprint, federation_labels
from common.ledger import Ledger
from common.lm import model_for_config
from common.model import frozen_fingerprint, get_adapter_state
from common.records import FROZEN_KEY
from server.rundir import RunDir


@dataclass
class ServerState:
    cfg: FedtuneConfig
    labels: LabelMap
    run: RunDir
    initial: dict
    arrays: dict
    history: list[dict] = field(default_factory=list)
    clients: dict[int, str] = field(default_factory=dict)
    declared: dict[int, int] = field(default_factory=dict)  # node id -> training examples it declared
    ledger: Ledger = field(default_factory=Ledger)
    rounds: list[dict] = field(default_factory=list)  # the round ledger (I4)
    status: str = "running"
    frozen: str = ""  # fingerprint of the frozen LoRA A matrices (lora-freeze-a), sent to every client
    data: str = ""  # fingerprint of the training data and held-out set (data_fingerprint): resume checks it
    scalars: object = None  # server.tensorboard.Scalars, once the run knows its first round

    @property
    def private(self) -> bool:
        return self.cfg.dp_sample or self.cfg.dp_client != "off"

    def message_config(self) -> ConfigRecord:
        """The run config every message carries, with the frozen-A fingerprint when there is one."""
        config = self.cfg.to_run_config()
        if self.frozen:
            config[FROZEN_KEY] = self.frozen
        return ConfigRecord(config)


def with_labels(cfg: FedtuneConfig) -> tuple[FedtuneConfig, LabelMap]:
    """The federation's labels, and for classification the config that names them: one label
    order for every client (causal-lm labels are only partition groups)."""
    labels = federation_labels(cfg)
    return (cfg.replace(labels=labels.to_spec()) if cfg.task == "classification" else cfg), labels


def initial_state(cfg: FedtuneConfig, labels: LabelMap, run: RunDir):
    """(model, ServerState) before round 1: the model's initial adapter is the global one."""
    model = model_for_config(cfg, len(labels))
    initial = get_adapter_state(model)
    state = ServerState(cfg=cfg, labels=labels, run=run, initial=initial, arrays=initial,
                        frozen=frozen_fingerprint(model), data=data_fingerprint(cfg))
    return model, state
