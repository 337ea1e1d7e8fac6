"""Shared adapter pieces (hash split, tables) and tiny-file helpers used by the other prepare tests."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from medclipin.data.prepare import DATASETS, adapter
from medclipin.data.prepare.common import PrepareError, hash_split, read_table


def write_dicom(path: Path, view: str = "PA", size: int = 8, value: int = 100) -> Path:
    """A tiny valid DICOM (uncompressed, 16-bit MONOCHROME2) with invented identifiers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "FAKE"
    ds.Modality = "CR"
    ds.ViewPosition = view
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 7 + value) % 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image(path: Path, value: int = 80, size: int = 8, mode: str = "L") -> Path:
    """A tiny PNG/JPG with Pillow; ``value`` varies the content so files differ."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (np.arange(size * size).reshape(size, size) + value) % 256
    image = Image.fromarray(array.astype(np.uint8), mode="L")
    (image.convert("RGB") if mode == "RGB" else image).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = buffer.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_hash_split_is_deterministic_and_follows_fractions():
    ids = [f"patient{i}" for i in range(3000)]
    first = [hash_split(i) for i in ids]
    assert first == [hash_split(i) for i in ids]
    counts = {s: first.count(s) for s in ("train", "validate", "test")}
    assert 2250 < counts["train"] < 2550 and 200 < counts["validate"] < 400
    assert {hash_split(i, (1, 0, 0)) for i in ids[:50]} == {"train"}
    assert [hash_split(i, salt="other") for i in ids[:50]] != first[:50]
    with pytest.raises(PrepareError):
        hash_split("x", (0.5, 0.5))


def test_read_table_formats(tmp_path):
    write_csv(tmp_path / "a.csv.gz", ["x", "y"], [[1, "é"]], gz=True)
    assert read_table(tmp_path / "a.csv.gz") == [{"x": "1", "y": "é"}]
    (tmp_path / "b.csv").write_bytes("x,y\n1,\xb0C\n".encode("cp1252"))  # not UTF-8
    assert read_table(tmp_path / "b.csv") == [{"x": "1", "y": "°C"}]
    (tmp_path / "c.jsonl").write_text('{"x": 1, "y": null}\n\n{"x": 2, "y": "b"}\n')
    assert read_table(tmp_path / "c.jsonl") == [{"x": "1", "y": ""}, {"x": "2", "y": "b"}]
    with pytest.raises(PrepareError):
        read_table(tmp_path / "missing.csv")


def test_every_registered_adapter_imports():
    import dataclasses

    for name in DATASETS:
        module = adapter(name)
        assert callable(module.prepare) and dataclasses.is_dataclass(module.Options) and module.__doc__
        assert not hasattr(module, "add_arguments")  # parsing is the command's job
    with pytest.raises(KeyError):
        adapter("nope")


def test_adapters_take_typed_options_and_raise_prepare_errors(tmp_path):
    """No argparse below medclipin/commands: an adapter is called with options or keywords, and bad
    input is a PrepareError (a MedclipinError), never SystemExit."""
    from medclipin.data.prepare import chexpert, image_folder, table
    from medclipin.errors import MedclipinError

    for name in ("a", "b"):
        write_image(tmp_path / "set" / name / f"{name}1.png")
    result = image_folder.prepare(tmp_path / "set", text_from_class=True, split_fractions=(1, 0, 0))
    assert {r.text for r in result.records} == {"a", "b"} and {r.split for r in result.records} == {"train"}
    options = image_folder.Options(view="PA")
    assert {r.view for r in image_folder.prepare(tmp_path / "set", options).records} == {"PA"}
    with pytest.raises(PrepareError, match="uncertain"):
        chexpert.Options(uncertain="maybe")
    with pytest.raises(PrepareError, match="split fractions"):
        image_folder.Options(split_fractions=(1, 1))
    with pytest.raises(PrepareError, match="image_column"):
        table.prepare(tmp_path, label_column="x")
    with pytest.raises(PrepareError, match="train.csv"):
        chexpert.prepare(tmp_path / "set")
    assert issubclass(PrepareError, MedclipinError)
    with pytest.raises(TypeError):
        image_folder.prepare(tmp_path / "set", no_such_option=1)
