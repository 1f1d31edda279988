"""Input that once crashed or was silently misread: CSV cells, byte-order marks, bytes that are not UTF-8,
duplicate YAML keys, override values YAML cannot read, misspelt keys in list items, non-finite weights."""
import pytest

from tunesmith._core.errors import DataError, DataIssue, TunesmithError
from tunesmith.config import ClassifyDataConfig, config_from_dict, load_config
from tunesmith.data.classification import load_classification_data
from tunesmith.data.dataset import read_conversations
from tunesmith.data.mixture import stream_files
from tunesmith.data.readers import read_rows

BASE = {"data": {"train": "x.jsonl"}}
BOM = b"\xef\xbb\xbf"
ROW = b'{"prompt": "a", "completion": "b"}\n'


def rows_and_issues(path) -> tuple[list, list[str]]:
    issues: list[DataIssue] = []
    rows = list(read_rows(path, issues))
    return rows, [str(i) for i in issues]


def streamed(path) -> tuple[list, list[str]]:
    """Rows and issues as data.streaming reads them."""
    issues: list[DataIssue] = []
    examples = stream_files([str(path)], lambda row, source, k: (source.line, row), issues)
    rows = []
    for k in range(len(examples)):
        try:
            rows.append(examples[k])
        except DataError as err:
            issues += err.issues
    return rows, [str(i) for i in issues]


