"""Labeled text as a Source: a CSV or JSONL file with a text and a label column, a folder per class of `.txt` files, or
Debian's fortunes by topic (one file per topic, texts separated by lines holding only `%`). Exact duplicates are
kept once (the first label wins), so the same text can never sit in two splits. The texts are tokenized once per
(tokenizer, texts, max_length) and cached under `runs/data_cache/`; a text becomes one row of token ids and one of its
attention mask, padded to the longest text kept, and each batch is cut to its own longest text when it runs.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch

from fine_tune.errors import DataError
from fine_tune.learn.data import Images, Source

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_PACKAGES = "fortunes fortunes-min"


def _utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}); check data.root") from None


def read_table(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) rows of a CSV file (a header row names the columns) or a JSONL file (one object per line)."""
    content = _utf8(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n} is not a JSON object; one object per line")
                rows.append(row)
    else:
        rows = list(csv.DictReader(content.splitlines()))
    for column in (text_column, label_column):
        if not rows or column not in rows[0]:
            found = ", ".join(map(str, rows[0])) if rows else "no rows"
            raise DataError(f"{path} has no column {column!r} (found: {found}); set data.text_column / "
                            "data.label_column to its columns")
    return [(str(r.get(text_column) or ""), str(r.get(label_column) or "")) for r in rows]


def read_folder(root: Path) -> list[tuple[str, str]]:
    """(text, class) for every `.txt` file of every class folder of `root`; hidden entries are skipped."""
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "@"))):
        rows += [(_utf8(f), folder.name) for f in sorted(folder.rglob("*.txt")) if not f.name.startswith(".")]
    if not rows:
        raise DataError(f"{root} has no class folders of .txt files; lay it out as {root}/<class>/<text>.txt, or "
                        "point data.root at a CSV or JSONL file")
    return rows


def read_fortunes(root: Path, topics: list[str]) -> list[tuple[str, str]]:
    """(text, topic) for each fortune of each topic file in `root` (Debian's fortunes package)."""
    if not root.is_dir():
        raise DataError(f"the fortunes corpus is not in {root}; install it (`make data`, or apt-get install "
                        f"{FORTUNES_PACKAGES}) or set data.root to the folder holding its topic files")
    rows = []
    for topic in topics:
        path = root / topic
        if not path.is_file():
            known = sorted(p.name for p in root.iterdir() if p.is_file() and not p.suffix)
            raise DataError(f"fortunes topic {topic!r} is not in {root} (topics: {', '.join(known)}); fix `classes:`")
        for text in _utf8(path).split("\n%\n"):
            text = text.strip("%\n")
            if text.strip():
                rows.append((text, topic))
    return rows


def labeled_texts(data, classes: list | None) -> list[tuple[str, str]]:
    """The (text, label) pairs a `DataConfig` of kind text or fortunes names, duplicates kept once."""
    if data.kind == "fortunes":
        if not classes or not all(isinstance(c, str) for c in classes):
            raise DataError("data kind fortunes needs `classes:` as a list of topic names (e.g. [computers, "
                            "science, politics]); the topics are the file names in " + str(data.root or FORTUNES_DIR))
        rows = read_fortunes(Path(data.root or FORTUNES_DIR), classes)
    else:
        root = Path(data.root)
        if not root.exists():
            raise DataError(f"text data {root} does not exist; set data.root to a CSV or JSONL file or a folder of "
                            "<class>/<text>.txt")
        rows = read_folder(root) if root.is_dir() else read_table(root, data.text_column, data.label_column)
    for n, (text, label) in enumerate(rows, 1):
        if not text.strip() or not label.strip():
            raise DataError(f"{data.root or FORTUNES_DIR}: example {n} has an empty {'text' if not text.strip() else 'label'}; "
                            "fill it in or remove the row")
    first = {}
    for text, label in rows:
        first.setdefault(text, label)  # an exact duplicate is one example: it can never cross splits
    return list(first.items())


def tokenized(texts: list[str], tokenizer, max_length: int, padding: str = "longest") -> torch.Tensor:
    """Token ids and attention masks, (N, 2, L) int64, padded to the longest kept text (at most `max_length`), or
    to `max_length` itself with padding="max_length" (a shape fixed for an exported graph)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()


def text_source(cfg, tokenizer_dir: Path) -> Source:
    """The labeled texts of `cfg.data` as a Source: tokenized once with the model's tokenizer, cached on disk."""
    from fine_tune.learn import checkpoints

    rows = labeled_texts(cfg.data, cfg.classes)
    names = sorted({label for _, label in rows}) if cfg.data.kind != "fortunes" else list(cfg.classes)
    key = hashlib.sha256(f"{cfg.data.max_length}|".encode())
    for f in sorted(tokenizer_dir.glob("*token*")) + sorted(tokenizer_dir.glob("vocab*")):
        key.update(f.name.encode() + f.read_bytes())
    for text, label in rows:
        key.update(f"{label}\t{text}\0".encode())
    cache = cfg.run_dir() / "data_cache" / f"text-{key.hexdigest()[:24]}.pt"
    if cache.is_file():
        try:
            x = checkpoints.load_any(cache)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the texts, never trusted
            x = None
        if isinstance(x, torch.Tensor) and len(x) == len(rows):
            return _source(x, rows, names)
    from transformers import AutoTokenizer

    x = tokenized([t for t, _ in rows], AutoTokenizer.from_pretrained(str(tokenizer_dir)), cfg.data.max_length)
    checkpoints.save(x, cache)
    return _source(x, rows, names)


def _source(x: torch.Tensor, rows: list[tuple[str, str]], names: list[str]) -> Source:
    index = {name: i for i, name in enumerate(names)}
    y = torch.tensor([index[label] for _, label in rows], dtype=torch.long)
    return Source(Images(x, y), None, None, names, unit="texts")
