"""Dataset adapters: public datasets' raw files -> split-aware manifests (``medclipin prepare``).

Each adapter module has an ``Options`` dataclass (its settings, each with a default and help text)
and ``prepare(root, options=None, **overrides) -> PrepareResult``; it raises
:class:`~medclipin.data.prepare.common.PrepareError` for input it cannot use. :data:`DATASETS` maps
the command-line name to the module, a one-line description and the options that name fixes.
Adapters never print text or identifiers and never parse a command line: they return records and
counts, and ``medclipin.commands.prepare`` turns the options into flags.

Example:
    >>> from medclipin.data.prepare import chexpert
    >>> result = chexpert.prepare("CheXpert-v1.0-small", uncertain="ones", frontal_only=True)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medclipin.data.prepare.common import PrepareError, PrepareResult, hash_split

# name -> (module, one-line description, options fixed by the name)
DATASETS: dict[str, tuple[str, str, dict]] = {
    "mimic-cxr": ("mimic_cxr", "MIMIC-CXR DICOM + reports (PhysioNet), official splits", {"jpg": False}),
    "mimic-cxr-jpg": ("mimic_cxr", "MIMIC-CXR-JPG + MIMIC-CXR reports, official splits", {"jpg": True}),
    "chexpert": ("chexpert", "CheXpert train/valid CSVs; --five-by-two-hundred for the 5x200 zero-shot set", {}),
    "iu-xray": ("iu_xray", "IU X-ray / Open-i report XMLs + PNGs, MeSH labels", {}),
    "rsna-pneumonia": ("rsna_pneumonia", "RSNA Pneumonia Detection DICOMs + boxes", {}),
    "rfmid": ("rfmid", "RFMiD fundus, 46 multi-label columns", {}),
    "odir": ("odir", "ODIR-5K fundus, per-eye labels from diagnostic keywords", {}),
    "image-folder": ("image_folder", "any folder-per-class image set", {}),
    "csv": ("table", "any CSV table with named columns", {}),
    "jsonl": ("table", "any JSONL table with named keys", {}),
}

__all__ = ["DATASETS", "PrepareError", "PrepareResult", "hash_split", "adapter"]


def adapter(name: str) -> ModuleType:
    """The adapter module for a dataset name (``KeyError`` naming the known ones)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return importlib.import_module(f"medclipin.data.prepare.{DATASETS[name][0]}")
