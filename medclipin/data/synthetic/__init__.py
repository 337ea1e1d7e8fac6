"""The embedded synthetic chest-X-ray dataset: seeded, deterministic, no real patients.

Each study is a grayscale frontal radiograph-like image (body outline, lung fields, heart, ribs,
clavicles, spine, lung markings, noise) with up to three of five findings drawn as lesions at
recorded positions, a free-text radiology report (FINDINGS + IMPRESSION) that describes them with
location words and negates some absent findings, 0/1 labels and bounding boxes. It is written both
as 12-bit CR DICOM (MONOCHROME1 or MONOCHROME2) and as the rendered 8-bit PNG.

The image statistics are randomised per image (exposure, gamma, window, body size, position,
rotation, noise, breast shadows, side markers) so that no single global pixel statistic predicts a
finding; a model has to look at the lesion. The dataset card is ``datasets/synthetic/README.md``.

Determinism: every study draws from its own ``numpy.random.Generator`` seeded by
``(seed, patient index, study index)``, so pixels and reports do not depend on generation order or
on ``n_patients`` (only the patient → split assignment does).

The modules, in the order a study is made:

* ``design`` — classes, prevalences, split fractions, ``GENERATOR_VERSION``;
* ``cohort`` — patient and study ids, studies per patient, the split, the random streams;
* ``drawing`` — body frame, lung outlines, the shared ``Scene``, vectorised drawing helpers;
* ``anatomy`` — the normal chest; ``lesions`` — the five findings; ``radiograph`` — composition and
  acquisition into one image;
* ``reports`` — FINDINGS and IMPRESSION text from the drawn findings;
* ``study`` — ``synthesize_study``: one study from ``(seed, patient, study)``;
* ``writers`` — DICOM and PNG files; ``dataset`` — ``generate_synthetic_dataset``: the folder.
"""

from medclipin.data.synthetic.dataset import SyntheticDatasetError, generate_synthetic_dataset
from medclipin.data.synthetic.design import CLASS_NAMES, GENERATOR_VERSION
from medclipin.data.synthetic.study import SyntheticStudy, synthesize_study

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "SyntheticDatasetError",
    "SyntheticStudy",
    "generate_synthetic_dataset",
    "synthesize_study",
]
