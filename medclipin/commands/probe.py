"""Linear probe on frozen image features (MGCA protocol): one-vs-rest logistic regression per label,
trained on 1%, 10% and 100% of the training split's labels (seeded, stratified subsets with at least
one positive per class where possible) and scored by AUC on the test split, mean ± std over seeds.
Writes OUT/probe.json and OUT/probe.md. With --test-manifest M2 the probe is trained on --manifest's
training split and scored on every record of M2 (an external set; its split column is ignored).
Operating points: the probe trained on all the training labels, its per-class threshold (--threshold) and
calibration (--calibration) fitted on --fit-split (validate), applied unchanged to the test records:
``probe.clinical.per_class[CLASS].operating_point`` / ``.calibration`` and ``probe.clinical.subgroups``.

Example: medclipin probe --checkpoint demo_out/run/model --manifest demo_out/data/manifest.csv
         --out eval_out/probe --fractions 0.01 0.1 1.0 --seeds 0 1 2
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from medclipin.commands.session import add_model_arguments, add_test_manifest_argument, non_negative_int

    add_model_arguments(parser)
    add_test_manifest_argument(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="label fractions of the training split (default 0.01 0.1 1.0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset seeds (default 0 1 2)")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="label columns to probe (default: every label:<class> column of the manifest)")
    parser.add_argument("--train-split", default="train", help="split the probe is trained on (default train)")
    parser.add_argument("--split", default="test", help="split the probe is scored on (default test)")
    parser.add_argument("--fit-split", default="validate",
                        help="split of --manifest that chooses the 100%% probe's thresholds and calibration "
                             "(default validate; 'none' = no operating points)")
    parser.add_argument("--threshold", default="youden",
                        help="operating point per class: youden (default), sensitivity=0.90 or fixed=0.5")
    parser.add_argument("--calibration", choices=("platt", "temperature", "none"), default="platt",
                        help="probability map fitted on the fit split (default platt)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000,
                        help="bootstrap resamples for the operating-point CIs (default 1000)")
    parser.add_argument("--features", choices=("encoder", "embedding"), default="encoder",
                        help="encoder: the image tower's pooled feature (default, MGCA); "
                             "embedding: the normalised contrastive embedding")


def run(args) -> int:
    from medclipin.eval.evaluate import probe
    from medclipin.eval.report import probe_markdown, write_json
    from medclipin.commands.session import check_outputs, load_split, open_store, run_info, test_records as scored

    from medclipin.eval.operating_point import parse_threshold_rule

    check_outputs(args)  # before the manifest and the model
    rule = parse_threshold_rule(args.threshold)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if any(not 0 < f <= 1 for f in args.fractions):
        print(f"error: --fractions must be in (0, 1], got {args.fractions}", file=sys.stderr)
        return 2
    out = Path(args.out)
    manifest, train_records = load_split(args.manifest, args.train_split)
    test_records = scored(args, args.split)  # --test-manifest: every record of it
    classes = args.classes or list(manifest.label_names)
    unknown = [c for c in classes if c not in manifest.label_names]
    if unknown or not classes:
        print(f"error: classes {unknown or classes} are not label columns of {args.manifest} "
              f"(columns: {manifest.label_names})", file=sys.stderr)
        return 2
    store, model_dir, cache_dir = open_store(args, out)
    result = probe(store, train_records, test_records, classes, fractions=args.fractions, seeds=args.seeds,
                   features=args.features)
    if args.fit_split != "none":
        from medclipin.eval.evaluate import probe_clinical

        result["clinical"] = probe_clinical(
            store, train_records, manifest.split(args.fit_split), test_records, classes,
            rule, calibration=args.calibration, bootstrap=args.bootstrap,
            seed=args.seeds[0], features=args.features)
    run_block = run_info(args, store, model_dir, cache_dir, split=args.split, n_records=len(test_records))
    run_block["features"] = args.features
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", {"run": run_block, "probe": result})
    (out / "probe.md").write_text(probe_markdown(result, run_block), encoding="utf-8")
    for key, entry in result["fractions"].items():
        macro = entry["macro_auc"]
        text = "n/a" if macro["mean"] is None else f"{macro['mean']:.3f} ± {macro['std']:.3f}"
        print(f"labels {entry['fraction'] * 100:g}%: macro AUC {text} (n train {entry['n_train']})")
    print(f"wrote {out / 'probe.json'}, {out / 'probe.md'}")
    return 0
