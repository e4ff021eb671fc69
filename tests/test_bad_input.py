"""Bad input stops with a message naming the file, line or key, and writes nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data import DataError, DomainRanges, PreparedDataset, read_inter
from data.fingerprints import file_digest
from data.paths import PROJECT_ROOT
from dataset.prepare import prepare_dataset, prepare_files
from dataset.raw import file_users, read_kept_rows
from core.errors import ConfigError
from pipeline.settings import stage_config
from tests.helpers import RAW_HEADER, write_raw
from tests.test_prepare import DOM1, DOM2, SETTINGS

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def prepare_two(tmp_path, dom1_text: str, dom2_rows=DOM2, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    d1 = tmp_path / "D1.inter"
    d1.write_text(dom1_text, encoding="utf-8")
    d2 = write_raw(tmp_path / "D2.inter", dom2_rows)
    return prepare_files([d1, d2], tmp_path / "OUT", "OUT", **(settings or SETTINGS))


def raw_text(rows) -> str:
    return RAW_HEADER + "".join("\t".join(map(str, r)) + "\n" for r in rows)


# --------------------------------------------------------------------------- raw files


def test_missing_raw_file(tmp_path):
    with pytest.raises(DataError, match=r"D1\.inter: raw file not found"):
        prepare_files([tmp_path / "D1.inter", write_raw(tmp_path / "D2.inter", DOM2)], tmp_path / "OUT", "OUT")


def test_missing_column(tmp_path):
    text = "user_id:token\titem_id:token\trating:float\n" + "u1\ti1\t3\n"
    with pytest.raises(DataError, match=r"D1\.inter, line 1: missing column\(s\) timestamp"):
        prepare_two(tmp_path, text)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("u9\t10\t3\t101\textra", r"line 4: expected 4 tab-separated fields"),
        ("u9\t10\t3", r"line 4: expected 4 tab-separated fields"),
        ("u9\t10\t3\tyesterday", r"line 4: timestamp must be a number, got 'yesterday'"),
        ("u9\t10\tfive\t101", r"line 4: rating must be a number"),
        ("\t10\t3\t101", r"line 4: empty user_id"),
    ],
)
def test_malformed_raw_row_names_the_line(tmp_path, bad_line, message):
    lines = raw_text(DOM1).splitlines(keepends=True)
    lines[3] = bad_line + "\n"  # line 4 of the file
    with pytest.raises(DataError, match=r"D1\.inter, " + message):
        prepare_two(tmp_path, "".join(lines))
    assert not (tmp_path / "OUT").exists()


def test_raw_file_without_rating_column_is_accepted(tmp_path):
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    text = header + "".join(f"{u}\t{i}\t{t}\n" for u, i, _, t in DOM1)
    prepare_two(tmp_path, text)
    assert (tmp_path / "OUT" / "OUT.item").is_file()


def test_fewer_than_two_domains(tmp_path):
    with pytest.raises(DataError, match="at least two"):
        prepare_files([write_raw(tmp_path / "D1.inter", DOM1)], tmp_path / "OUT", "OUT")


def test_domain_left_empty_by_filtering(tmp_path):
    # Nobody has two D2 interactions with items taken twice: D2 empties, and names itself.
    sparse = [("u10", "a", 1, 1), ("u9", "b", 1, 2), ("u5", "c", 1, 3)]
    with pytest.raises(DataError, match=r"filtering left domain\(s\) dom2 \(D2\) empty"):
        prepare_two(tmp_path, raw_text(DOM1), sparse)
    assert not (tmp_path / "OUT").exists()


def test_domain_with_no_rows(tmp_path):
    with pytest.raises(DataError, match=r"D2\.inter: domain 'D2' has no interactions"):
        prepare_two(tmp_path, raw_text(DOM1), [])


def test_a_raw_file_that_changes_between_the_passes(tmp_path):
    path = write_raw(tmp_path / "D1.inter", DOM1)
    users, lines = file_users(path)
    for counted in (lines - 1, lines + 1):  # lines appended, or removed, after the first pass
        with pytest.raises(DataError, match=r"D1\.inter: the file changed while it was read"):
            read_kept_rows(path, users, counted)


def test_empty_split(tmp_path):
    # Cut to 4 items, nobody keeps two dom1 items in the training part.
    with pytest.raises(DataError, match=r"split dom1\.train is empty"):
        prepare_two(tmp_path, raw_text(DOM1), user_core=2, item_core=2, max_seq_len=4)
    assert not (tmp_path / "OUT").exists()


def test_impossible_thresholds(tmp_path):
    with pytest.raises(DataError, match="max_seq_len must be a positive integer"):
        prepare_two(tmp_path, raw_text(DOM1), user_core=2, item_core=2, max_seq_len=0)


def test_command_line_reports_a_missing_raw_file_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dataset.prepare", "dataset=BEST", f"dataset.raw_dir={tmp_path}",
         f"data_path={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert f"error: {tmp_path}/Amazon_Books.inter: raw file not found" in result.stderr
    assert not (tmp_path / "out" / "BEST").exists()


# --------------------------------------------------------------------------- contract files


def write_inter_text(path, body: str, header: str = INTER_HEADER):
    path.write_text(header + body, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("1\t1 2\t3\n2\t1\n", r"line 3: expected 3 tab-separated fields, got 2"),
        ("1\t1 2\t3\n2\t1 x\t3\n", r"line 3: item_id_list must hold integer ids"),
        ("1\t1  2\t3\n", r"line 2: item_id_list must hold integer ids separated by single spaces"),
        ("1\t1 2\t3\nu2\t1\t3\n", r"line 3: user_id must hold integer ids"),
        ("1\t1 2\t9\n", r"line 2: item id 9 is not an item id, expected 1\.\.4"),
        ("1\t0 2\t3\n", r"line 2: item id 0 is not an item id"),
        ("2\t1 2\t3\n1\t1\t3\n", r"line 3: rows must be sorted by user id"),
    ],
)
def test_malformed_inter_file_names_the_line(tmp_path, body, message):
    path = write_inter_text(tmp_path / "X.full.train.inter", body)
    with pytest.raises(DataError, match=r"X\.full\.train\.inter, " + message):
        read_inter(path, n_items=4)


def test_inter_file_with_a_wrong_header(tmp_path):
    path = write_inter_text(tmp_path / "X.inter", "1\t1\t2\n", header="user_id:token\titem_id:token\n")
    with pytest.raises(DataError, match=r"X\.inter, line 1: expected the header"):
        read_inter(path)


def test_missing_contract_files(tmp_path):
    with pytest.raises(DataError, match=r"no prepared dataset 'NOPE'; run `python -m dataset\.prepare dataset=NOPE`"):
        PreparedDataset(tmp_path, "NOPE")
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "X.item").write_text("1_A\n2_A\n1_B\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"X\.full\.train\.inter: file not found"):
        PreparedDataset(tmp_path, "X").rows("full.train")
    with pytest.raises(DataError, match=r"manifest\.json: file not found"):
        PreparedDataset(tmp_path, "X").manifest


def test_empty_split_file(tmp_path):
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "X.item").write_text("1_A\n2_A\n1_B\n", encoding="utf-8")
    split = write_inter_text(tmp_path / "X" / "X.dom1.test.inter", "")
    (tmp_path / "X" / "manifest.json").write_text(json.dumps({"files": {split.name: file_digest(split)}}))
    with pytest.raises(DataError, match=r"X\.dom1\.test\.inter: the split has no rows"):
        PreparedDataset(tmp_path, "X").rows("dom1.test")


@pytest.mark.parametrize(
    "tokens, message",
    [
        ("1_A\n1_B\n2_A\n", r"line 3: item '2_A' breaks the domain blocks"),
        ("1_A\n1_C\n", r"line 2: item '1_C' breaks the domain blocks"),
        ("1_B\n2_B\n", r"line 1: item '1_B' breaks the domain blocks"),
        ("1_A\nplain\n", r"line 2: item 'plain' breaks the domain blocks"),
        ("1_A\n2_A\n", r"found 1 domain\(s\); a multi-domain dataset needs at least two"),
        ("1_A\n\n1_B\n", r"line 2: expected one item token per line"),
    ],
)
def test_item_file_with_non_contiguous_domains(tmp_path, tokens, message):
    path = tmp_path / "X.item"
    path.write_text(tokens, encoding="utf-8")
    with pytest.raises(DataError, match=r"X\.item, " + message if "line" in message else message):
        DomainRanges.from_item_file(path)


def test_unknown_domain_and_split_names(acdt_dataset):
    with pytest.raises(ValueError, match=r"unknown domain 'dom9': this dataset has dom1, dom2, dom3, dom4"):
        acdt_dataset.path("dom9.train")
    with pytest.raises(ValueError, match=r"unknown split 'full\.training'"):
        acdt_dataset.path("full.training")
    with pytest.raises(ValueError, match=r"unknown domain 'target'"):
        acdt_dataset.domains.range("target")


# --------------------------------------------------------------------------- tokens, encodings, leftovers


@pytest.mark.parametrize("token", ["NA", "null", "N/A", "nan", "NULL", "None", "#N/A"])
def test_tokens_that_spell_missing_values_are_items_and_users(tmp_path, token):
    """Tokens are strings: `NA` is an item (and a user) like any other, not a missing value."""
    rename = {"10": token, "u10": token}
    dom1 = [(rename.get(u, u), rename.get(i, i), r, t) for u, i, r, t in DOM1]
    dom2 = [(rename.get(u, u), i, r, t) for u, i, r, t in DOM2]
    plain = prepare_two(tmp_path / "plain", raw_text(DOM1), DOM2)
    renamed = prepare_two(tmp_path / "renamed", raw_text(dom1), dom2)
    assert (renamed["users"], renamed["items"], renamed["interactions"]) == (
        plain["users"], plain["items"], plain["interactions"])
    assert f"{token}_A" in (tmp_path / "renamed" / "OUT" / "OUT.item").read_text().splitlines()


def test_a_byte_order_mark_is_accepted(tmp_path):
    plain = prepare_two(tmp_path / "plain", raw_text(DOM1))
    with_bom = prepare_two(tmp_path / "bom", "\ufeff" + raw_text(DOM1))
    assert plain["interactions"] == with_bom["interactions"]
    for name in ("OUT.item", "OUT.full.train.inter"):
        assert (tmp_path / "bom" / "OUT" / name).read_bytes() == (tmp_path / "plain" / "OUT" / name).read_bytes()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_timestamp_that_is_not_a_finite_number(tmp_path, value):
    lines = raw_text(DOM1).splitlines(keepends=True)
    lines[2] = "u10\t100\t4\t" + value + "\n"  # line 3 of the file
    with pytest.raises(DataError, match=rf"D1\.inter, line 3: timestamp must be a finite number, got {value}"):
        prepare_two(tmp_path, "".join(lines))


def test_staging_folders_of_a_killed_preparation_are_removed(tmp_path):
    """A preparation killed mid-way leaves `.NAME.tmp-*` (and `.NAME.old-*`) beside DATA_PATH/NAME;
    the next preparation of NAME removes them, under the dataset's lock."""
    cfg = stage_config("prepare", [f"data_path={tmp_path / 'data'}", f"dataset.raw_dir={tmp_path / 'raw'}"])
    (tmp_path / "data" / ".ACDT.tmp-k1ll3d").mkdir(parents=True)
    (tmp_path / "data" / ".ACDT.tmp-k1ll3d" / "ACDT.full.train.inter").write_text("half a file")
    (tmp_path / "data" / ".ACDT.old-x").mkdir()
    (tmp_path / "data" / ".OTHER.tmp-keep").mkdir()  # another dataset's: not ours to remove
    prepare_dataset(cfg.dataset, cfg.data_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".ACDT.lock", ".OTHER.tmp-keep", "ACDT"]


def test_stage_commands_end_with_the_message_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "pretrain.py", "seed=abc", f"hydra.run.dir={tmp_path}/run"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("error: config key 'seed' must be an integer, got 'abc'")
    assert "Traceback" not in result.stderr


def test_an_override_no_config_has_is_named_not_a_traceback():
    """Outside Hydra's own command line (the report, the analyses) an override that cannot apply is a
    user error naming the config and the key."""
    with pytest.raises(ConfigError, match=r"config/finetune\.yaml: Could not override 'model\.inner_size'"):
        stage_config("finetune", ["model_name=GRU4Rec", "model.inner_size=16"])
    with pytest.raises(ConfigError, match=r"config/pretrain\.yaml: .*dataset/nosuchdataset"):
        stage_config("pretrain", ["dataset=nosuchdataset"])
