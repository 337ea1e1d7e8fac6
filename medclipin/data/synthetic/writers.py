"""The files of a synthetic study: CR DICOM (12-bit, explicit VR little endian) and the rendered PNG."""

from __future__ import annotations

from pathlib import Path

from medclipin.data.synthetic.study import SyntheticStudy

_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


class DicomWriter:
    """Writes studies as CR DICOM. The constant part of the header is built once and only the
    per-study elements are replaced, because building a pydicom Dataset dominates the write time."""

    def __init__(self, seed: int):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

        self.seed = seed
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = "1.2"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SOPClassUID = _CR_IMAGE_STORAGE
        ds.SOPInstanceUID = "1.2"
        ds.StudyDate = ""
        ds.SeriesDate = ""
        ds.AccessionNumber = ""
        ds.Modality = "CR"
        ds.Manufacturer = "medclipin synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC CHEST"
        ds.SeriesDescription = ""
        ds.PatientName = ""
        ds.PatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.BurnedInAnnotation = "NO"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = ""
        ds.StudyInstanceUID = "1.2"
        ds.SeriesInstanceUID = "1.2"
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.PatientOrientation = ["L", "F"]  # patient's right on the image left, as a PA/AP film is viewed
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 0
        ds.Columns = 0
        ds.PixelSpacing = [1.0, 1.0]
        ds.ImagerPixelSpacing = [1.0, 1.0]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 0
        ds.WindowWidth = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.LossyImageCompression = "00"
        ds.PixelData = b""
        self.ds = ds

    def _uid(self, study_id: str, kind: str) -> str:
        from pydicom.uid import generate_uid

        # derived from seed + ids, so a rerun writes byte-identical files
        return generate_uid(entropy_srcs=["medclipin-synthetic", str(self.seed), study_id, kind])

    def write(self, study: SyntheticStudy, path: Path) -> None:
        ds = self.ds
        sop_uid = self._uid(study.study_id, "sop")
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = self._uid(study.study_id, "study")
        ds.SeriesInstanceUID = self._uid(study.study_id, "series")
        ds.StudyDate = ds.SeriesDate = study.study_date
        ds.SeriesDescription = f"CHEST {study.view}"
        ds.PatientName = "SYNTHETIC^" + study.patient_id
        ds.PatientID = study.patient_id
        ds.PatientSex = study.sex
        ds.ViewPosition = study.view
        ds.StudyID = study.study_id[-2:]
        ds.PhotometricInterpretation = study.photometric
        ds.Rows, ds.Columns = study.stored.shape
        ds.PixelSpacing = ds.ImagerPixelSpacing = [round(study.pixel_spacing_mm, 6)] * 2
        ds.WindowCenter, ds.WindowWidth = study.window
        ds.PixelData = study.stored.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)


def write_png(study: SyntheticStudy, path: Path) -> None:
    from PIL import Image

    Image.fromarray(study.rendered, mode="L").save(path, compress_level=1)  # fast; PNGs are small anyway
