"""Multimodal Grad-CAM: where in the image and which words of the text drive an image–text match.

Single image: --image I --text "..." writes OUT/gradcam.png (original image, overlay, the text with
words shaded by relevance, side by side), OUT/gradcam.npz (raw maps and word scores) and
OUT/gradcam.json (similarity; pointing game and IoU for any --box given in original-image pixels).

Batch: --manifest M --prompts P [--split test] [--limit N] explains every (image, positive finding with
a box) pair using the finding's first prompt, writes a figure + .npz for the first --figures pairs and
OUT/gradcam.json / OUT/gradcam.md with the pointing game and IoU (CAM >= threshold × max vs the box).

The colours show where a change of the image would most raise the similarity to the text, for this
model: relative within one image, not a diagnosis, not a segmentation.

Examples:
  medclipin gradcam --checkpoint demo_out/run/model --image study.dcm --text "small left pleural effusion" --out cam/
  medclipin gradcam --checkpoint demo_out/run/model --manifest demo_out/data/manifest.csv
                    --prompts datasets/synthetic/prompts.yaml --limit 50 --out cam/
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    from medclipin.commands.session import add_model_arguments, non_negative_int, positive_int, query_text

    add_model_arguments(parser, manifest_required=False)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image", default=None, help="single mode: an image file (DICOM/PNG/JPEG)")
    parser.add_argument("--text", default=None, type=query_text, help="single mode: the finding or sentence to explain")
    parser.add_argument("--contrast", default=None,
                        help='single mode: explain --text rather than this text, e.g. --text "pleural effusion" '
                             '--contrast "no pleural effusion" (what makes the model prefer one over the other)')
    parser.add_argument("--box", type=float, nargs=4, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                        help="single mode: a lesion box in original-image pixels (repeatable) for the pointing game/IoU")
    parser.add_argument("--prompts", default=None,
                        help="batch mode: prompt YAML or a shipped name; each finding's zero-shot evidence (positive "
                             "vs negative prompts) is explained")
    parser.add_argument("--method", default="hirescam", choices=["hirescam", "gradcam", "gradcam++", "layercam"],
                        help="class-activation method (default hirescam: faithful, element-wise gradient x activation)")
    parser.add_argument("--target", default="evidence", choices=["evidence", "prompt"],
                        help="batch mode: explain the zero-shot evidence (default) or the first positive prompt alone")
    parser.add_argument("--tolerance", type=float, default=15.0,
                        help="pointing-game tolerance in original-image pixels (default 15, Zhang et al.)")
    parser.add_argument("--split", default="test", help="batch mode: split (default test)")
    parser.add_argument("--limit", type=positive_int, default=None, help="batch mode: at most this many (image, finding) pairs")
    parser.add_argument("--figures", type=non_negative_int, default=8, help="batch mode: figures to write (default 8)")
    parser.add_argument("--iou-threshold", type=float, default=0.5,
                        help="CAM threshold (fraction of its maximum) for the IoU with the box (default 0.5)")


def run(args) -> int:
    from medclipin.commands.session import check_outputs

    check_outputs(args)  # before the image, the manifest and the model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    single = args.image is not None or args.text is not None
    if single and (args.image is None or args.text is None):
        print("error: single mode needs both --image and --text", file=sys.stderr)
        return 2
    if not single and (args.manifest is None or args.prompts is None):
        print("error: give --image and --text (single image) or --manifest and --prompts (batch)", file=sys.stderr)
        return 2
    return _single(args) if single else _batch(args)


def _single(args) -> int:
    import numpy as np

    from medclipin.eval.gradcam import box_to_input, cam_box_iou, explain, pointing_game_hit, save_explanation
    from medclipin.eval.report import write_json
    from medclipin.commands.session import open_store, run_info

    if not Path(args.image).is_file():
        print(f"error: {args.image}: no such image file", file=sys.stderr)
        return 2
    out = Path(args.out)
    store, model_dir, cache_dir = open_store(args, out)
    explanation = explain(store.model, store.processor, args.image, args.text, image_cache=args.image_cache,
                          method=args.method, contrast=args.contrast,
                          store=store)
    boxes = [tuple(b) for b in (args.box or [])]
    files = save_explanation(explanation, out / "gradcam.png", boxes=boxes)
    localisation = []
    for box in boxes:
        mapped = box_to_input(box, explanation.geometry, explanation.source_side, explanation.cam.shape[0])
        tolerance = args.tolerance * explanation.geometry.scale * explanation.cam.shape[0] / explanation.source_side
        localisation.append({"box": list(box), "box_input": [float(v) for v in mapped],
                             "pointing_game_hit": bool(pointing_game_hit(explanation.cam, mapped, tolerance)),
                             "pointing_game_hit_strict": bool(pointing_game_hit(explanation.cam, mapped)),
                             "iou": cam_box_iou(explanation.cam, mapped, args.iou_threshold)})
    summary = {
        "run": run_info(args, store, model_dir, cache_dir),
        "image": str(args.image), "text": args.text, "similarity": explanation.similarity,
        "contrast": args.contrast, "contrast_similarity": explanation.contrast_similarity,
        "words": [{"word": w, "relevance": float(s)} for w, s in zip(explanation.relevance.words, explanation.relevance.scores)],
        "cam_peak_original_xy": [int(v) for v in np.unravel_index(int(np.argmax(explanation.cam_original)),
                                                                   explanation.cam_original.shape)[::-1]],
        "localisation": localisation, "iou_threshold": args.iou_threshold, "files": files,
    }
    write_json(out / "gradcam.json", summary)
    print(f"similarity {explanation.similarity:+.3f}; wrote {files['png']}, {files['npz']}, {out / 'gradcam.json'}")
    return 0


def _batch(args) -> int:
    from medclipin.eval.evaluate import check_prompt_classes, gradcam_localisation
    from medclipin.eval.report import gradcam_markdown, write_json
    from medclipin.commands.session import load_split, open_store, run_info
    from medclipin.eval.zeroshot import load_prompts

    prompts = load_prompts(args.prompts)
    _, records = load_split(args.manifest, args.split)
    try:
        check_prompt_classes(records, prompts)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    with_boxes = [r for r in records if r.boxes]
    out = Path(args.out)
    store, model_dir, cache_dir = open_store(args, out)
    result = gradcam_localisation(store, with_boxes, prompts, out, figures=args.figures, method=args.method,
                                  target=args.target, tolerance=args.tolerance,
                                  iou_threshold=args.iou_threshold, limit=args.limit)
    run_block = run_info(args, store, model_dir, cache_dir, split=args.split, n_records=len(with_boxes))
    summary = {"run": run_block, "prompts": prompts.summary(), "localisation": result, "figures": result["figures"]}
    write_json(out / "gradcam.json", summary)
    (out / "gradcam.md").write_text(gradcam_markdown(summary, run_block), encoding="utf-8")
    pg = result["pointing_game"]
    print(f"{result['pairs']} (image, finding) pairs with boxes; pointing game "
          f"{'n/a' if pg is None else f'{pg:.3f}'}; {len(result['figures'])} figures")
    print(f"wrote {out / 'gradcam.json'}, {out / 'gradcam.md'}")
    return 0
