"""What the server holds during a run, and the state a run starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord

from common.config import FedtuneConfig
from common.data import LabelMap
from common.federation_data import data_fingerprint, federation_labels
from common.ledger import Ledger
from common.model import check_adapter_state, frozen_fingerprint, get_adapter_state
from common.records import FROZEN_KEY
from common.task import Task, task_for
from server.rundir import RunDir

if TYPE_CHECKING:
    from common.privacy_plan import DistributedPlan
    from server.distributed_dp import ServerAdamW
    from server.tensorboard import Scalars


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
    scalars: Scalars | None = None  # once the run knows its first round
    run_id: int = 0  # Flower's run id (a resumed run gets a new one): clients' own privacy records name it
    secagg_keys: list[str] = field(default_factory=list)  # digests of every public key a secure round accepted
    dp_plan: DistributedPlan | None = None  # with dp-mode = distributed
    dp_optimizer: ServerAdamW | None = None  # likewise

    @property
    def distributed_plan(self) -> DistributedPlan:
        """The distributed DP plan the ledger accounts; only a run with dp-mode = distributed has one."""
        if self.dp_plan is None:
            raise RuntimeError("distributed DP: the run has no plan (dp-mode is not distributed)")
        return self.dp_plan

    @property
    def task(self) -> Task:
        return task_for(self.cfg)

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
    """The federation's labels, and the config every client gets (the task decides whether it names them)."""
    labels = federation_labels(cfg)
    return task_for(cfg).with_labels(labels), labels


def initial_state(cfg: FedtuneConfig, labels: LabelMap, run: RunDir):
    """(model, ServerState) before round 1: the model's initial adapter is the global one."""
    model = task_for(cfg).model(len(labels))
    initial = get_adapter_state(model)
    state = ServerState(
        cfg=cfg,
        labels=labels,
        run=run,
        initial=initial,
        arrays=initial,
        frozen=frozen_fingerprint(model),
        data=data_fingerprint(cfg),
    )
    return model, state


def conform_to_schema(initial: dict, aggregated: dict) -> dict:
    """The server's own aggregate, in the initial adapter's dtypes (I2).

    Flower's FedOpt family computes in float64; the global adapter stays float32. Keys and
    shapes must already match: anything else is a bug and raises.
    """
    cast = {k: v.astype(initial[k].dtype, copy=False) if k in initial else v for k, v in aggregated.items()}
    check_adapter_state(initial, cast)
    return cast
