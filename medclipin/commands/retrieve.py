"""Image↔text retrieval: R@1/5/10 both ways, mean and median rank (computed in chunks, so memory stays
bounded), written to OUT/retrieval.json and OUT/retrieval.md. Identical reports count as matches.

Query mode (no metrics): --query-image PATH lists the top-k reports of the manifest for an image;
--query-text "..." lists the top-k images for a sentence. Output: manifest row numbers and cosine
scores (identical reports are listed once, with how many records share them); record ids (which often
embed patient identifiers) only with --show-ids, report text only with --show-text. Queries search
every record unless --split is given. --test-manifest M2 evaluates every record of M2 instead (an external
set; its split column is ignored).

Examples:
  medclipin retrieve --checkpoint demo_out/run/model --manifest demo_out/data/manifest.csv --out eval_out/retrieval
  medclipin retrieve --checkpoint demo_out/run/model --manifest demo_out/data/manifest.csv --query-text "small pleural effusion"
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from medclipin.commands.session import add_model_arguments, add_test_manifest_argument, positive_int, query_text

    add_model_arguments(parser)
    add_test_manifest_argument(parser)
    parser.add_argument("--out", default=None, help="output folder (required for metrics; optional for queries)")
    parser.add_argument("--split", default=None,
                        help="split: train, validate, test or all (default: test for metrics, all for queries)")
    parser.add_argument("--chunk-size", type=positive_int, default=512, help="queries per similarity chunk (default 512)")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--query-image", default=None, help="an image file: list the top-k reports for it")
    query.add_argument("--query-text", default=None, type=query_text, help="a sentence: list the top-k images for it")
    parser.add_argument("--top-k", type=positive_int, default=5, help="results per query (default 5)")
    parser.add_argument("--show-text", action="store_true", help="print the report text of the hits (off by default)")
    parser.add_argument("--show-ids", action="store_true",
                        help="print the hits' record ids (off by default: ids often embed patient identifiers; "
                             "hits are named by their manifest row)")


def run(args) -> int:
    from medclipin.commands.session import check_outputs, open_store, run_info, test_records

    check_outputs(args)  # before the manifest and the model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    querying = args.query_image is not None or args.query_text is not None
    if not querying and not args.out:
        print("error: --out is required unless --query-image or --query-text is given", file=sys.stderr)
        return 2
    split = args.split or ("all" if querying else "test")
    records = test_records(args, split)  # --test-manifest: every record of it
    store, model_dir, cache_dir = open_store(args, args.out)
    run_block = run_info(args, store, model_dir, cache_dir, split=split, n_records=len(records))
    if querying:
        return _query(args, store, records, run_block)

    from medclipin.eval.evaluate import retrieval
    from medclipin.eval.report import retrieval_markdown, write_json

    result = retrieval(store, records, chunk_size=args.chunk_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "retrieval.json", {"run": run_block, "retrieval": result})
    (out / "retrieval.md").write_text(retrieval_markdown(result, run_block), encoding="utf-8")
    for direction in ("image_to_text", "text_to_image"):
        d = result[direction]
        print(f"{direction.replace('_to_', '→')}: R@1 {d['R@1']:.3f}  R@5 {d['R@5']:.3f}  R@10 {d['R@10']:.3f}  "
              f"median rank {d['median_rank']:.0f}")
    print(f"wrote {out / 'retrieval.json'}, {out / 'retrieval.md'}")
    return 0


def _query(args, store, records, run_block) -> int:
    from medclipin.eval.report import write_json
    from medclipin.eval.retrieval import query_images, query_reports

    if args.query_image is not None:
        if not Path(args.query_image).is_file():
            print(f"error: {args.query_image}: no such image file", file=sys.stderr)
            return 2
        hits = query_reports(store, records, args.query_image, args.top_k)
        kind, query = "image", str(args.query_image)
        print(f"top {len(hits)} reports for image {Path(args.query_image).name}:")
    else:
        hits = query_images(store, records, args.query_text, args.top_k)
        kind, query = "text", args.query_text
        print(f"top {len(hits)} images for the sentence:")
    for rank, hit in enumerate(hits, 1):
        extra = f"  (report shared by {hit['records_with_this_report']} records)" if hit.get("records_with_this_report", 1) > 1 else ""
        name = hit["record_id"] if args.show_ids else f"row {hit['row']}"
        print(f"{rank:>3}. {name}  score {hit['score']:+.4f}{extra}")
        if args.show_text and "text" in hit:
            print(f"     {hit['text']}")
    if args.out:
        out = Path(args.out)
        saved = [{k: v for k, v in h.items() if (k != "text" or args.show_text) and (k != "record_id" or args.show_ids)}
                 for h in hits]
        path = write_json(out / "query.json", {"run": run_block, "query": {"kind": kind, "value": query},
                                               "top_k": args.top_k, "hits": saved})
        print(f"wrote {path}")
    return 0
