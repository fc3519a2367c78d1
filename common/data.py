"""Text-classification data: loaders, the federation's label mapping, and splits.

Sources (the `data` and `heldout-data` config keys):
- `packaged:chatterbot` - the chatterbot-corpus English dialogs: utterance -> category;
- a CSV, TSV, JSONL or Parquet file with configurable text and label columns;
- `hf:<dataset>[:<split>]` - a Hugging Face dataset (needs the network and `datasets`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from common.errors import DataError

PACKAGED_CHATTERBOT = "packaged:chatterbot"
HF_PREFIX = "hf:"


@dataclass
class TextDataset:
    """Texts, their raw label names, and any other columns (for natural partitioning)."""

    texts: list[str]
    labels: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # e.g. token ids

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> TextDataset:
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
            source=self.source,
        )


@dataclass(frozen=True)
class LabelMap:
    """One label order for the whole federation: label name <-> class index."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels) -> LabelMap:
        return cls(tuple(sorted(set(labels), key=_label_sort_key)))

    @classmethod
    def parse(cls, spec: str) -> LabelMap:
        return cls(tuple(n.strip() for n in spec.split(",") if n.strip()))

    def to_spec(self) -> str:
        bad = [n for n in self.names if "," in n]
        if bad:
            raise DataError(f"labels: expected names without commas, got {bad}")
        return ",".join(self.names)

    def encode(self, labels: list[str], *, where: str) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        unknown = sorted(set(labels) - set(index), key=_label_sort_key)
        if unknown:
            raise DataError(f"{where}: label(s) {unknown[:10]} are not in the federation's labels {list(self.names)}")
        return np.array([index[label] for label in labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)


def _label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


@functools.lru_cache(maxsize=8)
def load_source(
    source: str,
    *,
    data_format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    column_names: str = "",
) -> TextDataset:
    """Load one data source; cached so a process reads and parses each file once."""
    if source == PACKAGED_CHATTERBOT:
        return load_chatterbot()
    if source.startswith(HF_PREFIX):
        return load_hf(source[len(HF_PREFIX) :], text_column=text_column, label_column=label_column)
    return load_file(
        source, data_format=data_format, text_column=text_column, label_column=label_column, column_names=column_names
    )


def forget_read_files() -> None:
    """Drop every file read and parsed so far: a long-lived process (a node's warm worker) reads a file that
    changed on disk again instead of serving it from these path-keyed caches."""
    load_source.cache_clear()
    load_instructions.cache_clear()


def load_chatterbot() -> TextDataset:
    """Every English utterance of chatterbot-corpus, labelled with its file's category.

    Exact duplicates within a category are kept once; texts that occur under two
    categories are dropped, since no classifier can get them right.
    """
    seen: dict[str, str] = {}
    ambiguous: set[str] = set()
    for category, conversation in _chatterbot_conversations():
        for utterance in conversation:
            if not isinstance(utterance, str) or not utterance.strip():
                continue
            text = " ".join(utterance.split())
            if seen.setdefault(text, category) != category:
                ambiguous.add(text)
    items = [(t, c) for t, c in seen.items() if t not in ambiguous]
    return TextDataset(
        texts=[t for t, _ in items],
        labels=[c for _, c in items],
        columns={"category": [c for _, c in items]},
        source=PACKAGED_CHATTERBOT,
    )


@functools.lru_cache(maxsize=8)
def load_instructions(
    source: str,
    *,
    data_format: str = "auto",
    instruction_column: str = "instruction",
    input_column: str = "input",
    response_column: str = "response",
    group_column: str = "",
    column_names: str = "",
) -> TextDataset:
    """Instruction data for causal-LM tuning: `texts` hold the instructions, `columns` the
    optional "input" and the "response"; `labels` hold each example's group (the value of
    `group_column`, or "all"), which only the non-IID partitioners use."""
    if source == PACKAGED_CHATTERBOT:
        return load_chatterbot_pairs()
    if source.startswith(HF_PREFIX):
        rows, where = _hf_rows(source[len(HF_PREFIX) :]), source
    else:
        file = existing_file(source)
        rows, where = _read_rows(file, data_format, column_names), str(file)
    if not rows:
        raise DataError(f"{where}: expected at least one row, found none")
    found = list(rows[0].keys())
    required = [instruction_column, response_column] + ([group_column] if group_column else [])
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(
            f"{where}: expected columns {required} (instruction, response{', group' if group_column else ''}), "
            f"found columns {found}; set instruction-column/response-column/group-column"
        )
    instructions, inputs, responses, groups, bad = [], [], [], [], []
    for line, row in enumerate(rows, start=1):
        instruction, response = row.get(instruction_column), row.get(response_column)
        if instruction is None or response is None or not str(instruction).strip() or not str(response).strip():
            bad.append(line)
            continue
        instructions.append(str(instruction))
        responses.append(str(response))
        extra = row.get(input_column)
        inputs.append("" if extra is None else str(extra))
        groups.append(_label_str(row[group_column]) if group_column else "all")
    if bad:
        raise DataError(
            f"{where}: expected an instruction and a response in every row, rows {bad[:10]} have an empty one"
        )
    return TextDataset(
        texts=instructions, labels=groups, columns={"input": inputs, "response": responses}, source=where
    )


def load_chatterbot_pairs() -> TextDataset:
    """chatterbot-corpus as instruction data: every utterance and the reply that follows it in
    a conversation, grouped by the file's category (a natural non-IID split)."""
    instructions, responses, groups = [], [], []
    seen = set()
    for category, conversation in _chatterbot_conversations():
        turns = [" ".join(u.split()) for u in conversation if isinstance(u, str) and u.strip()]
        for prompt, reply in pairwise(turns):
            if (prompt, reply) not in seen:
                seen.add((prompt, reply))
                instructions.append(prompt)
                responses.append(reply)
                groups.append(category)
    return TextDataset(
        texts=instructions,
        labels=groups,
        columns={"input": [""] * len(groups), "response": responses, "category": list(groups)},
        source=PACKAGED_CHATTERBOT,
    )


def _chatterbot_conversations():
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"data: expected chatterbot-corpus YAML files in {folder}, found none")
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = str(doc["categories"][0]).strip().lower()
        for conversation in doc.get("conversations", []):
            yield category, conversation


