"""The task a run trains, as a type: one class per task, chosen once from the config (`task_for`).

What differs between tasks lives in its class, and the apps call these methods without asking
which task they run:

- data: the columns it reads (`data_keys`) and how (`read`), its labels (`check_labels`,
  `check_client_labels`, `with_labels`);
- model: `device` (the one place a device is resolved and the precision settings checked) and
  `model` (the base with LoRA on it, cached per process; `fresh=True` builds one the caller may
  change, as export's merge does);
- encoding and scoring: `encode`, `score` and `metrics` (the held-out figures a round reports,
  in order);
- reports: `report` (each round's: the per-class table and confusion matrix, or generations for
  fixed prompts), `final_report`, what `fedtune evaluate` writes (`evaluation_report`,
  `write_evaluation`) and what an export adds (`export_extras`).

A third task is one more subclass: it sets `name`, `data_keys` and `metrics` and
writes `read`, `build`, `encode`, `score` and `report`, overriding the base class's other methods
where its task differs; then its name goes into TASKS here and into config.py's Task choices and
TASK_RULES (the settings only it reads, the best metrics it offers, the first being what
best-metric = auto picks). Nothing else changes.

Heavy modules (torch, transformers) are imported in the methods that need them, so that reading a
node's data or answering the server's query loads no model.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from common.config import FedtuneConfig
from common.data import LabelMap, TextDataset, load_instructions, load_source
from common.errors import DataError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from common.train import EncodedData


class Task(ABC):
    name: ClassVar[str]
    data_keys: ClassVar[tuple[str, ...]]  # the run-config (and node-config) keys that say how to read its data
    metrics: tuple[str, ...]  # held-out figures of a round, in the order they are reported

    def __init__(self, cfg: FedtuneConfig) -> None:
        self.cfg = cfg

    # --- data ---------------------------------------------------------------------------------------

    @classmethod
    def read(cls, source: str, options: Mapping) -> TextDataset:
        """Read one source; `options` holds the task's data_keys (missing ones take the config's defaults)."""
        defaults = FedtuneConfig().to_run_config()
        opt = {k.replace("-", "_"): str(options.get(k, defaults[k])) for k in cls.data_keys}
        fmt = opt.pop("data_format")
        return cls._read(source, fmt, opt)

    @classmethod
    @abstractmethod
    def _read(cls, source: str, data_format: str, options: dict) -> TextDataset: ...

    def read_source(self, source: str, overrides: Mapping | None = None) -> TextDataset:
        """Read `source` with the run's data options (a deployed node's config may rename its columns)."""
        run = self.cfg.to_run_config()
        return self.read(source, {**{k: run[k] for k in self.data_keys}, **(overrides or {})})

    def check_labels(
        self, labels: LabelMap, pool: TextDataset | None = None, heldout: TextDataset | None = None
    ) -> None:
        """Refuse a federation whose labels (found in `pool` and `heldout` when given) cannot be learnt;
        nothing to check by default."""

    def check_client_labels(self, data: TextDataset, labels: Callable[[], LabelMap], *, where: str) -> None:
        """Refuse a client whose labels the federation's (`labels()`) do not hold; nothing to check by default."""

    def with_labels(self, labels: LabelMap) -> FedtuneConfig:
        """The config every client gets; by default the labels are only partition groups, not kept."""
        return self.cfg

    # --- model --------------------------------------------------------------------------------------

    def device(self, spec: str | None = None, *, where: str = "device") -> torch.device:
        """Where this task's model trains and scores: `spec` (a node's own setting) or the run's `device`,
        resolved on this machine and checked against compute-dtype and load-in."""
        from common.device import check_precision, resolve_device

        device = resolve_device(spec if spec is not None else self.cfg.device, where=where)
        check_precision(device, self.cfg.compute_dtype, self.cfg.load_in)
        return device

    def lora(self) -> dict:
        cfg = self.cfg
        return dict(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=tuple(cfg.target_modules),
            seed=cfg.seed,
            freeze_a=cfg.lora_freeze_a,
        )

    def model(self, num_labels: int, *, device: torch.device | None = None, fresh: bool = False) -> PeftModel:
        """The base model with its LoRA adapter: the process's cached one (moved to `device` when given),
        or with `fresh` a new one nobody else holds. A Hub name that cannot be fetched is one line."""
        from common.model import hub_model

        with hub_model(self.cfg.model):
            return self.build(num_labels, device=device, fresh=fresh)

    @abstractmethod
    def build(self, num_labels: int, *, device: torch.device | None, fresh: bool) -> PeftModel: ...

    def tokenizer(self):
        from common.model import load_tokenizer

        return load_tokenizer(self.cfg.model)

    # --- encoding and scoring -------------------------------------------------------------------------

    @abstractmethod
    def encode(self, data: TextDataset, tokenizer, labels: LabelMap, *, where: str) -> EncodedData: ...

    @abstractmethod
    def score(self, model, data: EncodedData, *, pad_id: int, num_labels: int, progress=None) -> dict:
        """The task's figures (`metrics`, and `examples`) of the model on encoded data."""

    # --- reports ------------------------------------------------------------------------------------

    @abstractmethod
    def report(
        self, folder: Path, server_round: int, result: dict, *, model, tokenizer, labels: LabelMap, heldout: TextDataset
    ) -> None:
        """What a round writes beside its metrics row, under the run directory `folder`."""

    def final_report(self, folder: Path, last_round: int) -> None:
        """What the end of a run adds; nothing by default."""

    def evaluation_report(self, result: dict, labels: LabelMap) -> dict:
        """`fedtune evaluate`'s figures of a clean scoring."""
        return {"examples": result["examples"], **{m: result[m] for m in self.metrics}}

    def write_evaluation(self, folder: Path, result: dict, labels: LabelMap, *, title: str) -> None:
        """Files `fedtune evaluate` writes beside evaluation.json; none by default."""

    def export_extras(self, out: Path) -> None:
        """Files an export adds beside the model; none by default."""

    def scoring_labels(self, data: TextDataset, *, where: str) -> LabelMap:
        """The label order to score a file with (`fedtune evaluate`)."""
        return LabelMap.from_labels(data.labels)


