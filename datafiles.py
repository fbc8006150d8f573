"""Labeled data as files: the assignment's `<label> ||| <sentence>` lines, JSON lines and CSV/TSV with a header,
chosen by the file's extension; the label-name mapping; and prediction files written back in any of the three.

A label is an integer (0 .. n-1) or one of the names that --label-names lists. Data whose labels are names gets
predictions with names, so a file goes in and comes out in the same terms."""
import codecs
import csv
import io
import json
import os
import sys
from typing import Any, NamedTuple, Optional

from settings import Fields
from utils import UsageError, require_file, write_text_atomic

TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class Example(NamedTuple):
    line: int  # its line in the file, from 1 (a CSV record's last line)
    label: Optional[int]  # None for a bare sentence
    sentence: str


class DataFile(NamedTuple):
    examples: list[Example]
    n_lines: int  # the file's lines, blank ones included
    named: bool  # its labels were given as names


def file_format(path: str) -> str:
    """"jsonl", "csv", "tsv" or "txt" (the assignment's format, for any other name and for standard input)."""
    extension = os.path.splitext(path)[1].lower()
    return extension[1:] if extension in (".jsonl", *TABLE_DELIMITERS) else "txt"


def require_data_file(flag: str, path: str) -> None:
    """A readable data file; a missing one of data/ is fetched by setup.sh, any other is the user's to fix."""
    require_file(flag, path, "run ./setup.sh to fetch the data" if path.startswith("data/") else "fix the path")


