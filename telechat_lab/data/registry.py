"""`dataset_info.json` (LLaMA-Factory's schema) and the files it names: json, jsonl, csv, parquet, txt,
or a folder of them. Every error names the dataset, the file and the line or record at fault.

Each entry holds one KIND of data (`DatasetSpec.kind`), which decides the stages it fits (stages.py):
- "pairwise": `"ranking": true`; alpaca records with `chosen` / `rejected` replies (strings) beside
  `prompt` / `query` (+ `system`, `history`, `tools`), or sharegpt records whose `conversations` end with the
  user's message and whose `chosen` / `rejected` are messages (`{"from": "gpt", "value": ...}`, tags mapped);
- "kto": a `kto_tag` column (JSON true / false) on SFT-shaped records (any formatting);
- "pt": raw text: an alpaca entry whose columns map `prompt` (LLaMA-Factory's `{"prompt": "text"}`) and no
  `response`, or `.txt` files (a file_name ending .txt, or a folder of them; `columns` may say
  `{"prompt": "text"}`, as LLaMA-Factory's entries do, and nothing else). A .txt file is one document per
  line by default (LLaMA-Factory's reading; blank lines skipped); the entry key `"sample_by"` (the name of the
  `datasets` text loader's option) takes `"paragraph"` (documents separated by blank lines) or `"document"`
  (the whole file is one document);
- "sft": every other entry (conversations).
A stage given a dataset of another kind is refused before any record is read (`check_kinds`), naming the
dataset, its dataset_info.json and the stage(s) it fits.

Text is UTF-8 (a leading byte-order mark is accepted); bytes that are not are named by line and byte offset.
JSON nested too deeply to parse, and a key given twice in one object of dataset_info.json (JSON would keep the
last, silently), are errors naming the file."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telechat_lab.errors import BadRecord, DataError
from telechat_lab.stages import stages_reading

FORMATS = ("alpaca", "sharegpt", "telechat")
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
ENTRY_KEYS = {
    "file_name",
    "formatting",
    "columns",
    "tags",
    "num_samples",
    "split",
    "ranking",
    "load_from",
    "subset",
    "folder",
    "hf_hub_url",
    "ms_hub_url",
    "script_url",
    "sample_by",
}
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
SAMPLE_BY = ("line", "paragraph", "document")  # what one document of a .txt file is
KIND_WORDS = {  # what a dataset of each kind holds, for messages
    "sft": "conversations",
    "pt": "raw text",
    "pairwise": "preference pairs",
    "kto": "KTO examples",
}
KIND_HINTS = {  # how an entry becomes that kind
    "sft": "alpaca / sharegpt / telechat records with replies",
    "pt": 'a .txt file, or columns {"prompt": "text"} (no response column)',
    "pairwise": '"ranking": true with chosen / rejected columns',
    "kto": 'replies tagged desirable or not: a kto_tag column, "columns": {"kto_tag": "kto_tag"}',
}
INFO_NAME = "dataset_info.json"
TEXT_ENCODING = "utf-8-sig"  # UTF-8, with or without a byte-order mark

DEFAULT_COLUMNS = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
    },
    "sharegpt": {
        "messages": "conversations",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
    },
    "telechat": {"messages": "dialog", "system": "system", "tools": "tools"},
}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: Path  # file or folder
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    kind: str = "sft"  # the data it holds: "sft" | "pt" | "pairwise" | "kto" (the module docstring)
    sample_by: str = "line"  # .txt files: one document per line, paragraph or whole file
    info_path: Path | None = None  # the dataset_info.json that defines it (for messages)

    def column(self, key: str) -> str:
        return self.columns.get(key, DEFAULT_COLUMNS[self.formatting].get(key, key))

    def tag(self, key: str) -> str:
        return self.tags.get(key, DEFAULT_TAGS[key])

    def files(self) -> list[Path]:
        if self.path.is_dir():
            found = data_files(self.path)
            if not found:
                raise DataError(f"dataset '{self.name}': folder {self.path} holds no {'/'.join(FILE_SUFFIXES)} file")
            return found
        if not self.path.exists():
            raise DataError(f"dataset '{self.name}': file {self.path} does not exist")
        if not self.path.is_file():
            raise DataError(
                f"dataset '{self.name}': {self.path} is not a regular file (file_name names a data file "
                "or a folder of them)"
            )
        return [self.path]


def data_files(folder: Path) -> list[Path]:
    """The data files of a dataset folder, sorted: its .json/.jsonl/.csv/.parquet files (any .txt beside them is
    not data), or, in a folder of none of those, its .txt files (raw text)."""
    found = sorted(p for p in folder.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file() and p.name != INFO_NAME)
    records = [p for p in found if p.suffix != ".txt"]
    return records or found


def check_kinds(specs: list[DatasetSpec], kind: str) -> None:
    """DataError, before any record is read, naming each dataset of `specs` whose kind is not `kind` (the data
    the stage reads), its dataset_info.json and the stage(s) it fits."""
    problems = []
    for spec in specs:
        if spec.kind != kind:
            fits = " or ".join(f"stage={s}" for s in stages_reading(spec.kind))
            wanted = " / ".join(f"stage={s}" for s in stages_reading(kind))
            problems.append(
                f"dataset '{spec.name}' ({spec.info_path or INFO_NAME}) holds {KIND_WORDS[spec.kind]}: it fits "
                f"{fits}, not {wanted}, which reads {KIND_WORDS[kind]} ({KIND_HINTS[kind]})"
            )
    if problems:
        raise DataError("\n".join(problems))


def load_dataset_info(dataset_dir: str | Path, names: list[str] | None = None) -> dict[str, DatasetSpec]:
    """Parse `dataset_dir/dataset_info.json` into specs, checking every entry, or only those of `names`
    (the other entries, e.g. LLaMA-Factory's hub or ranking datasets, are then left alone)."""
    dataset_dir = Path(dataset_dir)
    info_path = dataset_dir / INFO_NAME
    if not info_path.is_file():
        raise DataError(f"{info_path} does not exist (data.dataset_dir must hold {INFO_NAME})")
    try:
        info = json.loads(read_text(info_path, str(info_path)), object_pairs_hook=_unique_keys(info_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{info_path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except RecursionError as err:
        raise DataError(f"{info_path}: JSON nested too deeply to read") from err
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected an object of dataset entries")
    if names is not None:
        missing = [n for n in names if n not in info]
        if missing:
            raise DataError(f"unknown dataset(s) {missing} in data.datasets; {info_path} defines {sorted(info)}")
        info = {n: info[n] for n in names}
    return {name: _spec(name, entry, dataset_dir, info_path) for name, entry in info.items()}


def _spec(name: str, entry: Any, dataset_dir: Path, info_path: Path) -> DatasetSpec:
    where = f"{info_path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}")
    for remote in ("hf_hub_url", "ms_hub_url", "script_url"):
        if remote in entry and "file_name" not in entry:
            raise DataError(f"{where}: '{remote}' datasets are not supported; download it and use 'file_name'")
    if "file_name" not in entry:
        raise DataError(f"{where}: missing 'file_name'")
    if not isinstance(entry["file_name"], str) or not entry["file_name"].strip():
        raise DataError(f"{where}: file_name must name a data file or a folder of them, got {entry['file_name']!r}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise DataError(f"{where}: unknown formatting '{formatting}'; one of {list(FORMATS)}")
    columns = entry.get("columns", {}) or {}
    tags = entry.get("tags", {}) or {}
    if not isinstance(columns, dict) or set(columns) - COLUMN_KEYS:
        raise DataError(
            f"{where}: unknown column key(s) {sorted(set(columns) - COLUMN_KEYS)}; allowed: {sorted(COLUMN_KEYS)}"
        )
    if not isinstance(tags, dict) or set(tags) - TAG_KEYS:
        raise DataError(f"{where}: unknown tag key(s) {sorted(set(tags) - TAG_KEYS)}; allowed: {sorted(TAG_KEYS)}")
    if tags and formatting != "sharegpt":
        raise DataError(f"{where}: 'tags' only apply to sharegpt formatting")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
        raise DataError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    if entry.get("split", "train") != "train":
        raise DataError(
            f"{where}: split '{entry['split']}': a local file is one split (LLaMA-Factory's 'split' picks "
            "one of a hub dataset); give that split's file as file_name"
        )
    path = (dataset_dir / entry["file_name"]).resolve()
    kind = _kind(entry, formatting, columns, path, where)
    return DatasetSpec(
        name=name,
        path=path,
        formatting=formatting,
        columns={"prompt": "text"} if _is_text(path) else dict(columns),
        tags=dict(tags),
        num_samples=num_samples,
        kind=kind,
        sample_by=entry.get("sample_by", "line"),
        info_path=info_path,
    )


def _is_text(path: Path) -> bool:
    """A .txt file, or a folder whose data files are .txt files."""
    if path.suffix == ".txt" and not path.is_dir():
        return True
    return path.is_dir() and any(p.suffix == ".txt" for p in data_files(path))  # only .txt files there


def _kind(entry: dict, formatting: str, columns: dict, path: Path, where: str) -> str:
    """The kind of data an entry holds (the module docstring), its keys checked against it."""
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: ranking must be true or false, got {ranking!r}")
    text = _is_text(path)
    if "sample_by" in entry:
        if not text:
            raise DataError(f"{where}: 'sample_by' applies to .txt files only")
        if entry["sample_by"] not in SAMPLE_BY:
            raise DataError(f"{where}: sample_by must be one of {list(SAMPLE_BY)}, got {entry['sample_by']!r}")
    if text:  # LLaMA-Factory's own entries say columns {"prompt": "text"}: the one column a text file has
        extra = sorted({"tags", "ranking"} & set(entry))
        if formatting != "alpaca" or extra or columns not in ({}, {"prompt": "text"}):
            raise DataError(
                f'{where}: a .txt file is raw text (stage=pt): its one column is {{"prompt": "text"}}, it has '
                "no other columns, tags, ranking or formatting"
            )
        return "pt"
    if ranking:
        if formatting == "telechat":
            raise DataError(f"{where}: ranking datasets are alpaca or sharegpt (formatting '{formatting}')")
        if "kto_tag" in columns:
            raise DataError(f"{where}: a ranking dataset has no kto_tag column (KTO reads unpaired, tagged replies)")
        return "pairwise"
    if "kto_tag" in columns:
        return "kto"
    if formatting == "alpaca" and "prompt" in columns and "response" not in columns:
        return "pt"
    return "sft"


def read_records(spec: DatasetSpec, skip_bad: bool = False) -> tuple[list[tuple[Path, int, dict]], list[BadRecord]]:
    """(records, bad): every record of a dataset as (file, index, record), `index` the line number (1-based)
    for jsonl/csv and the record index (0-based) for json/parquet. A line that is no record (malformed JSON, a
    CSV row with too few or too many fields) raises BadRecord, or with `skip_bad` is returned in `bad`. Holds
    them all: encoding reads them through `iter_records`, a shard at a time."""
    records: list[tuple[Path, int, dict]] = []
    bad: list[BadRecord] = []
    for item in iter_records(spec, skip_bad):
        (bad if isinstance(item, BadRecord) else records).append(item)
    return records, bad


class JsonLine(str):
    """A line of a JSONL file read but not decoded yet (`iter_records(decode=False)`): whoever encodes it decodes it
    (`json_record`), so that encoding workers, not the process reading for them, spend the time; a line also
    crosses to a worker several times faster than the record it holds."""

    __slots__ = ()


def json_record(line: str, where: str) -> dict:
    """The record a JSON line holds; BadRecord at `where` when it holds none."""
    try:
        rec = json.loads(line)
    except RecursionError:
        raise BadRecord(where, "JSON nested too deeply") from None
    except json.JSONDecodeError as err:  # the column within the line, not past its newline (a line cut short)
        column = min(err.pos, len(line.rstrip("\r\n"))) + 1
        raise BadRecord(where, "malformed JSON", f" ({err.msg} at column {column})") from None
    except ValueError as err:  # json's other refusals: an integer of more digits than Python converts
        raise BadRecord(where, "unreadable JSON", f" ({err})") from None
    if not isinstance(rec, dict):
        raise BadRecord(where, "not a JSON object", f" (a {type(rec).__name__})")
    return rec


def iter_records(spec: DatasetSpec, skip_bad: bool = False, decode: bool = True):
    """`read_records`' records one at a time, (file, index, record), each bad one (with `skip_bad`) as its
    BadRecord where it is. Streamed where the format allows: JSONL and CSV line by line, Parquet by row group;
    a JSON array is parsed whole by json, and a .txt file is read whole (its documents may span lines). Without
    `decode`, a JSONL file's records are its lines (JsonLine), decoded by whoever encodes them."""
    for path in spec.files():
        where = f"dataset '{spec.name}': {path}"
        try:
            for index, rec in _read_file(spec, path, decode):
                if isinstance(rec, BadRecord):
                    if not skip_bad:
                        raise rec
                    yield rec
                else:
                    yield path, index, rec
        except UnicodeDecodeError:
            raise _not_utf8(path, where, skip_bad) from None
        except OSError as err:
            raise DataError(f"{where}: cannot read it ({err.strerror or err})") from err


def read_text(path: Path, where: str) -> str:
    """The text of `path` (UTF-8, a byte-order mark accepted); DataError naming where it is not UTF-8."""
    try:
        return path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError:
        raise _not_utf8(path, where) from None
    except OSError as err:
        raise DataError(f"{where}: cannot read it ({err.strerror or err})") from err


def _not_utf8(path: Path, where: str, skip_bad: bool = False) -> DataError:
    data = path.read_bytes()
    try:
        data.decode(TEXT_ENCODING)
        start = 0
    except UnicodeDecodeError as err:
        start = err.start
    line = data.count(b"\n", 0, start) + 1
    byte = f" (0x{data[start]:02x})" if start < len(data) else ""
    return DataError(
        f"{where}: line {line}, byte offset {start}{byte} is not UTF-8 text: save the file as UTF-8 (from "
        "Latin-1, e.g. iconv -f latin1 -t utf-8)"
        + ("; data.on_bad_record=skip skips records, not a file whose text cannot be read" if skip_bad else "")
    )


def _unique_keys(info_path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        obj: dict = {}
        for key, value in pairs:
            if key in obj:
                raise DataError(f"{info_path}: key '{key}' is given twice in one object; keep one of them")
            obj[key] = value
        return obj

    return hook


def _read_file(spec: DatasetSpec, path: Path, decode: bool = True):
    suffix = path.suffix
    where = f"dataset '{spec.name}': {path}"
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        with open(path, encoding=TEXT_ENCODING) as f:
            for lineno, line in enumerate(f, 1):
                if line.isspace():
                    continue
                if not decode:
                    yield lineno, JsonLine(line)
                    continue
                try:
                    yield lineno, json_record(line, f"{where} line {lineno}")
                except BadRecord as bad:
                    yield lineno, bad
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))  # not UTF-8: iter_records
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
        except RecursionError as err:
            raise DataError(f"{where}: JSON nested too deeply to read") from err
        except UnicodeDecodeError:  # iter_records names its line
            raise
        except ValueError as err:  # json's other refusals: an integer of more digits than Python converts
            raise DataError(f"{where}: unreadable JSON ({err})") from err
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{where}: expected a list of records")
        for index, rec in enumerate(data):
            if not isinstance(rec, dict):
                rec = BadRecord(f"{where} record {index}", "not an object", f" (a {type(rec).__name__})")
            yield index, rec
    elif suffix == ".csv":
        with open(path, encoding=TEXT_ENCODING, newline="") as f:
            reader = csv.DictReader(f)
            lineno = 2  # the line a record starts on (a quoted field may span several lines)
            for rec in reader:
                if None in rec:  # DictReader puts the fields beyond the header under the key None
                    rec = BadRecord(
                        f"{where} line {lineno}",
                        "more fields than the header",
                        f" ({len(reader.fieldnames) + len(rec[None])} for {len(reader.fieldnames)})",
                    )
                elif None in rec.values():  # ... and None for the fields the row lacks
                    have = sum(v is not None for v in rec.values())
                    rec = BadRecord(
                        f"{where} line {lineno}",
                        "fewer fields than the header",
                        f" ({have} for {len(reader.fieldnames)})",
                    )
                yield lineno, rec
                lineno = reader.line_num + 1
    elif suffix == ".txt":
        yield from _text_documents(path.read_text(encoding=TEXT_ENCODING), spec.sample_by)  # errors: iter_records
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError(f"{where}: reading parquet needs pyarrow (pip install pyarrow)") from err
        try:
            groups = pq.ParquetFile(path)
            count = groups.num_row_groups
        except Exception as err:  # pyarrow's own errors name neither the dataset nor the file
            raise DataError(f"{where}: unreadable parquet file ({err})") from err
        index = 0
        for group in range(count):  # a row group at a time: a large file is never held whole
            try:
                rows = groups.read_row_group(group).to_pylist()
            except Exception as err:
                raise DataError(f"{where}: unreadable parquet file ({err})") from err
            for rec in rows:
                yield index, rec
                index += 1
    else:
        raise DataError(f"{where}: unsupported file type '{suffix}'; use one of {FILE_SUFFIXES}")


def _text_documents(text: str, sample_by: str):
    """(line number, {"text": document}) of a .txt file's text: a document per line, per paragraph (lines up to
    a blank one, joined with newlines: the number is its first line's) or the whole file; blank ones skipped."""
    if sample_by == "document":
        if text.strip():
            yield 1, {"text": text}
        return
    lines = text.splitlines()
    if sample_by == "line":
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                yield lineno, {"text": line}
        return
    start, para = 0, []
    for lineno, line in enumerate([*lines, ""], 1):
        if line.strip():
            start = start or lineno
            para.append(line)
        elif para:
            yield start, {"text": "\n".join(para)}
            start, para = 0, []


def index_unit(path: Path) -> str:
    """What the index `read_records` gives for a record of `path` counts: "line" or "record"."""
    if path.suffix in (".jsonl", ".csv", ".txt") or (path.suffix == ".json" and _looks_like_jsonl(path)):
        return "line"
    return "record"


def _looks_like_jsonl(path: Path) -> bool:
    """A .json file whose first non-blank character is '{' and that holds several lines of objects."""
    with open(path, encoding=TEXT_ENCODING) as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return False
    first = head.split("\n", 1)[0].strip()
    try:
        json.loads(first)
        return True
    except RecursionError:  # one object on the line, however deep: a line of JSON lines (and a bad record)
        return True
    except json.JSONDecodeError:
        return False