def _read_rows(file: Path, data_format: str, column_names: str) -> list[dict]:
    fmt = _detect_format(file) if data_format == "auto" else data_format
    names = [c.strip() for c in column_names.split(",") if c.strip()] or None
    if fmt == "parquet":
        return _read_parquet(file)
    blob = file.read_bytes()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        line = blob[: err.start].count(b"\n") + 1
        raise DataError(
            f"{file}:{line}: expected UTF-8 text, got the byte {blob[err.start]:#04x}, which is not "
            "UTF-8 (save the file as UTF-8)"
        ) from None
    if fmt in ("csv", "tsv"):
        return _read_delimited(file, text, "\t" if fmt == "tsv" else ",", names)
    return _read_jsonl(file, text)


def _hf_rows(spec: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError("data: 'hf:' sources need the `datasets` package: pip install 'fedtune[hub]'") from None
    name, _, split = spec.partition(":")
    repo, _, subset = name.partition("@")
    return datasets.load_dataset(repo, subset or None, split=split or "train").to_list()


def existing_file(path: str) -> Path:
    """The data file at `path`, or a DataError that says what is there instead."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise DataError(
            f"data: expected a CSV/TSV/JSONL/Parquet file, got {path!r}, which is a folder; name a file in it"
        )
    if not file.is_file():
        raise DataError(f"data: expected an existing CSV/TSV/JSONL/Parquet file, got {path!r} (not found)")
    return file


def load_file(
    path: str,
    *,
    data_format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    column_names: str = "",
) -> TextDataset:
    """Load a CSV, TSV, JSONL or Parquet file with the named text and label columns."""
    file = existing_file(path)
    rows = _read_rows(file, data_format, column_names)
    if not rows:
        raise DataError(f"{path}: expected at least one row, found none")
    found = list(rows[0].keys())
    missing = [c for c in (text_column, label_column) if c not in found]
    if missing:
        raise DataError(
            f"{path}: expected columns {text_column!r} (text) and {label_column!r} (label), "
            f"found columns {found}; set text-column/label-column, or column-names for a file without header"
        )
    texts, labels, bad = [], [], []
    for line, row in enumerate(rows, start=1):
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or str(text).strip() == "" or str(label).strip() == "":
            bad.append(line)
            continue
        texts.append(str(text))
        labels.append(_label_str(label))
    if bad:
        raise DataError(f"{path}: expected a text and a label in every row, rows {bad[:10]} have an empty one")
    others = {c: [str(r.get(c, "")) for r in rows] for c in found if c not in (text_column, label_column)}
    return TextDataset(texts=texts, labels=labels, columns=others, source=str(file))


def _label_str(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _detect_format(file: Path) -> str:
    suffix = file.suffix.lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if suffix not in formats:
        raise DataError(f"{file}: expected a .csv, .tsv, .jsonl or .parquet file (or set data-format), got {suffix!r}")
    return formats[suffix]


def _read_delimited(file: Path, text: str, delimiter: str, names: list[str] | None) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
    try:
        header = names or next(reader, None)
        if header is None:
            return []
        rows = []
        for line, values in enumerate(reader, start=2 if names is None else 1):
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(f"{file}:{line}: expected {len(header)} fields ({header}), got {len(values)}")
            rows.append(dict(zip(header, values, strict=True)))
    except csv.Error as err:  # e.g. a field over csv's limit: usually a quote that is never closed
        raise DataError(
            f"{file}:{reader.line_num}: expected {'tab' if delimiter == chr(9) else 'comma'}-separated "
            f"fields, got {err} (an unclosed quote?)"
        ) from None
    return rows


def _read_jsonl(file: Path, text: str) -> list[dict]:
    rows = []
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{line}: expected one JSON object per line, got invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{file}:{line}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(file: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()
    except Exception as err:  # pyarrow raises several types for bad files
        raise DataError(f"{file}: expected a Parquet file, could not read it ({err})") from None


def load_hf(spec: str, *, text_column: str, label_column: str) -> TextDataset:
    """A Hugging Face dataset by name: 'name', 'name:split' or 'name/config:split'."""
    try:
        import datasets
    except ImportError:
        raise DataError("data: 'hf:' sources need the `datasets` package: pip install 'fedtune[hub]'") from None
    name, _, split = spec.partition(":")
    repo, _, subset = name.partition("@")
    ds = datasets.load_dataset(repo, subset or None, split=split or "train")
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"hf:{spec}: expected columns {[text_column, label_column]}, found {ds.column_names}")
    labels = ds[label_column]
    feature = ds.features[label_column]
    if hasattr(feature, "int2str"):
        labels = [feature.int2str(v) for v in labels]
    return TextDataset(
        texts=[str(t) for t in ds[text_column]], labels=[_label_str(v) for v in labels], source=f"hf:{spec}"
    )


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) with about `fraction` of each label held out; deterministic."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label, key=_label_sort_key):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.extend(idx[:n_held].tolist())
        keep.extend(idx[n_held:].tolist())
    return np.sort(np.array(keep, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def label_histogram(labels: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items(), key=lambda kv: _label_sort_key(kv[0])))


def subsample(ds: TextDataset, limit: int, seed: int) -> TextDataset:
    if limit <= 0 or limit >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.subset(np.sort(rng.choice(len(ds), size=limit, replace=False)))
