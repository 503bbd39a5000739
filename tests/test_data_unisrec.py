"""UniSRec processed folders: rebuilt sequences give back exactly their leave-one-out rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import DatasetError, load, prepare

WINDOW = 50
HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def loo_rows(sequence: list[int], window: int = WINDOW) -> tuple[list[tuple], tuple, tuple]:
    """UniSRec's rows of one sequence: train prefixes (history, target), valid row, test row."""
    train = [(tuple(sequence[:t][-window:]), sequence[t]) for t in range(1, len(sequence) - 2)]
    valid = (tuple(sequence[:-2][-window:]), sequence[-2])
    test = (tuple(sequence[:-1][-window:]), sequence[-1])
    return train, valid, test


def write_unisrec(folder: Path, prefix: str, sequences: dict[str, list[int]], n_items: int,
                  descending: set[str] = frozenset()) -> None:
    """A UniSRec folder holding SEQUENCES (reviewer → item indices); train rows of DESCENDING users reversed."""
    folder.mkdir(parents=True, exist_ok=True)
    users = list(sequences)
    (folder / f"{prefix}.user2index").write_text("".join(f"{u}\t{i}\n" for i, u in enumerate(users)))
    (folder / f"{prefix}.item2index").write_text("".join(f"ASIN{i:04d}\t{i}\n" for i in range(n_items)))
    (folder / f"{prefix}.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"ASIN{i:04d}\tItem {i}. Cat. Brand. \n" for i in range(n_items)))
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for uidx, user in enumerate(users):
        train, valid, test = loo_rows(sequences[user])
        if user in descending:
            train = train[::-1]
        parts["train"] += [f"{uidx}\t{' '.join(map(str, h))}\t{t}\n" for h, t in train]
        parts["valid"].append(f"{uidx}\t{' '.join(map(str, valid[0]))}\t{valid[1]}\n")
        parts["test"].append(f"{uidx}\t{' '.join(map(str, test[0]))}\t{test[1]}\n")
    for part, rows in parts.items():
        (folder / f"{prefix}.{part}.inter").write_text(HEADER + "".join(rows))


def _sequences(n_items: int = 30, seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    seqs = {f"R{u}": rng.integers(0, n_items, size=int(n)).tolist() for u, n in enumerate([3, 4, 7, 52, 53, 80])}
    seqs["R6"] = [1, 2, 1, 2, 1, 2] * 15  # repeats: the history chain must still be followed in order
    used = sorted({i for s in seqs.values() for i in s})
    seqs["R7"] = [i for i in range(n_items) if i not in used][:3] or [0, 1, 2]
    return seqs


def test_sequences_are_rebuilt_from_cut_histories_in_any_row_order(home, tmp_path):
    seqs = _sequences()
    folder = tmp_path / "Tiny"
    write_unisrec(folder, "Tiny", seqs, n_items=30, descending={"R3", "R5", "R6"})
    out = prepare(str(folder))
    ds = load("Tiny")
    assert out.name == "Tiny" and ds.user_ids == list(seqs)
    assert [s.tolist() for s in ds.sequences] == list(seqs.values())
    assert ds.items["item_id"].to_list() == [f"ASIN{i:04d}" for i in range(30)]
    assert ds.items["text"][3] == "Item 3. Cat. Brand."
    assert ds.meta["filters"]["history_window"] == WINDOW
    assert ds.meta["source"]["kind"] == "unisrec"


def _break_line(path: Path, number: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = new
    path.write_text("".join(lines))


def test_item_not_in_item2index_names_file_and_line(home, tmp_path):
    folder = tmp_path / "Tiny"
    write_unisrec(folder, "Tiny", _sequences(), n_items=30)
    _break_line(folder / "Tiny.valid.inter", 4, "2\t1 2 3 4 99\t5\n")
    with pytest.raises(DatasetError, match=r"Tiny\.valid\.inter:4: item '99' is not in item2index"):
        prepare(str(folder))
    assert not (home / "data" / "Tiny").exists()


def test_inconsistent_rows_are_refused(home, tmp_path):
    folder = tmp_path / "Tiny"
    write_unisrec(folder, "Tiny", _sequences(), n_items=30)
    test_lines = (folder / "Tiny.test.inter").read_text().splitlines(keepends=True)
    user, history, target = test_lines[3].rstrip("\n").split("\t")
    _break_line(folder / "Tiny.test.inter", 4, f"{user}\t{history}\t{target}\n".replace("\t", "\t0 ", 1))
    with pytest.raises(DatasetError, match=r"Tiny\.test\.inter:4: history does not match"):
        prepare(str(folder))


@pytest.mark.slow
def test_sci_from_shared_data_matches_table1_and_their_split(home, shared_data):
    """Paper Table 1 exactly, and our derived leave-one-out equals every row of their three files."""
    folder = shared_data / "amazon-sci-unisrec"
    prepare("sci", from_dir=folder)
    ds = load("sci")
    assert ds.stats() == {"users": 8442, "items": 4385, "interactions": 59427, "per_user": 7.0, "per_item": 13.6}
    item2index = dict(line.split("\t") for line in (folder / "Scientific.item2index").read_text().splitlines())
    assert all(int(item2index[a]) == i for i, a in enumerate(ds.items["item_id"]))
    derived: dict[str, set] = {"train": set(), "valid": set(), "test": set()}
    for uidx, seq in enumerate(ds.sequences):
        train, valid, test = loo_rows(seq.tolist())
        derived["train"].update((uidx, h, t) for h, t in train)
        derived["valid"].add((uidx, *valid))
        derived["test"].add((uidx, *test))
    for part, rows in derived.items():
        theirs = [line.split("\t") for line in (folder / f"Scientific.{part}.inter").read_text().splitlines()[1:]]
        theirs_set = {(int(u), tuple(map(int, h.split())), int(t)) for u, h, t in theirs}
        assert len(theirs_set) == len(theirs) and theirs_set == rows, part

    prepare("ins", from_dir=shared_data / "amazon-ins-mql4grec")
    assert load("ins").stats() == {"users": 17112, "items": 6250, "interactions": 136226,
                                   "per_user": 8.0, "per_item": 21.8}
