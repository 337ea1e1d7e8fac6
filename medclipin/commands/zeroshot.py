"""Zero-shot classification from a prompt file (YAML: templates × class descriptions).

Multi-label prompt files score each class by the softmax over its positive/negative prompt-ensemble
pair; multi-class files by the softmax over the classes. Reports AUC, accuracy and F1 per class and
macro (threshold rule: positive when the score is >= 0.5 for multi-label, argmax for multi-class),
with bootstrap 95% CIs that survive constant label columns. Writes OUT/zeroshot.json,
OUT/zeroshot.md (exactly what ran: prompt file + sha256, split, counts, per-class table) and
OUT/zeroshot_roc.png.

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
    parser.add_argument("--prompts", required=True, help="prompt YAML (e.g. datasets/chexpert/prompts_5x200.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", help="manifest split to evaluate: train, validate, test or all (default test)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples for the 95%% CIs (0 = none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def run(args) -> int:
    from medclipin.eval.evaluate import zero_shot
    from medclipin.eval.report import plot_roc, write_json, zeroshot_markdown
    from medclipin.commands.session import check_outputs, load_split, open_store, run_info
    from medclipin.eval.zeroshot import load_prompts

    check_outputs(args)  # before the prompts, the manifest and the model: fail in a second, not after the work
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    prompts = load_prompts(args.prompts)
    _, records = load_split(args.manifest, args.split)
    store, model_dir, cache_dir = open_store(args, out)
    try:
        result = zero_shot(store, records, prompts, bootstrap=args.bootstrap, seed=args.seed)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    scores, labels = result.pop("scores"), result.pop("labels")
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(scores, labels, prompts.class_names, out / "zeroshot_roc.png", aucs=result["per_class_auc"],
                   title=f"Zero-shot ROC — {prompts.name}, split {args.split}")
    run_block = run_info(args, store, model_dir, cache_dir, split=args.split, n_records=len(records))
    payload = {"run": run_block, "prompts": prompts.summary(), "zeroshot": result}
    write_json(out / "zeroshot.json", payload)
    (out / "zeroshot.md").write_text(zeroshot_markdown(result, run_block, prompts.summary(), roc.name), encoding="utf-8")
    mean = result["mean_auc"]
    print(f"zero-shot macro AUC {'n/a' if mean is None else f'{mean:.3f}'} over {result['macro_auc_classes']} "
          f"classes ({len(records)} {args.split} records, prompts {prompts.name})")
    print(f"wrote {out / 'zeroshot.json'}, {out / 'zeroshot.md'}, {roc}")
    return 0
