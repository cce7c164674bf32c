"""The one rule for ``--data.dataset`` (peft_lightning/data/source.py): a local file of each format, a folder of
files, a ``save_to_disk`` folder, relative paths, missing paths and hub names; the same missing-path line from the
vision, text and MovieLens data modules; the column errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_lightning.data.movielens import MovieLensDataModule
from peft_lightning.data.movielens_files import load_movielens
from peft_lightning.data.source import find_column, load_source, local_path
from peft_lightning.data.text import TextDataModule
from peft_lightning.data.vision import ImageDataModule
from peft_lightning.errors import UsageError

ROWS = {"text": ["good film", "bad plot", "great", "awful"], "label": [1, 0, 1, 0]}


def write(table, path: Path) -> Path:
    """``table`` in the format ``path``'s extension names."""
    import pyarrow as pa

    suffix = path.suffix
    if suffix == ".parquet":
        table.to_parquet(str(path))
    elif suffix in (".csv", ".tsv"):
        table.to_csv(str(path), index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in (".json", ".jsonl"):
        table.to_json(str(path))
    else:  # .arrow: the Arrow stream format `datasets` writes its own cache files in
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as writer:
            writer.write_table(table.data.table)
    return path


@pytest.fixture(scope="module")
def table():
    import datasets

    return datasets.Dataset.from_dict(ROWS)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".json", ".jsonl", ".arrow"])
def test_a_local_file_of_each_format_is_the_train_split(suffix, table, tmp_path):
    ds = load_source(str(write(table, tmp_path / f"data{suffix}")), cache_dir=str(tmp_path / "cache"))
    assert list(ds) == ["train"] and ds["train"].to_dict() == ROWS


def test_relative_paths_are_local_files_not_hub_names(table, tmp_path, monkeypatch):
    write(table, tmp_path / "m.parquet")
    monkeypatch.chdir(tmp_path)
    for name in ("m.parquet", "./m.parquet", str(tmp_path / "m.parquet")):
        assert local_path(name) == tmp_path / "m.parquet"
        assert load_source(name, cache_dir=str(tmp_path / "cache"))["train"].to_dict() == ROWS


def test_folders_of_files_and_save_to_disk_folders_keep_their_splits(table, tmp_path):
    import datasets

    folder = tmp_path / "csvs"
    folder.mkdir()
    write(table, folder / "train.csv")
    write(table.select([0, 1]), folder / "test.csv")
    # a recipe's hub configuration name (GLUE's `sst2`) does not stop a local copy from loading
    ds = load_source(str(folder), "sst2", cache_dir=str(tmp_path / "cache"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "test": 2}
    datasets.DatasetDict({"train": table, "validation": table.select([3])}).save_to_disk(str(tmp_path / "saved"))
    ds = load_source(str(tmp_path / "saved"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "validation": 1}
    table.save_to_disk(str(tmp_path / "one"))  # a single Dataset: the train split
    assert list(load_source(str(tmp_path / "one"))) == ["train"]


def test_names_and_paths_are_told_apart():
    for name in ("owner/name", "cifar10", "ml-100k"):
        assert local_path(name) is None  # a hub (or MovieLens) name
    for path in ("./nope", "nope.parquet", "~/nope", "/no/such", "a/b/c"):
        with pytest.raises(UsageError, match="does not exist"):
            local_path(path)


def test_a_file_of_another_format_says_which_formats_are_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(UsageError, match=r"expected a \.parquet/\.csv/.* file, or a folder"):
        load_source(str(tmp_path / "notes.txt"))


def test_hub_names_fail_offline_with_one_line(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest): the real `datasets.load_dataset` call, as on a machine without network.
    with pytest.raises(UsageError, match="could not load dataset 'owner/no-such' from the Hugging Face hub") as err:
        load_source("owner/no-such", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value) and "--data.dataset" in str(err.value)


MODULES = {
    "vision": lambda p: ImageDataModule(p, num_workers=0).setup(),
    "text": lambda p: TextDataModule(p, num_workers=0).setup(),
    "movielens": lambda p: MovieLensDataModule(p),
}


@pytest.mark.parametrize("module", MODULES)
def test_every_data_module_names_a_missing_path_the_same_way(module, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UsageError) as err:
        MODULES[module](missing)
    assert str(err.value) == f"--data.dataset {missing!r} does not exist: pass an existing file or folder"


def test_movielens_reads_a_relative_folder_and_refuses_a_file(tmp_path, monkeypatch):
    folder = tmp_path / "ml-local"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (folder / "movies.dat").write_text("10::Toy Story (1995)::Animation\n20::Heat (1995)::Action\n")
    monkeypatch.chdir(tmp_path)
    for name in ("ml-local", "./ml-local"):
        assert len(load_movielens(name).user) == 3
    with pytest.raises(UsageError, match="is a file: pass the folder of MovieLens files"):
        load_movielens("ml-local/ratings.dat")


def test_column_errors_name_the_columns_found_and_the_one_needed():
    import datasets

    features = datasets.Features({"pixels": datasets.List(datasets.Value("uint8")), "label": datasets.Value("int64")})
    is_text = lambda f: getattr(f, "dtype", None) == "string"  # noqa: E731
    with pytest.raises(UsageError) as err:
        find_column(features, None, "text", is_text, "strings")
    assert str(err.value) == (
        "the dataset has no text column (columns: pixels (list of uint8), label (int64); "
        "a text column holds strings): pass --data.text_column NAME"
    )
    with pytest.raises(UsageError, match=r"^column 'label' holds int64 \(columns: .*\): pass --data.text_column"):
        find_column(features, "label", "text", is_text, "strings")
    assert find_column(features, "label", "label") == "label"


# --- carving a missing split: one rule (data/splits.py) for the image and text data modules ---


def labelled(counts: dict[str, int]):
    import datasets

    names = list(counts)
    labels = [i for i, name in enumerate(names) for _ in range(counts[name])]
    features = datasets.Features({"x": datasets.Value("int64"), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"x": list(range(len(labels))), "label": labels}, features)}
    )


