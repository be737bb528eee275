import ast
import itertools

import pytest

from forgetless.data import sources


def test_stdlib_prose_is_docstrings():
    docs = list(itertools.islice(sources.stdlib_prose(), 300))
    assert len(docs) == 300
    assert len({doc_id for doc_id, _ in docs}) == 300
    assert all(text.strip() and text == text.strip("\n") for _, text in docs)


def test_stdlib_code_has_no_docstrings_and_still_parses():
    docs = list(itertools.islice(sources.stdlib_code(), 150))
    assert len(docs) == 150
    for doc_id, code in docs:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            body = getattr(node, "body", None)
            if isinstance(node, owners) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                assert not (isinstance(value, ast.Constant) and isinstance(value.value, str)), (
                    doc_id)


def test_docstring_removal_keeps_code():
    text = ('"""Module."""\nimport os\n\n\nclass A:\n    """Only a docstring."""\n\n\n'
            'def f(x):  # note\n    """Doc\n    more."""\n    return x\n\n\n'
            'def g(): "inline"\n')
    out = sources._without_docstrings(text, ast.parse(text))
    assert out == ("import os\n\n\nclass A:\n    pass\n\n\n"
                   "def f(x):  # note\n    return x\n\n\ndef g(): pass\n")


def test_split_is_deterministic_and_near_fraction():
    ids = [f"doc{i}" for i in range(20000)]
    first = [sources.is_valid(i, 0.05) for i in ids]
    assert first == [sources.is_valid(i, 0.05) for i in ids]
    assert 0.04 < sum(first) / len(ids) < 0.06


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta"}\n')
    assert [t for _, t in sources.documents(str(tmp_path / "*.txt"))] == ["alpha", "beta"]
    assert [t for _, t in sources.documents(str(tmp_path / "c.jsonl"))] == ["gamma", "delta"]
    with pytest.raises(sources.SourceError, match="no string field 'body'"):
        list(sources.documents(str(tmp_path / "c.jsonl"), text_field="body"))
    with pytest.raises(sources.SourceError, match="matches no file"):
        list(sources.documents(str(tmp_path / "*.md")))
    with pytest.raises(sources.SourceError, match="no such file"):
        list(sources.documents(str(tmp_path / "missing.txt")))


def test_text_documents_rule():
    para = "line one\nline two\n\n"
    text = "\n\n" + para * 5 + "x" * 25 + "\n" + ("long line\n" * 4) + "\n" + "tail"
    docs = sources.text_documents(text, limit=24)
    assert "".join(docs) == text  # lossless, in order
    assert all(len(d) <= 24 for d in docs)
    assert docs[0] == "\n\n" + para and docs[1] == para  # paragraphs whole while they fit
    assert "x" * 24 in docs and "x\n" in docs[docs.index("x" * 24) + 1]  # a long line is cut
    assert sources.text_documents("") == []
    assert sources.text_documents("a\n\nb\n") == ["a\n\nb\n"]  # grouped up to the limit


def test_text_file_documents_keyed_on_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "book.txt").write_text("".join(f"paragraph {i}\n" + "words " * 100 + "\n\n"
                                               for i in range(100)))
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n')
    monkeypatch.chdir(tmp_path)
    relative = list(sources.documents("book.txt"))
    absolute = list(sources.documents(str(tmp_path / "book.txt")))
    assert relative == absolute and len(relative) > 10
    assert relative[0][0] == f"{tmp_path.resolve() / 'book.txt'}#0"
    assert list(sources.documents("c.jsonl"))[0][0] == f"{tmp_path.resolve() / 'c.jsonl'}:1"
    assert sources.fingerprint("book.txt") == sources.fingerprint(str(tmp_path / "*.txt"))


def test_fingerprint_follows_content_and_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    before = sources.fingerprint(str(tmp_path / "*.txt"))
    assert list(before["files"]) == [str((tmp_path / "a.txt").resolve())]
    (tmp_path / "a.txt").write_text("alphA")
    assert sources.fingerprint(str(tmp_path / "*.txt")) != before
    (tmp_path / "b.txt").write_text("beta")
    assert len(sources.fingerprint(str(tmp_path / "*.txt"))["files"]) == 2
    assert sources.fingerprint("stdlib-prose")["builtin"] == "stdlib-prose"
