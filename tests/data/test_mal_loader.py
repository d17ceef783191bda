"""load_mal on the real sample and full data, and on corrupt copies of the sample."""

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest

from anime2vec.data.loader import SAMPLE_FILES, load_mal
from anime2vec.data.types import CATALOG_COLUMNS, INTERACTION_COLUMNS, MAL2023_USER_OFFSET, RECS_COLUMNS, DataError
from anime2vec.paths import default_data_dir

DATA = default_data_dir()
SAMPLE = DATA / "sample"
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"MAL data not found at {DATA}")

# sha256 of the staged files, from shared/data/README.md
SAMPLE_SHA256 = {
    "cooperunion_ratings_sample.csv": "9b83bbc6f702b9ffa903bf2085256d5b62d64860dbc079538ab2236ce188e402",
    "mal2023_animelists_sample_small.csv": "06fc88fa2c37cf413063a770f541db33025f337b0bbee6e417ced57a04332ee3",
    "anime_sample.csv": "65c9f0bc41454f984c24fa21595caa2c449929e57952bacc80a4a31c6ea456e0",
    "anime_recs_sample.csv": "df1fd8fe4d170129306fa36fd56f4468ff58a4b4081020d2dbb0ed0651373966",
    "anime_reviews_sample.csv": "cd1fc5e7d058c969a7aec37c13be6fe615f6331b2a7b8eebb94d965140548d68",
}


@pytest.fixture(scope="module")
def sample():
    return load_mal(sample=True)


@pytest.fixture
def broken(tmp_path):
    """A writable copy of the sample as `<tmp>/sample`; returns (data_dir, edit(name, frame -> frame))."""
    shutil.copytree(SAMPLE, tmp_path / "sample", copy_function=shutil.copyfile)

    def edit(name, change):
        path = tmp_path / "sample" / name
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        change(frame).to_csv(path, index=False)

    return tmp_path, edit


def set_value(row, column, value):
    """Change 1-based data row `row` of `column`."""

    def change(frame):
        frame.loc[row - 1, column] = value
        return frame

    return change


# --- the real sample ---------------------------------------------------------------------------


def test_sample_counts_and_columns(sample):
    assert sample.source == "sample"
    assert list(sample.catalog.columns) == list(CATALOG_COLUMNS) and len(sample.catalog) == 800
    assert sample.catalog.index.is_unique and sample.catalog.index.dtype == np.int64
    inter = sample.interactions
    assert list(inter.columns) == list(INTERACTION_COLUMNS)
    # README: 11,376 + 2,060 rows, no duplicate (user, anime) pairs; 150 + 20 users
    assert inter["source"].value_counts().to_dict() == {
        "cooperunion_ratings_sample.csv": 11_376,
        "mal2023_animelists_sample_small.csv": 2_060,
    }
    assert inter["user_id"].nunique() == 170
    assert not inter.duplicated(["user_id", "anime_id"]).any()
    assert list(sample.recs.columns) == list(RECS_COLUMNS) and len(sample.recs) == 8_580
    assert (sample.catalog["review"] != "").sum() == 100
    assert (sample.catalog["synopsis"] != "").all()
    assert not sample.catalog["synopsis"].str.contains("Written by MAL Rewrite", case=False).any()


def test_sample_rows_are_mapped_as_documented(sample):
    inter = sample.interactions.set_index(["user_id", "anime_id"])
    # first CooperUnion row: "72570,20,-1,tail" -> listed, unrated, weak positive
    row = inter.loc[(72570, 20)]
    assert row["status"] == "listed" and np.isnan(row["rating"]) and row["positive"] and row["confidence"] == 1.0
    # first MAL-2023 row: "53,136,0,2,62" -> completed, unscored, user id offset
    row = inter.loc[(53 + MAL2023_USER_OFFSET, 136)]
    assert row["status"] == "completed" and np.isnan(row["rating"]) and row["confidence"] == 1.0
    never = inter["status"].isin(["dropped", "plan_to_watch"]) | (inter["rating"] <= 5)
    assert never.sum() > 0 and not inter.loc[never, "positive"].any()
    assert ((inter["confidence"] > 0) == inter["positive"]).all()


def test_sample_members_count_interaction_rows(sample):
    rows = sum((pd.read_csv(SAMPLE / SAMPLE_FILES[k])["anime_id"] == 1).sum() for k in ("ratings", "lists"))
    assert rows > 0 and sample.catalog.loc[1, "members"] == rows
    assert sample.catalog.loc[1, "title"] == "Cowboy Bebop" and sample.catalog.loc[1, "title_english"] == ""


def test_file_hashes_and_fingerprint(sample, broken):
    assert sample.files == SAMPLE_SHA256
    expected = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(SAMPLE_SHA256.items())).encode())
    assert sample.fingerprint == expected.hexdigest()
    data_dir, edit = broken
    edit("anime_recs_sample.csv", lambda f: f.iloc[:-1])
    assert load_mal(data_dir, sample=True).fingerprint != sample.fingerprint


