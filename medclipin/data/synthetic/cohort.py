"""Who is in the dataset: patient and study ids, studies per patient, the patient split, and the
random streams every patient and study draws from.

Every study draws from its own ``numpy.random.Generator`` seeded by ``(seed, patient, study)``, so
pixels and reports do not depend on generation order or on ``n_patients`` (only the split does).
"""

from __future__ import annotations

import numpy as np

from medclipin.data.synthetic.design import SECOND_STUDY_PROBABILITY, SPLIT_FRACTIONS


def patient_rng(seed: int, patient: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, patient)))


def study_rngs(seed: int, patient: int, study: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Separate streams for the picture and the words, so rewording a report never moves a pixel.
    image = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, patient, study)))
    text = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, patient, study)))
    return image, text


def patient_id(patient: int) -> str:
    return f"SYN{patient + 1:05d}"


def study_id(patient: int, study: int) -> str:
    return f"{patient_id(patient)}_{study + 1:02d}"


def n_studies(seed: int, patient: int) -> int:
    return 2 if patient_rng(seed, patient).random() < SECOND_STUDY_PROBABILITY else 1


def assign_splits(seed: int, n_patients: int) -> list[str]:
    """Exact 70/10/20 proportions over a seeded permutation of patients."""
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,))).permutation(n_patients)
    n_train = int(round(SPLIT_FRACTIONS[0][1] * n_patients))
    n_val = int(round(SPLIT_FRACTIONS[1][1] * n_patients))
    splits = [""] * n_patients
    for rank, patient in enumerate(order):
        splits[patient] = "train" if rank < n_train else "validate" if rank < n_train + n_val else "test"
    return splits