def test_csv_cells_stay_the_exact_text_they_are(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output,label\nadd,,2,1\nsay,None,null,\nmiss,NA,N/A,0\n")
    rows, issues = rows_and_issues(path)
    assert issues == []
    assert [row for _, row in rows] == [
        {"instruction": "add", "input": "", "output": "2", "label": "1"},
        {"instruction": "say", "input": "None", "output": "null", "label": ""},
        {"instruction": "miss", "input": "NA", "output": "N/A", "label": "0"}]


def test_csv_rows_are_numbered_by_the_line_they_start_on_and_ragged_rows_are_named(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(BOM + b'instruction,input,output\r\n"two\r\nlines",,x\r\n\r\nnext,,y\r\n'
                     b'ragged,a,b,c\r\nshort,a\r\nlast,,z\r\n')
    rows, issues = rows_and_issues(path)
    assert [(line, row["instruction"]) for line, row in rows] == [(2, "two\r\nlines"), (5, "next"), (7, "short"),
                                                                  (8, "last")]
    assert rows[2][1] == {"instruction": "short", "input": "a", "output": None}  # a cell left out is missing
    assert issues == [f"{path}:6: has 4 cells, the header has 3"]


def test_a_csv_with_a_header_and_no_rows_has_no_rows(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("instruction,input,output\n")
    issues: list[DataIssue] = []
    assert read_conversations([str(path)], "auto", issues) == []
    assert [str(i) for i in issues] == [f"{path}: has no rows"]


def test_integer_looking_csv_labels_classify_as_their_text(tokenizer, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello there,1\ngood bye,0\n\"a\nb\",1\nanother one,0\n")
    cfg = ClassifyDataConfig(train=str(path), validation=str(path))
    data = load_classification_data(cfg, tokenizer, seed=0)
    assert data.labels == ["0", "1"] and [e.label for e in data.train] == [1, 0, 1, 0]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(BOM + ROW + ROW)
    row = {"prompt": "a", "completion": "b"}
    assert rows_and_issues(path) == ([(1, row), (2, row)], [])
    array = tmp_path / "array.json"
    array.write_bytes(BOM + b"\n[" + ROW + b"]")
    assert rows_and_issues(array) == ([(1, {"prompt": "a", "completion": "b"})], [])


def test_a_byte_order_mark_reads_the_same_when_streamed(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(BOM + b"\n" + ROW + BOM + ROW)  # only the first line's mark is a byte-order mark
    rows, issues = streamed(path)
    assert rows == [(2, {"prompt": "a", "completion": "b"})]
    assert len(issues) == 1 and issues[0].startswith(f"{path}:3: malformed JSON")
    assert rows_and_issues(path)[1] == issues


LATIN1 = b'{"prompt": "caf\xe9", "completion": "b"}\n'


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bytes_that_are_not_utf8_are_named_and_the_other_lines_read(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(ROW + LATIN1 + ROW)
    rows, issues = rows_and_issues(path)
    assert [line for line, _ in rows] == [1, 3]
    assert issues == [f"{path}:2: is not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"]
    assert streamed(path.rename(tmp_path / "latin1.jsonl")) == (
        [(1, {"prompt": "a", "completion": "b"}), (3, {"prompt": "a", "completion": "b"})],
        [f"{tmp_path / 'latin1.jsonl'}:2: is not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"])


def test_bytes_that_are_not_utf8_in_a_json_array_or_a_csv_cell_are_named(tmp_path):
    array = tmp_path / "a.json"
    array.write_bytes(b"[\n" + LATIN1 + b"]")
    assert rows_and_issues(array) == ([], [f"{array}:2: is not valid UTF-8 (byte 0xe9 at column 16); "
                                           "save the file as UTF-8"])
    table = tmp_path / "a.csv"
    table.write_bytes(b"prompt,completion\ncaf\xe9,b\nok,c\n")
    assert rows_and_issues(table) == ([(3, {"prompt": "ok", "completion": "c"})],
                                      [f"{table}:2: field 'prompt' is not valid UTF-8 (byte 0xe9 at column 4); "
                                       "save the file as UTF-8"])


def test_a_key_given_twice_in_a_yaml_mapping_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\n  max_seq_len: 64\n  max_seq_len: 128\n")
    with pytest.raises(TunesmithError, match=rf"(?s){path}: .*key 'max_seq_len' appears twice .*first on line 3"
                                             rf".*line 4"):
        load_config(path)
    path.write_text("data:\n  train: a.jsonl\ntrain: {lr: 0.1}\ndata:\n  train: b.jsonl\n")
    with pytest.raises(TunesmithError, match=r"(?s)key 'data' appears twice .*first on line 1.*line 4"):
        load_config(path)


@pytest.mark.parametrize("value", ["*.jsonl", "@train.jsonl", "[a", "{a: 1, a: 2}"])
def test_an_override_value_yaml_cannot_read_stays_its_text(value):
    assert config_from_dict(BASE, [f"data.train={value}"]).data.train == value


MIXTURE = {"data": {"mixture": [{"name": "a", "train": "a.jsonl"}, {"name": "b", "train": "b.jsonl"}]}}


@pytest.mark.parametrize("override, expect", [
    ("data.mixture.0.wieght=3", "unknown key 'data.mixture.0.wieght' (did you mean 'data.mixture.0.weight'?)"),
    ("data.mixture.1.templats=[]", "unknown key 'data.mixture.1.templats' (did you mean 'data.mixture.1.templates'?)"),
])
def test_a_misspelt_key_in_a_list_item_is_matched_against_the_items_fields(override, expect):
    with pytest.raises(TunesmithError) as err:
        config_from_dict(MIXTURE, [override])
    assert expect in str(err.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "nan", "inf"])
@pytest.mark.parametrize("key", ["data.mixture.0.weight", "train.lr"])
def test_numbers_in_a_config_must_be_finite(value, key):
    with pytest.raises(TunesmithError, match=f"'{key}': Input should be a finite number"):
        config_from_dict(MIXTURE, [f"{key}={value}"])


def test_an_empty_list_of_train_files_is_a_config_error():
    with pytest.raises(TunesmithError, match="'data.train': an empty list names no file"):
        config_from_dict(MIXTURE, ["data.mixture=null", "data.train=[]"])


def test_validate_refuses_a_frozen_body_that_trains_nothing_before_any_data_is_read():
    nothing = ["method.kind=freeze", "method.freeze.train_last_n_layers=0", "method.freeze.train_lm_head=false",
               "method.freeze.train_norm=false"]
    with pytest.raises(TunesmithError, match="method.freeze trains nothing"):
        config_from_dict(MIXTURE, nothing)
    assert config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl"}}, nothing[1:]).method.kind == "freeze"
