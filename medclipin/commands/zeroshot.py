"""Zero-shot classification from a prompt file (YAML: templates × class descriptions).

Multi-label prompt files score each class by the softmax over its positive/negative prompt-ensemble
pair; multi-class files by the softmax over the classes. Reports AUC, accuracy and F1 per class and
macro (threshold rule: positive when the score is >= 0.5 for multi-label, argmax for multi-class),
with bootstrap 95% CIs that survive constant label columns. Writes OUT/zeroshot.json,
OUT/zeroshot.md (exactly what ran: prompt file + sha256, split, counts, per-class table) and
OUT/zeroshot_roc.png.

As a clinical study: per class, a threshold chosen on --manifest's validate split (--threshold: youden,
sensitivity=0.9 or fixed=0.5) and a calibrator fitted there (--calibration platt|temperature|none) are
applied unchanged to the test set, which is --manifest's --split or every record of --test-manifest (an
external set). OUT/report.md, for a clinician, shows the operating points (sensitivity, specificity, PPV,
NPV, F1, MCC with 95% CIs), calibration (ECE, Brier, reliability diagram), subgroups (view, sex, age band,
source) and ROC curves with CI bands.

Example: medclipin zeroshot --checkpoint demo_out/run/model --manifest demo_out/data/manifest.csv
         --prompts datasets/synthetic/prompts.yaml --out eval_out/zeroshot
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from medclipin.commands.session import add_model_arguments, non_negative_int

    add_model_arguments(parser)
    add_clinical_arguments(parser)
    parser.add_argument("--prompts", required=True, help="prompt YAML (e.g. datasets/chexpert/prompts_5x200.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", help="manifest split to evaluate: train, validate, test or all (default test)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples for the 95%% CIs (0 = none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def add_clinical_arguments(parser, gradcam: bool = True) -> None:
    """The clinical-study options shared by zeroshot and compare."""
    from medclipin.commands.session import add_test_manifest_argument, non_negative_int

    add_test_manifest_argument(parser)
    parser.add_argument("--fit-split", default="validate",
                        help="split of --manifest that chooses thresholds and fits calibration (default validate)")
    parser.add_argument("--threshold", default="youden",
                        help="operating point per class: youden (default), sensitivity=0.90 or fixed=0.5")
    parser.add_argument("--calibration", choices=("platt", "temperature", "none"), default="platt",
                        help="score-to-probability map fitted on the fit split (default platt)")
    if not gradcam:
        return
    parser.add_argument("--gradcam-examples", type=non_negative_int, default=3,
                        help="Grad-CAM figures in report.md: one true positive, false positive and false negative "
                             "each, up to this many (default 3; 0 = none)")


def clinical_inputs(args, store, prompts, split: str):
    """(the records to score, (fit-set scores, fit-set labels, fit records read), caveat notes) of one model:
    the fit set is ``--manifest``'s ``--fit-split``; a caveat names any overlap between it and the test set."""
    from medclipin.commands.session import load_split, test_records
    from medclipin.eval.evaluate import score_records

    notes = []
    manifest = load_split(args.manifest, "all")[0]
    fit = manifest.split(args.fit_split) if args.fit_split != "all" else manifest.records
    if not fit:
        notes.append(f"{args.manifest} has no {args.fit_split!r} records: no thresholds and no calibration were fitted")
    elif not getattr(args, "test_manifest", None) and (split == "all" or split == args.fit_split):
        notes.append(f"the thresholds were chosen on split {args.fit_split!r}, which is also scored here: the "
                     "operating points are optimistic")
    test = test_records(args, split)
    shared = {r.image_path for r in fit} & {r.image_path for r in test}
    if shared and getattr(args, "test_manifest", None):
        notes.append(f"{len(shared)} images of the test manifest are also in the {args.fit_split!r} split that chose "
                     "the thresholds: the test set is not independent of them")
    fit_records, fit_scores, fit_labels = score_records(store, fit, prompts)
    return test, (fit_scores, fit_labels, len(fit_records)), notes


def run(args) -> int:
    from medclipin.eval.evaluate import zero_shot
    from medclipin.eval.report import plot_roc, write_json, zeroshot_markdown
    from medclipin.commands.session import check_outputs, load_split, open_store, run_info, test_records
    from medclipin.eval.zeroshot import load_prompts
    from medclipin.eval.clinical import clinical_metrics
    from medclipin.eval.clinical_report import write_clinical_report
    from medclipin.eval.operating_point import parse_threshold_rule

    check_outputs(args)  # before the prompts, the manifest and the model: fail in a second, not after the work
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    prompts = load_prompts(args.prompts)
    rule = parse_threshold_rule(args.threshold)
    load_split(args.manifest, "all")  # a missing manifest, test manifest or empty split fails here, before the model
    test_records(args, args.split)
    store, model_dir, cache_dir = open_store(args, out)
    try:
        records, (fit_scores, fit_labels, n_fit), notes = clinical_inputs(args, store, prompts, args.split)
        result = zero_shot(store, records, prompts, bootstrap=args.bootstrap, seed=args.seed, keep_records=True)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    scores, labels, scored = result.pop("scores"), result.pop("labels"), result.pop("records")
    clinical = clinical_metrics(fit_scores, fit_labels, scores, labels, prompts.class_names, scored, rule,
                                calibration=args.calibration, bootstrap=args.bootstrap, seed=args.seed)
    calibrated = clinical.pop("calibrated")
    for name, entry in clinical.pop("per_class").items():
        result["per_class"][name].update(entry)
    result["subgroups"] = clinical.pop("subgroups")
    result["clinical"] = {**clinical, "fit_split": args.fit_split, "fit_records": n_fit, "notes": notes}
    split_label = "external test set" if args.test_manifest else f"split {args.split}"
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(scores, labels, prompts.class_names, out / "zeroshot_roc.png", aucs=result["per_class_auc"],
                   title=f"Zero-shot ROC — {prompts.name}, {split_label}")
    run_block = run_info(args, store, model_dir, cache_dir, split=args.split, n_records=len(records))
    payload = {"run": run_block, "prompts": prompts.summary(), "zeroshot": result}
    write_json(out / "zeroshot.json", payload)
    (out / "zeroshot.md").write_text(zeroshot_markdown(result, run_block, prompts.summary(), roc.name), encoding="utf-8")
    report = write_clinical_report(out, result, run_block, prompts, scored, scores, labels, calibrated, store=store,
                                   gradcam_examples=args.gradcam_examples, bootstrap=args.bootstrap, seed=args.seed)
    mean = result["mean_auc"]
    print(f"zero-shot macro AUC {'n/a' if mean is None else f'{mean:.3f}'} over {result['macro_auc_classes']} "
          f"classes ({len(records)} records of the {split_label}, prompts {prompts.name})")
    print(f"wrote {out / 'zeroshot.json'}, {out / 'zeroshot.md'}, {roc}, {report}")
    return 0