def write_class_report(folder: Path, server_round: int, result: dict, names) -> None:
    """heldout/round-NNNN.json (per-class precision, recall, F1, support; the confusion matrix) and
    heldout/round-NNNN-confusion.csv."""
    from common.metrics import class_report, write_confusion_csv

    out = folder / "heldout"
    out.mkdir(exist_ok=True)
    extra = {"exact_match": result["exact_match"]} if "exact_match" in result else {}
    (out / f"round-{server_round:04d}.json").write_text(
        json.dumps({"round": server_round, **class_report(result, names), **extra}, indent=1) + "\n"
    )
    write_confusion_csv(out / f"round-{server_round:04d}-confusion.csv", result["confusion"], names)


def plot_last_confusion(folder: Path, last_round: int) -> None:
    """heldout/confusion.png of the last round, for a look at which classes fail."""
    import numpy as np

    from common.metrics import plot_confusion

    report = json.loads((folder / "heldout" / f"round-{last_round:04d}.json").read_text())
    plot_confusion(
        folder / "heldout" / "confusion.png",
        np.array(report["confusion"]["counts"]),
        report["confusion"]["labels"],
        f"held-out set, round {last_round}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}",
    )


def write_confusion(folder: Path, result: dict, names, *, title: str) -> None:
    """`fedtune evaluate`'s confusion.csv and confusion.png."""
    from common.metrics import plot_confusion, write_confusion_csv

    write_confusion_csv(folder / "confusion.csv", result["confusion"], names)
    plot_confusion(
        folder / "confusion.png",
        result["confusion"],
        names,
        f"{title}: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}",
    )


