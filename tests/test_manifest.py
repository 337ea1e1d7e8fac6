"""The manifest format: round trip, relative paths, and errors that name file, row and field."""

import json

import pytest

from medclipin.data.manifest import Box, ManifestError, Record, read_manifest, write_manifest


def _records(tmp_path):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"")
    return [
        Record("r1", "p1", "s1", str(image), "train", view="PA", findings="No effusion.", impression="Normal.",
               labels={"Pleural Effusion": 0.0, "Nodule": 1.0}, boxes=[Box("Nodule", (1.0, 2.0, 3.0, 4.0))]),
        Record("r2", "p2", "s2", str(image), "test", labels={"Pleural Effusion": -1.0, "Nodule": None}),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_field(tmp_path, suffix):
    records = _records(tmp_path)
    path = write_manifest(tmp_path / f"manifest{suffix}", records)
    manifest = read_manifest(path)
    assert manifest.label_names == ["Pleural Effusion", "Nodule"]
    assert [r.record_id for r in manifest.records] == ["r1", "r2"]
    first, second = manifest.records
    assert first.image_path == records[0].image_path  # relative in the file, absolute when read
    assert first.labels == {"Pleural Effusion": 0.0, "Nodule": 1.0}
    assert second.labels == {"Pleural Effusion": -1.0, "Nodule": None}
    assert first.boxes == [Box("Nodule", (1.0, 2.0, 3.0, 4.0))]
    assert first.findings == "No effusion." and first.view == "PA"
    assert manifest.split("test") == [second]


def test_paths_are_stored_relative(tmp_path):
    path = write_manifest(tmp_path / "m.csv", _records(tmp_path))
    assert "images/a.png" in path.read_text() and str(tmp_path) not in path.read_text()


def test_bad_split_names_row_and_field(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("record_id,image_path,split\nr1,a.png,training\n")
    with pytest.raises(ManifestError, match=r"m\.csv, row 2: field 'split' is 'training'"):
        read_manifest(path)


def test_bad_label_value_names_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("record_id,image_path,split,label:Nodule\nr1,a.png,train,yes\n")
    with pytest.raises(ManifestError, match="label:Nodule"):
        read_manifest(path)


def test_duplicate_record_id_and_missing_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("record_id,image_path,split\nr1,a.png,train\nr1,b.png,test\n")
    with pytest.raises(ManifestError, match="duplicate record_id 'r1'"):
        read_manifest(path)
    path.write_text("record_id,text\nr1,hello\n")
    with pytest.raises(ManifestError, match="columns"):
        read_manifest(path)


def test_bad_boxes_and_bad_json_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('record_id,image_path,split,boxes\nr1,a.png,train,"[{""label"": ""x""}]"\n')
    with pytest.raises(ManifestError, match="boxes"):
        read_manifest(path)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"record_id": "r1", "image_path": "a", "split": "train"}) + "\n{oops\n")
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(jsonl)


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    """Excel and Windows tools save CSV with a UTF-8 BOM; it used to make 'record_id' unreadable."""
    text = "record_id,patient_id,study_id,image_path,split,findings\nr1,p1,s1,a.png,train,Clear.\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"record_id": "r1", "image_path": "a.png", "split": "train"}\n')
    for name in ("bom.csv", "bom.jsonl"):
        records = read_manifest(tmp_path / name).records
        assert [r.record_id for r in records] == ["r1"] and records[0].split == "train"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_other_columns_are_kept_in_extra(tmp_path, suffix):
    records = _records(tmp_path)
    records[0].extra = {"pair_noise": "swapped"}
    path = write_manifest(tmp_path / f"m{suffix}", records)
    first, second = read_manifest(path).records
    assert first.extra == {"pair_noise": "swapped"} and second.extra == {"pair_noise": ""}
    records[0].extra = {}
    assert read_manifest(write_manifest(tmp_path / f"plain{suffix}", records)).records[0].extra == {}


def test_a_manifest_in_another_encoding_or_with_a_huge_cell_names_the_line(tmp_path):
    """W5, W6 (issue 25): a Latin-1 manifest was a raw UnicodeDecodeError, a cell over 128 KB a raw _csv.Error."""
    header = "record_id,patient_id,image_path,split,findings\n"
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes((header + "a,p1,a.png,train,ok\nb,p2,b.png,train,épanchement\n").encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv, line 3: not UTF-8 \(byte 0xe9\); save the manifest as UTF-8"):
        read_manifest(latin1)
    huge = tmp_path / "huge.csv"
    huge.write_text(header + "a,p1,a.png,train,ok\nb,p2,b.png,train," + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"huge.csv, line 3: not a readable CSV row \(field larger than"):
        read_manifest(huge)
    listed = tmp_path / "m.jsonl"
    listed.write_text('{"record_id": "a", "image_path": "a.png", "split": "train"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m.jsonl, line 2: a record must be a JSON object"):
        read_manifest(listed)
