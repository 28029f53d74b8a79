"""`tl fit` warns, before training starts, about val/ and test/ files that are byte-identical
copies of training images (DESIGN.md 'Bad input'), naming each copy and its original."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import CONFIGS, TINY, tl
from tl_cli.data import leaks

FAST = ["--model.head_init", "random", "--trainer.max_epochs", "1"]
SKIP = ["--data.on_bad_image", "skip"]


@pytest.fixture
def leaky(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    original = sorted((root / "train" / "ellipses").glob("*.jpg"))[2]
    in_val = root / "val" / "ellipses" / "again.jpg"
    in_test = root / "test" / "rectangles" / "renamed.jpg"  # a copy under another class too
    shutil.copy(original, in_val)
    shutil.copy(original, in_test)
    return root, original, [in_val, in_test]


def _fit(root, *extra):
    return tl("fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root, *FAST, *extra)


def _leak_lines(err: str) -> list[str]:
    lines = err.splitlines()
    start = next((i for i, line in enumerate(lines) if "byte-identical copies of training images" in line), None)
    return [] if start is None else lines[start : start + 4]


def test_fit_names_each_copy_remembers_the_answer_and_follows_the_files(leaky, capsys, monkeypatch, tmp_path):
    root, original, copies = leaky
    for split in ("train", "val"):  # files skip leaves out are no copies of anything
        (root / split / "ellipses" / "README.txt").write_text("the same notes\n")
        (root / split / "ellipses" / "empty.jpg").write_bytes(b"")
    assert _fit(root, *SKIP) == 0
    said = _leak_lines(capsys.readouterr().err)
    assert said and said[0].startswith("tl: warning: 2 file(s) in val/ or test/")
    for copy in copies:
        assert f"  {copy} = {original}" in said
    assert f"`tl data check {root}`" in said[3]
    # the same files named from elsewhere: the remembered answer (nothing is read again),
    # printed under today's name of the data root
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(leaks, "copies_of_training_files", None)
    assert _fit("../data", *SKIP) == 0
    said = _leak_lines(capsys.readouterr().err)
    assert f"  ../data/{copies[0].relative_to(root)} = ../data/{original.relative_to(root)}" in said
    monkeypatch.undo()
    # a copy rewritten with other bytes of the same size is no longer one
    data = bytearray(copies[0].read_bytes())
    data[-3] ^= 0xFF
    copies[0].write_bytes(bytes(data))
    assert _fit(root, *SKIP) == 0
    said = _leak_lines(capsys.readouterr().err)
    assert said[0].startswith("tl: warning: 1 file(s)") and f"  {copies[1]} = {original}" in said


def test_a_staged_run_names_the_users_files_and_a_broken_test_folder_waits(leaky, capsys, tmp_path, monkeypatch):
    from tl_cli.data import stage

    monkeypatch.setattr(stage, "_READY", set())
    root, original, copies = leaky
    (root / "test" / "notes.txt").write_text("a layout problem in test/ waits for `tl test`\n")
    assert _fit(root, "--data.stage", tmp_path / "local", "--data.cache_dir", tmp_path / "cache") == 0
    said = _leak_lines(capsys.readouterr().err)
    assert f"  {copies[0]} = {original}" in said and "tl-stage" not in "\n".join(said)
    assert said[0].startswith("tl: warning: 1 file(s)")  # test/ is not listed, so not compared


def test_data_check_lists_the_copies_and_says_what_to_do(leaky, capsys):
    root, original, copies = leaky
    assert tl("data", "check", root, "--workers", "0") == 0  # a leak is not an error (--strict makes it one)
    out = capsys.readouterr().out
    assert f"{copies[1]} = {original}" in out or f"{original} = {copies[1]}" in out
    assert "remove the copies from val/ and test/" in out


def test_files_alike_in_size_and_head_but_not_in_bytes_are_not_copies(tmp_path):
    head = bytes(range(256)) * 64  # 16 KiB, as much as the first comparison reads
    a, b, c, d = (tmp_path / f"{n}.jpg" for n in "abcd")
    a.write_bytes(head + b"x" * 100)
    b.write_bytes(head + b"y" * 100)  # same size, same head, other tail
    c.write_bytes(head + b"x" * 100)  # a copy of a
    d.write_bytes(b"z" * 50)
    assert leaks.copies_of_training_files([a, d], [b, c]) == [(c, a)]
    assert leaks.copies_of_training_files([b], [a, c]) == []


def test_each_file_is_read_once_however_many_training_files_share_its_size(tmp_path, monkeypatch):
    # uncompressed images of one resolution all have one size: no file is compared with each
    rng = __import__("random").Random(0)
    head = bytes(range(256)) * 64
    train = []
    for i in range(200):
        path = tmp_path / f"t{i}.bmp"
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(64)) * 32)  # 2 KiB, distinct heads
        train.append(path)
    twins = [tmp_path / "twin_a.bmp", tmp_path / "twin_b.bmp"]  # same head, other tails, 2.5 MiB
    for twin, tail in zip(twins, (b"a", b"b"), strict=True):
        twin.write_bytes(head + tail * (5 * 2**19))
    others = [tmp_path / f"o{i}.bmp" for i in range(3)]
    others[0].write_bytes(train[137].read_bytes())
    others[1].write_bytes(twins[1].read_bytes())  # the second training file with its head
    others[2].write_bytes(bytes(rng.getrandbits(8) for _ in range(2048)))  # a stranger of the same size
    reads = []
    digest = leaks._digest
    monkeypatch.setattr(leaks, "_digest", lambda path, limit=None: reads.append(path) or digest(path, limit))
    found = leaks.copies_of_training_files([*train, *twins], others)
    assert found == [(others[0], train[137]), (others[1], twins[1])]
    assert len(reads) <= len(train) + len(twins) + len(others) + 3  # heads once; whole files where heads match