def read_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file (or of standard input for "-"), without a byte-order mark. Lines end at
    \n or \r\n only: a lone \r inside a line is part of it, as a text editor that shows one line sees it."""
    if path == "-":
        if sys.stdin is None:
            raise UsageError(f"{flag} -: standard input is closed; pipe the sentences in, or pass a file")
        raw = sys.stdin.buffer.read()
    else:
        require_data_file(flag, path)
        with open(path, "rb") as f:
            raw = f.read()
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Notepad writes one
    chunks = raw.split(b"\n")
    if chunks[-1] == b"":
        chunks.pop()  # the newline at the end of the file ends the last line; it starts no new one
    lines = []
    for line_no, line in enumerate(chunks, start=1):
        try:
            lines.append(line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag} {path}, line {line_no}: not UTF-8 ({e.reason} at byte {e.start}); "
                             f"re-save the file as UTF-8") from e
    return lines


def read_labeled_data(path: str, flag: str, label_names: Optional[list[str]] = None, labels_optional: bool = False,
                      fields: Fields = Fields()) -> DataFile:
    """The examples of a data file; blank lines hold none. Labels are checked against label_names (None: any
    integer). With labels_optional, bare sentences are read too, with label None (all examples alike)."""
    lines = read_lines(path, flag)
    where = lambda line: f"{flag} {path}, line {line}"
    reader = {"jsonl": _jsonl_records, "csv": _table_records, "tsv": _table_records}.get(file_format(path), _txt_records)
    examples, named = [], False
    for line, label_value, sentence in reader(lines, path, where, fields, labels_optional):
        label, by_name = (None, False) if label_value is None else \
            _label(label_value, label_names, where(line), labels_optional)
        named = named or by_name
        if examples and (label is None) != (examples[0].label is None):
            raise UsageError(f"{where(line)}: some examples have a label and some do not; label every one or none")
        examples.append(Example(line, label, sentence.strip()))
    if not examples:
        form = {"txt": "a sentence or '<label> ||| <sentence>'" if labels_optional else "'<label> ||| <sentence>'",
                "jsonl": f'a JSON object like {{"{fields.text}": ..., "{fields.label}": ...}}',
                "csv": f"a record under a header naming {fields.text},{fields.label}"}
        raise UsageError(f"{flag} {path}: the file has no examples; each line must be "
                         f"{form.get(file_format(path), form['csv'])}")
    return DataFile(examples, len(lines), named)


def _label(value: Any, label_names: Optional[list[str]], where: str, bare_allowed: bool) -> tuple[int, bool]:
    """An example's label as an integer (the value itself, or the position of its name in label_names), and
    whether it was a name."""
    text = str(value).strip()
    if isinstance(value, int) and not isinstance(value, bool) or text.lstrip("-").isdigit():
        label = int(text)
        if label_names is not None and not 0 <= label < len(label_names):
            raise UsageError(f"{where}: label {label} is outside 0..{len(label_names) - 1}, the labels that "
                             f"--label-names names; pass the label mapping of this dataset")
        return label, False
    names = [name.strip() for name in label_names or []]
    if text in names:
        return names.index(text), True
    known = f"nor one of the label names {label_names}" if label_names is not None else "(no label names given)"
    bare = "; a bare sentence cannot hold ' ||| ' (put such text in a .jsonl file)" if bare_allowed else ""
    raise UsageError(f"{where}: label {text!r} is not an integer {known}{bare}")


def _txt_records(lines: list[str], path: str, where: Any, fields: Fields, labels_optional: bool):
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label_text, sep, sentence = line.partition(" ||| ")
        if sep:
            yield line_no, label_text, sentence
        elif labels_optional:
            yield line_no, None, line
        else:
            raise UsageError(f"{where(line_no)}: no ' ||| ' separator; each line must be '<label> ||| <sentence>'")


def _jsonl_records(lines: list[str], path: str, where: Any, fields: Fields, labels_optional: bool):
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{where(line_no)}: not a JSON object ({e})") from e
        if isinstance(record, dict) and fields.text not in record and ({"prompt", "completion"} <= record.keys()
                                                                       or {"instruction", "output"} <= record.keys()):
            raise UsageError(f"{where(line_no)}: a language-model example (no label); train on it with --task lm")
        if not isinstance(record, dict) or not isinstance(record.get(fields.text), str):
            raise UsageError(f"{where(line_no)}: no text field {fields.text!r}; each line must be a JSON object "
                             f'like {{"{fields.text}": "...", "{fields.label}": 1}} (see --text_field)')
        label = record.get(fields.label)
        if label is None and not labels_optional:
            raise UsageError(f"{where(line_no)}: no label field {fields.label!r} (see --label_field)")
        if isinstance(label, (list, dict, float, bool)):
            raise UsageError(f"{where(line_no)}: label {label!r} is not an integer or a label name")
        yield line_no, label, record[fields.text]


def _table_records(lines: list[str], path: str, where: Any, fields: Fields, labels_optional: bool):
    rows = csv.reader(io.StringIO("".join(line + "\n" for line in lines)), delimiter=TABLE_DELIMITERS["." + file_format(path)])
    header = next(rows, None)
    if header is None or fields.text not in header:
        raise UsageError(f"{where(1)}: the header {header} has no column {fields.text!r}; the first line must name "
                         f"the columns, e.g. {fields.text},{fields.label} (see --text_field, --label_field)")
    text_col = header.index(fields.text)
    label_col = header.index(fields.label) if fields.label in header else None
    if label_col is None and not labels_optional:
        raise UsageError(f"{where(1)}: the header {header} has no column {fields.label!r} (see --label_field)")
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UsageError(f"{where(rows.line_num)}: {len(row)} columns where the header has {len(header)}; quote "
                             f"a sentence that holds the delimiter")
        yield rows.line_num, None if label_col is None else row[label_col], row[text_col]


def read_label_names(path: str) -> list[str]:
    """The label-mapping JSON: a list of distinct names, the i-th naming label i."""
    require_data_file("--label-names", path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--label-names {path}: not valid JSON ({e}); it must be a list like [\"bad\", \"good\"]") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UsageError(f"--label-names {path}: must be a JSON list of non-empty strings, like [\"bad\", \"good\"]")
    stripped = [n.strip() for n in names]
    duplicates = sorted({n for n in stripped if stripped.count(n) > 1})
    if duplicates:
        raise UsageError(f"--label-names {path}: {duplicates[0]!r} is listed twice; each label needs its own name")
    return names


def write_examples(path: str, labels: list[Any], sentences: list[str], fields: Fields = Fields(),
                   lines: Optional[list[int]] = None, n_lines: Optional[int] = None) -> None:
    """Labeled sentences in the format that path's extension names. The assignment's format keeps the lines of
    the file they came from (`lines`, `n_lines`): a blank line where it had one."""
    kind = file_format(path)
    if kind == "jsonl":
        text = "".join(json.dumps({fields.text: s, fields.label: label}, ensure_ascii=False) + "\n"
                       for label, s in zip(labels, sentences))
    elif kind in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, delimiter=TABLE_DELIMITERS["." + kind], lineterminator="\n")
        writer.writerows([[fields.text, fields.label], *([s, label] for label, s in zip(labels, sentences))])
        text = out.getvalue()
    else:
        text = line_by_line([f"{label} ||| {s}" for label, s in zip(labels, sentences)], lines, n_lines)
    write_text_atomic(path, text)


def line_by_line(rows: list[str], lines: Optional[list[int]] = None, n_lines: Optional[int] = None) -> str:
    """rows (one per example) as the lines of a file that follows the examples' file line by line: a blank line
    where it has one."""
    out = [""] * (n_lines if n_lines is not None else len(rows))
    for line, row in zip(lines or range(1, len(rows) + 1), rows):
        out[line - 1] = row
    return "".join(line + "\n" for line in out)
