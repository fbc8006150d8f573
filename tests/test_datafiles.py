"""Data files in the three formats, labels as integers or names, label mappings, and prediction files."""
import json

import pytest

from datafiles import DataFile, Example, read_label_names, read_labeled_data, write_examples
from settings import Fields
from utils import UsageError

SST = ["awful", "bad", "average", "good", "excellent"]


def test_labeled_and_bare_lines_are_read_but_never_mixed(tmp_path):
    labeled = tmp_path / "labeled.txt"
    labeled.write_bytes(b"\xef\xbb\xbf1 ||| fine film \r\n\n0 ||| dull\n")
    assert read_labeled_data(str(labeled), "--dev") == ([(1, 1, "fine film"), (3, 0, "dull")], 3, False)
    bare = tmp_path / "bare.txt"
    bare.write_text("a film\nanother one\n")
    assert read_labeled_data(str(bare), "--input", labels_optional=True) == \
        ([(1, None, "a film"), (2, None, "another one")], 2, False)
    with pytest.raises(UsageError, match="line 1: no ' \\|\\|\\| ' separator"):
        read_labeled_data(str(bare), "--dev")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("1 ||| labeled\nbare\n")
    with pytest.raises(UsageError, match="mixed.txt, line 2: some examples have a label and some do not"):
        read_labeled_data(str(mixed), "--input", labels_optional=True)


def test_an_empty_input_says_what_a_line_may_hold(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match="empty.txt: the file has no examples; each line must be a sentence or "
                                         "'<label> \\|\\|\\| <sentence>'"):
        read_labeled_data(str(empty), "--input", labels_optional=True)
    with pytest.raises(UsageError, match="each line must be '<label> \\|\\|\\| <sentence>'$"):
        read_labeled_data(str(empty), "--dev")


def test_label_names_in_the_data_map_to_their_positions(tmp_path):
    path = tmp_path / "named.txt"
    path.write_text("excellent ||| a gem\n1 ||| meh\n awful  ||| a mess\n")
    assert read_labeled_data(str(path), "--dev", SST) == ([(1, 4, "a gem"), (2, 1, "meh"), (3, 0, "a mess")], 3, True)
    # classify's input: a ' ||| ' line is a labeled one, and its label must be valid; the label never becomes text
    assert read_labeled_data(str(path), "--input", SST, labels_optional=True).examples[0] == (1, 4, "a gem")
    path.write_text("a film\nsuperb ||| a film\n")
    with pytest.raises(UsageError, match="named.txt, line 2: label 'superb' is not an integer nor one of the label "
                                         "names .*a bare sentence cannot hold"):
        read_labeled_data(str(path), "--input", SST, labels_optional=True)
    path.write_text("7 ||| a film\n")
    with pytest.raises(UsageError, match="line 1: label 7 is outside 0..4"):
        read_labeled_data(str(path), "--dev", SST)


def test_jsonl_reads_its_fields_by_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a gem", "label": "excellent"}\n\n{"text": "meh", "label": 1, "id": 7}\n')
    assert read_labeled_data(str(path), "--dev", SST) == ([(1, 4, "a gem"), (3, 1, "meh")], 3, True)
    path.write_text('{"review": "a gem", "stars": 4}\n')
    assert read_labeled_data(str(path), "--dev", SST, fields=Fields("review", "stars")).examples == [(1, 4, "a gem")]
    with pytest.raises(UsageError, match="d.jsonl, line 1: no text field 'text'"):
        read_labeled_data(str(path), "--dev", SST)
    with pytest.raises(UsageError, match="line 1: no label field 'label'"):
        read_labeled_data(str(path), "--dev", SST, fields=Fields("review", "label"))
    assert read_labeled_data(str(path), "--input", SST, True, Fields("review", "label")).examples == [(1, None, "a gem")]
    path.write_text('{"text": "x", "label": 1}\nnot json\n')
    with pytest.raises(UsageError, match="d.jsonl, line 2: not a JSON object"):
        read_labeled_data(str(path), "--dev", SST)


@pytest.mark.parametrize("extension, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_tables_read_their_columns_from_the_header(tmp_path, extension, delimiter):
    path = tmp_path / f"d{extension}"
    path.write_text(delimiter.join(["id", "label", "text"]) + "\n" + delimiter.join(["1", "good", '"a gem, truly"']) + "\n\n"
                    + delimiter.join(["2", "0", "a mess"]) + "\n")
    assert read_labeled_data(str(path), "--dev", SST) == ([(2, 3, "a gem, truly"), (4, 0, "a mess")], 4, True)
    unlabeled = tmp_path / f"u{extension}"
    unlabeled.write_text("text\nhello\n")
    # the header is no sentence to classify
    assert read_labeled_data(str(unlabeled), "--input", SST, labels_optional=True).examples == [(2, None, "hello")]
    with pytest.raises(UsageError, match="line 1: the header \\['text'\\] has no column 'label'"):
        read_labeled_data(str(unlabeled), "--dev", SST)
    with pytest.raises(UsageError, match="has no column 'review'"):
        read_labeled_data(str(unlabeled), "--input", SST, True, Fields("review"))
    unlabeled.write_text(f"text{delimiter}label\nhello{delimiter}1{delimiter}extra\n")
    with pytest.raises(UsageError, match="line 2: 3 columns where the header has 2"):
        read_labeled_data(str(unlabeled), "--dev", SST)


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.csv", "p.tsv"])
def test_predictions_read_back_as_written(tmp_path, name):
    path = tmp_path / name
    sentences = ['a gem, "truly"', "a mess\twith a tab" if not name.endswith(".tsv") else "a mess", "ünïcode"]
    write_examples(str(path), ["excellent", "awful", "good"], sentences, Fields("t", "l"))
    assert read_labeled_data(str(path), "--dev", SST, fields=Fields("t", "l")) == \
        DataFile([Example(line, label, s) for line, label, s in zip(
            [1, 2, 3] if name.endswith((".txt", ".jsonl")) else [2, 3, 4], [4, 0, 3], sentences)], 3 + name.endswith(("csv", "tsv")), True)
    if name.endswith(".jsonl"):
        assert json.loads(path.read_text().splitlines()[0]) == {"t": 'a gem, "truly"', "l": "excellent"}


def test_label_names_must_be_a_list_of_distinct_names(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('["bad", "good"]')
    assert read_label_names(str(path)) == ["bad", "good"]
    for content, words in (('["bad", " bad"]', "twice"), ('{"bad": 0}', "list"), ("[]", "list"), ("[bad", "JSON")):
        path.write_text(content)
        with pytest.raises(UsageError, match=words):
            read_label_names(str(path))