def test_carve_is_stratified_seeded_and_disjoint():
    from peft_lightning.data.splits import carve

    ds = labelled({"a": 20, "b": 10})
    carve(ds, "train", "validation", 0.2, 0, "label")
    val = ds["validation"]["label"]
    assert sorted(val) == [0, 0, 0, 0, 1, 1]  # each class keeps its share
    assert not set(ds["train"]["x"]) & set(ds["validation"]["x"]) and len(ds["train"]) == 24
    again = labelled({"a": 20, "b": 10})
    carve(again, "train", "validation", 0.2, 0, "label")
    assert again["validation"]["x"] == ds["validation"]["x"]


@pytest.mark.parametrize(
    ("counts", "fraction", "says"),
    [
        ({"a": 20, "rare": 1}, 0.2, "class 'rare' has a single example"),
        ({"a": 5, "b": 5, "c": 5}, 0.1, "0.1 x 15 examples cannot hold all 3 classes"),
    ],
)
def test_carve_that_cannot_stratify_says_so_and_splits_plainly(counts, fraction, says):
    from peft_lightning.data.splits import carve

    ds = labelled(counts)
    with pytest.warns(UserWarning, match="without stratifying by label") as caught:
        carve(ds, "train", "validation", fraction, 0, "label")
    assert says in str(caught[0].message) and "give the dataset a validation split" in str(caught[0].message)
    assert len(ds["train"]) + len(ds["validation"]) == sum(counts.values()) and len(ds["validation"]) >= 1
    assert not set(ds["train"]["x"]) & set(ds["validation"]["x"])


def test_carve_without_a_class_label_is_plain():
    from peft_lightning.data.splits import carve

    ds = labelled({"a": 9, "rare": 1})
    carve(ds, "train", "test", 0.2, 0, None)  # multi-label text: nothing to stratify by
    assert len(ds["test"]) == 2


def test_image_and_text_data_modules_carve_by_the_same_rule(image_folder, tmp_path):
    dm = ImageDataModule(str(image_folder), val_fraction=0.05, num_workers=0)
    with pytest.warns(UserWarning, match="cannot hold all 3 classes"):
        dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 32, "test": 2, "validation": 2}
    path = tmp_path / "rare.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'pos' if i else 'neg'}\n" for i in range(20)))
    text = TextDataModule(str(path), tokenizer=str(tmp_path / "no-tokenizer"), num_workers=0)
    with (
        pytest.warns(UserWarning, match="class 'neg' has a single example"),
        pytest.raises(UsageError, match="tokenizer"),
    ):
        text.setup()  # carving comes before the tokenizer is looked for