# --- corrupt copies ----------------------------------------------------------------------------


def test_missing_file(broken):
    data_dir, _ = broken
    (data_dir / "sample" / "anime_recs_sample.csv").unlink()
    with pytest.raises(DataError, match="anime_recs_sample.csv: file not found") as err:
        load_mal(data_dir, sample=True)
    assert err.value.file == "anime_recs_sample.csv" and err.value.row is None


def test_missing_column(broken):
    data_dir, edit = broken
    edit("mal2023_animelists_sample_small.csv", lambda f: f.drop(columns="watching_status"))
    with pytest.raises(
        DataError, match="mal2023_animelists_sample_small.csv: missing required column.*watching_status"
    ):
        load_mal(data_dir, sample=True)


def test_rating_outside_the_allowed_set_names_file_and_row(broken):
    data_dir, edit = broken
    edit("cooperunion_ratings_sample.csv", set_value(57, "rating", "11"))
    with pytest.raises(DataError) as err:
        load_mal(data_dir, sample=True)
    assert (err.value.file, err.value.row) == ("cooperunion_ratings_sample.csv", 57)
    assert str(err.value).startswith("cooperunion_ratings_sample.csv, row 57: rating 11 is not one of")


def test_bad_watching_status(broken):
    data_dir, edit = broken
    edit("mal2023_animelists_sample_small.csv", set_value(10, "watching_status", "5"))
    with pytest.raises(
        DataError, match=r"mal2023_animelists_sample_small.csv, row 10: watching_status 5 is not one of"
    ):
        load_mal(data_dir, sample=True)


def test_unparsable_id_row_counts_records_not_lines(broken):
    # anime_sample.csv has multi-line synopses: row 3 is the third record, far below line 4
    data_dir, edit = broken
    edit("anime_sample.csv", set_value(3, "anime_id", "x3"))
    with pytest.raises(DataError, match=r"anime_sample.csv, row 3: anime_id 'x3' is not an integer"):
        load_mal(data_dir, sample=True)


def test_empty_user_id(broken):
    data_dir, edit = broken
    edit("cooperunion_ratings_sample.csv", set_value(2, "user_id", ""))
    with pytest.raises(DataError, match=r"cooperunion_ratings_sample.csv, row 2: user_id is empty"):
        load_mal(data_dir, sample=True)


def test_a_problem_in_the_last_file_read_still_returns_nothing(broken):
    # every other file is fine and already parsed when the recs file fails
    data_dir, edit = broken
    edit("anime_recs_sample.csv", set_value(8_580, "num_users", "many"))
    result = None
    with pytest.raises(DataError, match=r"anime_recs_sample.csv, row 8580"):
        result = load_mal(data_dir, sample=True)
    assert result is None


def test_duplicates_keep_the_first_row_and_unknown_anime_are_kept(broken):
    data_dir, edit = broken
    extra = pd.DataFrame(
        {"user_id": ["72570", "72570"], "anime_id": ["20", "999999"], "rating": ["3", "8"], "source": ["tail", "tail"]}
    )
    edit("cooperunion_ratings_sample.csv", lambda f: pd.concat([f, extra], ignore_index=True))
    inter = load_mal(data_dir, sample=True).interactions.set_index(["user_id", "anime_id"])
    assert len(inter) == 11_376 + 2_060 + 1
    assert inter.loc[(72570, 20), "status"] == "listed"  # the first row, not the later rating 3
    assert inter.loc[(72570, 999999), "confidence"] == pytest.approx(3.4)


# --- the full data -----------------------------------------------------------------------------


def test_full_data_loads():
    data = load_mal()
    inter, cat = data.interactions, data.catalog
    assert data.source == "full" and len(data.files) == 8
    # README counts: 612,645 + 303,441 rows, 5,888 + 576 users, no duplicates
    assert len(inter) == 612_645 + 303_441 and inter["user_id"].nunique() == 5_888 + 576
    assert inter["status"].value_counts()[["rated", "listed", "completed", "plan_to_watch"]].tolist() == [
        494_309,
        118_336,
        195_584,
        75_676,
    ]
    # synopses: 14,925 from the 2021 pages + 1,761 from the supplement; one review for 7,921 anime
    assert (cat["synopsis"] != "").sum() == 14_925 + 1_761
    assert (cat["review"] != "").sum() == 7_921 and len(data.recs) == 46_604
    assert cat.index.is_unique and len(cat) >= 24_901  # at least every anime of the 2023 table
    fma = cat.loc[5114]
    assert fma["year"] == 2009 and fma["type"] == "TV" and fma["episodes"] == 64 and "FMAB" in fma["synonyms"]
    # HTML entities decoded (CooperUnion names, supplement synopses, reviews)
    for column in ("title", "synopsis", "review"):
        assert not cat[column].str.contains(r"&(?:quot|amp|#039|rsquo);").any()
    assert not cat["synopsis"].str.contains(r"\[Written by MAL Rewrite\]|\(Source: ANN\)").any()
