"""Compare two models on the same images: per finding, AUC of each, ΔAUC = B − A with a paired bootstrap 95%
CI and DeLong's test p-value, and the differences in sensitivity, specificity, PPV, NPV, F1 and MCC at each
model's own threshold (chosen on --manifest's validate split, as zeroshot does). Writes OUT/compare.json and
OUT/compare.md. Models load exactly as every evaluation command loads them.

Example: medclipin compare --checkpoints runA/model runB/model --manifest M.csv --prompts P.yaml --out cmp
         [--test-manifest external.csv] [--threshold youden] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from medclipin.commands.session import add_model_arguments, non_negative_int
    from medclipin.commands.zeroshot import add_clinical_arguments

    add_model_arguments(parser, checkpoint=False)
    parser.add_argument("--checkpoints", nargs=2, required=True, metavar=("A", "B"),
                        help="the two models (model, run or checkpoint folders); Δ = B − A")
    add_clinical_arguments(parser, gradcam=False)
    parser.add_argument("--prompts", required=True, help="prompt YAML")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", help="split of --manifest scored without --test-manifest (default test)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, help="paired bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _score(args, checkpoint: str, prompts, out: Path):
    """(store, model dir, {record_id: row}, test scores, test labels, thresholds) of one model."""
    import numpy as np

    from medclipin.commands.session import open_store
    from medclipin.commands.zeroshot import clinical_inputs
    from medclipin.eval.evaluate import score_records
    from medclipin.eval.operating_point import choose_threshold, parse_threshold_rule

    model_args = argparse.Namespace(**{**vars(args), "checkpoint": checkpoint})
    store, model_dir, _ = open_store(model_args, out)
    records, (fit_scores, fit_labels, _), notes = clinical_inputs(model_args, store, prompts, args.split)
    records, scores, labels = score_records(store, records, prompts)
    rule = parse_threshold_rule(args.threshold)
    thresholds = {}
    for c, name in enumerate(prompts.class_names):
        known = ~np.isnan(fit_labels[:, c])  # an empty fit set is (0, C)
        thresholds[name] = choose_threshold(fit_labels[known, c], fit_scores[known, c], rule)
    rows = {r.record_id: i for i, r in enumerate(records)}
    return store, model_dir, rows, scores, labels, thresholds, notes


def run(args) -> int:
    import numpy as np

    from medclipin.commands.session import check_outputs, load_split, test_records
    from medclipin.eval.clinical_report import compare_markdown
    from medclipin.eval.operating_point import paired_operating_point_deltas, parse_threshold_rule
    from medclipin.eval.paired_auc import delong_test, paired_bootstrap_delta_auc
    from medclipin.eval.report import write_json
    from medclipin.eval.zeroshot import file_sha256, load_prompts

    check_outputs(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rule = parse_threshold_rule(args.threshold)
    prompts = load_prompts(args.prompts)
    load_split(args.manifest, "all")  # missing manifests or an empty split fail here, before any model loads
    test_records(args, args.split)
    out = Path(args.out)
    try:
        scored = [_score(args, checkpoint, prompts, out) for checkpoint in args.checkpoints]
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    (store_a, dir_a, rows_a, scores_a, labels, thr_a, notes), (store_b, dir_b, rows_b, scores_b, _, thr_b, _) = scored
    shared = [rid for rid in rows_a if rid in rows_b]  # both models read the same files; kept aligned regardless
    ia, ib = np.array([rows_a[r] for r in shared], int), np.array([rows_b[r] for r in shared], int)
    scores_a, scores_b, labels = scores_a[ia], scores_b[ib], labels[ia]
    classes = {}
    for c, name in enumerate(prompts.class_names):
        known = ~np.isnan(labels[:, c])
        y, a, b = labels[known, c].astype(int), scores_a[known, c], scores_b[known, c]
        test = delong_test(y, a, b)
        entry = {"n": int(len(y)), "positives": int(y.sum()), "auc_a": test["auc_a"], "auc_b": test["auc_b"],
                 "delta_auc": test["delta_auc"],
                 "delta_auc_ci": paired_bootstrap_delta_auc(y, a, b, args.bootstrap, args.seed)
                 if args.bootstrap and test["delta_auc"] is not None else None,
                 "p_value": test["p_value"], "delong_z": test["z"], "delong_se": test["se"],
                 "delong_ci": test["ci"], "threshold_a": thr_a[name], "threshold_b": thr_b[name],
                 "operating_point_delta": paired_operating_point_deltas(y, a, thr_a[name], b, thr_b[name],
                                                                        args.bootstrap, args.seed)}
        if test["auc_a"] is None:
            entry["note"] = "labels constant in this set: AUC undefined"
        classes[name] = entry
    payload = {
        "models": {"a": {"checkpoint": str(dir_a), "model_fingerprint": store_a.fingerprint},
                   "b": {"checkpoint": str(dir_b), "model_fingerprint": store_b.fingerprint}},
        "manifest": str(args.manifest), "manifest_sha256": file_sha256(args.manifest),
        "test_manifest": str(args.test_manifest) if args.test_manifest else None,
        "test_manifest_sha256": file_sha256(args.test_manifest) if args.test_manifest else None,
        "test_set": "every record of the test manifest" if args.test_manifest else f"split {args.split}",
        "n_records": len(shared), "fit_split": args.fit_split, "threshold_rule": str(rule),
        "threshold_rule_text": rule.describe(), "bootstrap": args.bootstrap, "seed": args.seed,
        "prompts": prompts.summary(), "notes": notes, "classes": classes,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", payload)
    (out / "compare.md").write_text(compare_markdown(payload), encoding="utf-8")
    for name, e in classes.items():
        if e["delta_auc"] is not None:
            print(f"{name}: AUC A {e['auc_a']:.3f}, B {e['auc_b']:.3f}, Δ {e['delta_auc']:+.3f}, DeLong p "
                  f"{'n/a' if e['p_value'] is None else format(e['p_value'], '.3g')}")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")
    return 0