class Classification(Task):
    """Sequence classification: a text and its label; a linear head on the pooled states."""

    name = "classification"
    data_keys = ("data-format", "column-names", "text-column", "label-column")
    metrics = ("loss", "accuracy", "macro_f1")

    @classmethod
    def _read(cls, source: str, data_format: str, options: dict) -> TextDataset:
        return load_source(source, data_format=data_format, **options)

    def check_labels(
        self, labels: LabelMap, pool: TextDataset | None = None, heldout: TextDataset | None = None
    ) -> None:
        if pool is None or heldout is None:
            return
        unlearnable = sorted(set(heldout.labels) - set(pool.labels))
        if unlearnable:
            raise DataError(
                f"held-out set: expected its labels among the training data's {sorted(set(pool.labels))}, "
                f"got {unlearnable} only in {self.cfg.heldout_data or self.cfg.data!r}: no client could "
                "learn them"
            )
        if len(labels) < 2:
            raise DataError(f"labels: expected at least 2 classes, got {list(labels.names)}")

    def check_client_labels(self, data: TextDataset, labels: Callable[[], LabelMap], *, where: str) -> None:
        labels().encode(data.labels, where=where)  # raises on a label the federation does not know

    def with_labels(self, labels: LabelMap) -> FedtuneConfig:
        return self.cfg.replace(labels=labels.to_spec())  # one label order for every client

    def scoring_labels(self, data: TextDataset, *, where: str) -> LabelMap:
        labels = LabelMap.parse(self.cfg.labels)
        unseen = sorted(set(data.labels) - set(labels.names))
        if unseen:
            raise DataError(
                f"{where}: expected the run's labels {list(labels.names)}, got labels the run "
                f"never saw: {unseen[:10]}{' ...' if len(unseen) > 10 else ''}"
            )
        return labels

    def build(self, num_labels: int, *, device: torch.device | None, fresh: bool) -> PeftModel:
        from common.model import build_lora_model, load_lora_model

        model = (build_lora_model if fresh else load_lora_model)(self.cfg.model, num_labels, **self.lora())
        return model if device is None else model.to(device)

    def encode(self, data: TextDataset, tokenizer, labels: LabelMap, *, where: str) -> EncodedData:
        from common.train import encode

        return encode(data, tokenizer, labels, max_length=self.cfg.max_length, where=where)

    def score(self, model, data: EncodedData, *, pad_id: int, num_labels: int, progress=None) -> dict:
        from common.train import evaluate

        return evaluate(
            model,
            data,
            pad_id=pad_id,
            batch_size=self.cfg.eval_batch_size,
            num_labels=num_labels,
            compute_dtype=self.cfg.compute_dtype,
            progress=progress,
        )

    def report(
        self, folder: Path, server_round: int, result: dict, *, model, tokenizer, labels: LabelMap, heldout: TextDataset
    ) -> None:
        write_class_report(folder, server_round, result, labels.names)

    def final_report(self, folder: Path, last_round: int) -> None:
        plot_last_confusion(folder, last_round)

    def evaluation_report(self, result: dict, labels: LabelMap) -> dict:
        from common.metrics import class_report

        return class_report(result, labels.names)

    def write_evaluation(self, folder: Path, result: dict, labels: LabelMap, *, title: str) -> None:
        write_confusion(folder, result, labels.names, title=title)

    def export_extras(self, out: Path) -> None:
        """The label names, so a user can read the predictions."""
        (out / "fedtune-labels.json").write_text(json.dumps(list(LabelMap.parse(self.cfg.labels).names)))


