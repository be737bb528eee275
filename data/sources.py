"""Text sources: the built-in stdlib corpora and local files, globs and JSONL.

A source yields documents (id, text); the train/valid split is decided per document from a
hash of its id, so it is stable across runs and machines with the same source. Local ids use
the file's resolved absolute path, so every spelling of a path splits alike. A plain text file
is cut into documents (see `text_documents`), so a large one lands in both splits.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from forgetless.errors import UserError

BUILTIN = ("stdlib-prose", "stdlib-code")
DOC_CHARS = 4096  # a text file's documents: paragraphs grouped up to this many characters
READ_BYTES = 1 << 20


class SourceError(UserError):
    """A source is missing, unreadable or empty; the message names it."""


def stdlib_files() -> list[Path]:
    """Every .py file of the running Python's standard library, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()
    )


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    try:
        text = path.read_text(encoding="utf-8")
        return text, ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None  # a few stdlib files are test data in other syntaxes or encodings


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[str, ast.AST, ast.Expr]]:
    """(qualified name, owner, docstring expression) for the module and each class/function."""
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        owner = isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        if owner and not isinstance(node, ast.Module):
            prefix = f"{prefix}{node.name}."
        stack.extend((prefix, child) for child in ast.iter_child_nodes(node))
        body = getattr(node, "body", None)
        if (
            owner
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            yield prefix.rstrip(".") or "<module>", node, body[0]


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return ".".join(path.relative_to(root).with_suffix("").parts)


def stdlib_prose() -> Iterator[tuple[str, str]]:
    for path in stdlib_files():
        parsed = _parse(path)
        if parsed is None:
            continue
        _, tree = parsed
        module = _module_name(path)
        for name, _, node in _docstring_nodes(tree):
            doc = inspect.cleandoc(node.value.value)
            if doc.strip():
                yield f"{module}:{name}", doc


def _without_docstrings(text: str, tree: ast.Module) -> str:
    """The source minus its docstrings; a body left empty gets `pass` so the code still parses."""
    data = text.encode()  # ast column offsets count UTF-8 bytes
    starts = [0] + [m.end() for m in re.finditer(b"\n", data)]
    cuts = []
    for _, owner, node in _docstring_nodes(tree):
        a = starts[node.lineno - 1] + node.col_offset
        b = starts[node.end_lineno - 1] + node.end_col_offset
        indent = data[starts[node.lineno - 1]:a]
        line_end = data.find(b"\n", b)
        line_end = len(data) if line_end < 0 else line_end + 1
        whole_lines = not indent.strip() and not data[b:line_end].strip()
        sole = len(owner.body) == 1 and not isinstance(owner, ast.Module)
        if whole_lines:
            a, b = starts[node.lineno - 1], line_end
            cuts.append((a, b, indent + b"pass\n" if sole else b""))
        else:
            cuts.append((a, b, b"pass" if sole else b""))
    out, pos = [], 0
    for a, b, replacement in sorted(cuts):
        out += [data[pos:a], replacement]
        pos = b
    out.append(data[pos:])
    return b"".join(out).decode()


def stdlib_code() -> Iterator[tuple[str, str]]:
    for path in stdlib_files():
        parsed = _parse(path)
        if parsed is None:
            continue
        code = _without_docstrings(*parsed)
        if code.strip():
            yield _module_name(path), code


def local_files(spec: str) -> list[Path]:
    """The files a local source names, as resolved absolute paths in sorted order."""
    magic = glob.has_magic(spec)
    paths = [Path(p) for p in glob.glob(spec, recursive=True)] if magic else [Path(spec)]
    if magic and not paths:
        raise SourceError(f"source {spec}: the pattern matches no file")
    for p in paths:
        if not p.exists():
            raise SourceError(f"source {p}: no such file")
    return sorted({p.resolve() for p in paths if p.is_file()})


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"source {path}:{n}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise SourceError(f"source {path}:{n}: no string field {field!r}")
            yield f"{path}:{n}", record[field]


def _paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs, each with the blank lines after it (lossless)."""
    para, blank = "", False
    for line in text.splitlines(keepends=True):
        is_blank = not line.strip()
        if para.strip() and blank and not is_blank:
            yield para
            para = ""
        para += line
        blank = is_blank
    if para:
        yield para


def _line_pieces(paragraph: str, limit: int) -> Iterator[str]:
    """A paragraph as pieces of at most `limit` characters: whole if it fits, else its lines
    (a longer line cut every `limit` characters)."""
    if len(paragraph) <= limit:
        yield paragraph
        return
    for line in paragraph.splitlines(keepends=True):
        yield from (line[i:i + limit] for i in range(0, len(line), limit))


def text_documents(text: str, limit: int = DOC_CHARS) -> list[str]:
    """A plain text file's documents: its paragraphs grouped in order into documents of at
    most `limit` characters; a longer paragraph is cut at line ends. Joined, they are the text."""
    docs, doc = [], ""
    for paragraph in _paragraphs(text):
        for piece in _line_pieces(paragraph, limit):
            if doc and len(doc) + len(piece) > limit:
                docs.append(doc)
                doc = ""
            doc += piece
    if doc:
        docs.append(doc)
    return docs


def _text(path: Path) -> Iterator[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"source {path}: not UTF-8 text") from e
    for i, doc in enumerate(text_documents(text)):
        yield f"{path}#{i}", doc


def documents(spec: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Documents of a source: a built-in corpus name, a file, a glob, or JSONL file(s)."""
    if spec == "stdlib-prose":
        yield from stdlib_prose()
        return
    if spec == "stdlib-code":
        yield from stdlib_code()
        return
    for path in local_files(spec):
        yield from _jsonl(path, text_field) if path.suffix == ".jsonl" else _text(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(spec: str) -> dict:
    """What a source's documents depend on: for a built-in corpus the standard library's path
    and the Python version; for local data every matched file's resolved path and sha256."""
    if spec in BUILTIN:
        return {"builtin": spec, "stdlib": sysconfig.get_paths()["stdlib"],
                "python": sys.version}
    return {"files": {str(p): _sha256(p) for p in local_files(spec)}}


def source_name(spec: str) -> str:
    """A short dataset name for a source (the domain token's name)."""
    if spec in BUILTIN:
        return spec
    stem = Path(spec.split("*")[0].rstrip("/")).name or "data"
    return Path(stem).stem or "data"


def is_valid(doc_id: str, valid_fraction: float) -> bool:
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction
