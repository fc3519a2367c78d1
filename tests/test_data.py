"""Loaders, label mapping and splits (RELIABILITY: bad inputs - data files)."""

from __future__ import annotations

import json

import pytest

from common.config import FedtuneConfig
from common.data import LabelMap, load_chatterbot, load_file, stratified_split
from common.errors import DataError
from common.federation_data import deployed_client_data, federation_labels, simulated_client_data, train_and_heldout
from tests.conftest import require_shared
from tests.reliability import count

ROWS = [("good movie", "pos"), ("bad plot, worse acting", "neg"), ("loved it", "pos"), ("boring", "neg")]


def write(tmp_path, fmt: str, header: bool = True):
    path = tmp_path / f"data.{fmt}"
    if fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t" if fmt == "tsv" else ",")
            if header:
                writer.writerow(["review", "sentiment"])
            writer.writerows(ROWS)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"review": t, "sentiment": l}) + "\n" for t, l in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"review": [t for t, _ in ROWS], "sentiment": [l for _, l in ROWS]}), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_each_file_format_loads_by_configuration(tmp_path, fmt):
    ds = load_file(str(write(tmp_path, fmt)), text_column="review", label_column="sentiment")
    assert ds.texts == [t for t, _ in ROWS]
    assert ds.labels == [l for _, l in ROWS]


def test_headerless_csv_with_column_names(tmp_path):
    path = write(tmp_path, "csv", header=False)
    ds = load_file(str(path), column_names="review,sentiment", text_column="review", label_column="sentiment")
    assert len(ds) == 4 and ds.labels[1] == "neg"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.csv", "not found"),
    (lambda p: (p / "x.txt").write_text("a") and p / "x.txt", "expected a .csv"),
    (lambda p: (p / "e.csv").write_text("review,sentiment\n") and p / "e.csv", "at least one row"),
    (lambda p: (p / "c.csv").write_text("text,stars\nhi,1\n") and p / "c.csv", "expected columns"),
    (lambda p: (p / "b.csv").write_text("review,sentiment\nhi,\n") and p / "b.csv", "empty"),
    (lambda p: (p / "r.csv").write_text("review,sentiment\nhi,1,extra\n") and p / "r.csv", "expected 2 fields"),
    (lambda p: (p / "j.jsonl").write_text("{not json\n") and p / "j.jsonl", "invalid JSON"),
    (lambda p: (p / "l.jsonl").write_text("[1, 2]\n") and p / "l.jsonl", "JSON object"),
    (lambda p: (p / "p.parquet").write_text("not parquet") and p / "p.parquet", "Parquet"),
    # Hardening class 7: these were raw tracebacks (UnicodeDecodeError, csv.Error)
    (lambda p: (p / "latin1.csv").write_bytes("review,sentiment\nfine,pos\ncaf\xe9,neg\n".encode("latin-1"))
     and p / "latin1.csv", r"latin1.csv:3: expected UTF-8 text, got the byte 0xe9"),
    (lambda p: (p / "big.csv").write_text('review,sentiment\n"' + "x" * 200_000 + '",pos\n') and p / "big.csv",
     r"big.csv:\d+: expected comma-separated fields, got field larger than field limit"),
    (lambda p: (p / "dir.csv").mkdir() or p / "dir.csv", "which is a folder; name a file in it"),  # said "not found" (issue 39)
])
def test_bad_files_are_refused_with_a_clear_message(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_file(str(make(tmp_path)), text_column="review", label_column="sentiment")
    count("bad_inputs_rejected", f"data file: {message}")


def test_chatterbot_is_real_multiclass_and_unambiguous():
    ds = load_chatterbot()
    assert len(ds) > 1000
    assert len(set(ds.labels)) >= 15
    assert len(set(ds.texts)) == len(ds.texts)
    assert ds.columns["category"] == ds.labels


def test_label_map_refuses_unknown_labels():
    labels = LabelMap.from_labels(["b", "a", "10", "9"])
    assert labels.names == ("9", "10", "a", "b")
    assert labels.encode(["a", "9"], where="t").tolist() == [2, 0]
    with pytest.raises(DataError, match=r"label\(s\) \['zzz'\] are not in the federation's labels"):
        labels.encode(["a", "zzz"], where="client 3")


def test_client_file_with_unknown_label_is_a_clear_error(tmp_path):
    path = write(tmp_path, "csv")
    cfg = FedtuneConfig(labels="pos,neutral", text_column="review", label_column="sentiment")
    with pytest.raises(DataError, match="client site-a: label"):
        deployed_client_data(cfg, {"data-path": str(path), "client-id": "site-a"})


def test_stratified_split_keeps_every_label_on_both_sides_and_is_deterministic():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 3
    keep, held = stratified_split(labels, 0.2, seed=1)
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == len(labels)
    assert {labels[i] for i in held} == {"a", "b", "c"}
    assert (stratified_split(labels, 0.2, seed=1)[1] == held).all()


def test_simulated_clients_are_disjoint_and_cover_the_pool():
    cfg = FedtuneConfig(partitioner="iid")
    cfg = cfg.replace(labels=federation_labels(cfg).to_spec())
    pool, heldout = train_and_heldout(cfg)
    parts = [simulated_client_data(cfg, p, 4) for p in range(4)]
    texts = [t for c in parts for t in c.train.texts + c.val.texts]
    assert sorted(texts) == sorted(pool.texts)
    assert set(texts).isdisjoint(heldout.texts)
    assert all(len(c.val) > 0 for c in parts)


def test_sst2_layout_loads_by_configuration_alone():
    train = require_shared("sst2", "train.tsv")
    cfg = FedtuneConfig(data=str(train), heldout_data=str(train.parent / "dev.tsv"), text_column="sentence",
                        label_column="label", max_train_examples=500)
    pool, heldout = train_and_heldout(cfg)
    assert len(pool) == 500 and len(heldout) == 872
    assert federation_labels(cfg).names == ("0", "1")


def test_ag_news_layout_loads_by_configuration_alone():
    train = require_shared("ag_news", "train.csv")
    cfg = FedtuneConfig(data=str(train), heldout_data=str(train.parent / "dev.csv"), column_names="text,label")
    pool, heldout = train_and_heldout(cfg)
    assert len(pool) == 5000 and len(heldout) == 1000
    assert federation_labels(cfg).names == ("0", "1", "2", "3")


def test_a_label_only_in_the_held_out_file_is_refused(tmp_path):
    """Hardening class 5: it used to become a class no client could learn, silently."""
    train, held = tmp_path / "train.csv", tmp_path / "held.csv"
    train.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8)))
    held.write_text("text,label\nx,a\ny,b\nz,c\n")
    cfg = FedtuneConfig(data=str(train), heldout_data=str(held))
    with pytest.raises(DataError, match=r"expected its labels among the training data's \['a', 'b'\], got \['c'\] only in"):
        federation_labels(cfg)
    count("bad_inputs_rejected", "a label only in the held-out file")