class CausalLM(Task):
    """Instruction tuning of a causal LM: an instruction (and input) and its response; the loss on the
    response's tokens only (common/lm.py)."""

    name = "causal-lm"
    data_keys = ("data-format", "column-names", "instruction-column", "input-column", "response-column", "group-column")
    metrics: tuple[str, ...] = ("loss", "perplexity")
    choice_metrics = ("accuracy", "macro_f1", "exact_match")

    def __init__(self, cfg: FedtuneConfig) -> None:
        super().__init__(cfg)
        from common.lm import choice_list

        self.choices = choice_list(cfg.choices)
        if self.choices:  # a closed set of responses: scored as classification too
            self.metrics = (*CausalLM.metrics, *self.choice_metrics)

    @classmethod
    def _read(cls, source: str, data_format: str, options: dict) -> TextDataset:
        return load_instructions(source, data_format=data_format, **options)

    def build(self, num_labels: int, *, device: torch.device | None, fresh: bool) -> PeftModel:
        """A quantized base (load-in) is placed as it loads, on `device` or where the run's device
        resolves; a fresh model is always full precision (export puts a QLoRA adapter on it: its
        weights are float32 with the same names either way, and a merge into a 4-bit base would round
        the merged weights back to 4 bits)."""
        from common.lm import build_lora_causal_lm, load_lora_causal_lm

        if fresh:
            return build_lora_causal_lm(self.cfg.model, **self.lora(), load_in="none")
        quantized = self.cfg.load_in != "none"
        if quantized:
            device = device or self.device()
        model = load_lora_causal_lm(
            self.cfg.model,
            **self.lora(),
            load_in=self.cfg.load_in,
            **({"device": str(device), "compute_dtype": self.cfg.compute_dtype} if quantized else {}),
        )
        return model if quantized or device is None else model.to(device)

    def encode(self, data: TextDataset, tokenizer, labels: LabelMap, *, where: str) -> EncodedData:
        from common.lm import encode_choices, encode_lm

        if self.choices:
            template, length = self.cfg.prompt_template, self.cfg.max_length
            return encode_choices(data, tokenizer, self.choices, template=template, max_length=length, where=where)
        return encode_lm(
            data, tokenizer, template=self.cfg.prompt_template, max_length=self.cfg.max_length, packing=self.cfg.packing
        )

    def score(self, model, data: EncodedData, *, pad_id: int, num_labels: int, progress=None) -> dict:
        from common.lm import ChoiceData, score_choices
        from common.train import evaluate_lm

        result = evaluate_lm(
            model,
            data,
            pad_id=pad_id,
            batch_size=self.cfg.eval_batch_size,
            compute_dtype=self.cfg.compute_dtype,
            progress=progress,
        )
        if isinstance(data, ChoiceData):
            chosen = score_choices(
                model,
                data,
                self.tokenizer(),
                pad_id=pad_id,
                batch_size=self.cfg.eval_batch_size,
                compute_dtype=self.cfg.compute_dtype,
            )
            result |= {k: v for k, v in chosen.items() if k != "choice_log_likelihood"}
        return result

    def report(
        self, folder: Path, server_round: int, result: dict, *, model, tokenizer, labels: LabelMap, heldout: TextDataset
    ) -> None:
        """Generations for the fixed sample prompts, appended to samples.jsonl (a resumed run rewrites
        the rounds after its checkpoint); with choices, the classification report too."""
        from common.lm import generate, sample_prompts

        cfg = self.cfg
        if self.choices:
            write_class_report(folder, server_round, result, self.choices)
        prompts = sample_prompts(cfg.sample_prompts, heldout)
        outputs = generate(
            model,
            tokenizer,
            prompts,
            template=cfg.prompt_template,
            max_new_tokens=cfg.max_new_tokens,
            max_length=cfg.max_length,
        )
        path = folder / "samples.jsonl"
        kept = (
            [line for line in path.read_text().splitlines() if json.loads(line)["round"] < server_round]
            if path.exists()
            else []
        )
        rows = [
            json.dumps({"round": server_round, "prompt": p, "response": o})
            for p, o in zip(prompts, outputs, strict=True)
        ]
        path.write_text("".join(line + "\n" for line in kept + rows))

    def final_report(self, folder: Path, last_round: int) -> None:
        if self.choices:
            plot_last_confusion(folder, last_round)

    def evaluation_report(self, result: dict, labels: LabelMap) -> dict:
        from common.metrics import class_report

        report = {
            "examples": result["examples"],
            "tokens": result["tokens"],
            "loss": result["loss"],
            "perplexity": result["perplexity"],
        }
        if self.choices:
            report |= {**class_report(result, self.choices), "exact_match": result["exact_match"]}
        return report

    def write_evaluation(self, folder: Path, result: dict, labels: LabelMap, *, title: str) -> None:
        if self.choices:
            write_confusion(folder, result, self.choices, title=title)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Classification, CausalLM)}
DATA_KEYS = {name: cls.data_keys for name, cls in TASKS.items()}


def task_for(cfg: FedtuneConfig) -> Task:
    """The task the run's config names."""
    return TASKS[cfg.task](cfg)
