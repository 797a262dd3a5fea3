"""`cvserve`: the one entry point (run, api, worker, models)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cvserve.worker.openmp import keep_spinning

from .settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def _serve(settings: Settings, app: object, workers: int = 1, loop: str = "auto") -> None:
    import uvicorn

    if workers > 1:
        uvicorn.run("cvserve.app.main:api_from_env", factory=True, host=settings.host,
                    port=settings.port, workers=workers, log_level="info",
                    timeout_keep_alive=settings.keep_alive_s,
                    timeout_graceful_shutdown=settings.shutdown_grace_s)
    else:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", loop=loop,
                    timeout_keep_alive=settings.keep_alive_s,
                    timeout_graceful_shutdown=settings.shutdown_grace_s)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .main import embedded_app

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess_metrics()
    mode = ("embedded (in-memory queue)" if settings.embedded
            else f"Redis {settings.redis_url_for_logs}")
    logging.getLogger("cvserve").info("cvserve run: api + worker in one process, %s", mode)
    # The standard asyncio loop, not uvloop, where the model runs in this process: measured
    # with bench/detect_bench.py (demo detector, concurrency 1), inference took 30 ms under
    # uvloop against 22-25 ms alone or under asyncio, a 5-7 ms cost on every request.
    _serve(settings, embedded_app(settings), loop="asyncio")
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from .main import api_from_env

    if settings.redis_url is None:
        print("cvserve api: set CVSERVE_REDIS_URL (e.g. redis://127.0.0.1:6379/0); "
              "`cvserve run` serves without Redis", file=sys.stderr)
        return 2
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess_metrics()
    _serve(settings, None if args.workers > 1 else api_from_env(), args.workers)
    return 0


def multiprocess_metrics() -> None:
    """Several api processes answer /metrics as one (app/metrics.py): each writes its
    samples under PROMETHEUS_MULTIPROC_DIR, set here before uvicorn starts them so that
    they inherit it. A folder given by the deployment (the api image sets one, whatever
    --workers says) is made, or emptied: samples left by an earlier run would be added
    to this one's."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink()
    else:
        folder = tempfile.mkdtemp(prefix="cvserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    logging.getLogger("cvserve").info("api processes share their metrics through %s", folder)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_worker

    if settings.redis_url is None:
        print("cvserve worker: set CVSERVE_REDIS_URL (e.g. redis://127.0.0.1:6379/0)",
              file=sys.stderr)
        return 2
    asyncio.run(run_worker(settings))
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.classifiers import RESNETS, export_resnet
    from cvserve.models.export import ExportError, export_detector
    from cvserve.models.segment_export import SEGMENTERS, export_segmenter
    from cvserve.models.video_export import (
        FRAME_CLASSIFIERS,
        VIDEO_CLASSIFIERS,
        export_frame_classifier,
        export_video_classifier,
        frame_model_name,
    )

    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    frame_models = {frame_model_name(arch): arch for arch in FRAME_CLASSIFIERS}
    video_model = args.name in (*VIDEO_CLASSIFIERS, "demo-actions") or args.name in frame_models
    classifier = args.name in RESNETS
    fmt = args.format or ("onnx" if video_model or classifier else "torchscript")
    try:
        if args.name.replace("-", "_") == "efficientnet_lite0":
            from cvserve.models.efficientnet import export_efficientnet_lite0

            path = export_efficientnet_lite0(
                settings.model_repository, fmt=fmt,
                name=args.as_name or "efficientnet-lite0", check=not args.no_check)
        elif args.name == "demo-actions":
            from cvserve.models.train_video import DEMO_ACTIONS, export_demo_actions

            weights = DEMO_ACTIONS if args.weights == "default" else Path(args.weights)
            path = export_demo_actions(settings.model_repository, weights=weights, fmt=fmt,
                                       name=args.as_name or "demo-actions")
        elif args.name == "demo-unet":
            from cvserve.models.unet_demo import DEMO_UNET, export_demo_unet

            weights = DEMO_UNET if args.weights == "default" else Path(args.weights)
            path = export_demo_unet(settings.model_repository, args.as_name or "demo-unet",
                                    weights)
        elif args.name == "demo-classifier":
            from cvserve.models.classifier_demo import DEMO_CLASSIFIER, export_demo_classifier

            weights = DEMO_CLASSIFIER if args.weights == "default" else Path(args.weights)
            path = export_demo_classifier(settings.model_repository,
                                          args.as_name or "demo-classifier", weights)
        elif classifier:
            path = export_resnet(args.name, settings.model_repository, weights=args.weights,
                                 fmt=fmt, name=args.as_name, check=not args.no_check)
        elif args.name in SEGMENTERS:
            path = export_segmenter(args.name, settings.model_repository, weights=args.weights,
                                    fmt=fmt, name=args.as_name, check=not args.no_check)
        elif args.name in VIDEO_CLASSIFIERS:
            path = export_video_classifier(args.name, settings.model_repository,
                                           weights=args.weights, fmt=fmt,
                                           name=args.as_name, check=not args.no_check)
        elif args.name in frame_models:
            path = export_frame_classifier(frame_models[args.name], settings.model_repository,
                                           weights=args.weights, fmt=fmt,
                                           name=args.as_name, check=not args.no_check)
        else:
            path = export_detector(args.name, settings.model_repository, weights=args.weights,
                                   fmt=fmt, name=args.as_name, batch_sizes=sizes,
                                   num_classes=args.num_classes, check=not args.no_check)
    except ExportError as exc:
        print(f"cvserve models export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.worker.repository import ModelRepository

    repo = ModelRepository(settings.model_repository)
    print(f"model repository: {repo.root}")
    for name in repo.names():
        try:
            cfg = repo.get(name)
        except ValueError as exc:
            print(f"  {name:40s} BROKEN: {exc}")
            continue
        state = "ready" if cfg.artifacts_present() else "not built"
        print(f"  {name:40s} {cfg.task:12s} {cfg.backend:12s} {state:10s} {cfg.weights}")
    return 0


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.catalog import CATALOG, CatalogError, install

    names = list(CATALOG) if args.name == "all" else [args.name]
    failed = 0
    for name in names:
        try:
            path = install(name, settings.model_repository, settings.model_mirror,
                           force=args.force)
        except CatalogError as exc:
            print(f"cvserve models pull: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"installed {name} in {path}")
    return 1 if failed else 0


def cmd_train_demo_actions(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.train_video import (
        DEMO_ACTIONS,
        evaluate_actions,
        export_demo_actions,
        load_actions,
        train_actions,
    )

    ckpt = Path(args.checkpoint or DEMO_ACTIONS)
    train_actions(ckpt, steps=args.steps, seed=args.seed,
                  init=Path(args.init) if args.init else None)
    model, _ = load_actions(ckpt)
    print(f"held-out clips: {evaluate_actions(model, 20)}")
    print(f"wrote {ckpt} and {export_demo_actions(settings.model_repository, weights=ckpt)}")
    return 0


def cmd_train_demo_classifier(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.classifier_demo import (
        DEMO_CLASSIFIER,
        evaluate,
        export_demo_classifier,
        load_demo_classifier,
        train,
    )

    weights = Path(args.checkpoint or DEMO_CLASSIFIER)
    train(args.steps, weights, args.seed)
    print(f"held-out scenes: {evaluate(load_demo_classifier(weights))}")
    folder = export_demo_classifier(settings.model_repository, weights=weights)
    print(f"wrote {weights} and {folder}")
    return 0


def cmd_train_demo(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.evaluate import evaluate_eager
    from cvserve.models.export import DEMO_WEIGHTS, build_eager, export_detector
    from cvserve.models.train import train_detector

    ckpt = train_detector("tiny_fasterrcnn", Path(args.checkpoint or DEMO_WEIGHTS),
                          steps=args.steps, seed=args.seed)
    model, _ = build_eager("tiny_fasterrcnn", str(ckpt))
    scores = evaluate_eager(model)
    print(f"held-out box mAP@0.5 {scores['map50']:.3f}, mAP@0.5:0.95 {scores['map']:.3f}")
    path = export_detector("tiny_fasterrcnn", settings.model_repository, weights=str(ckpt),
                           fmt=args.format, name=args.as_name)
    print(f"wrote {ckpt} and {path}")
    return 0


def cmd_train_demo_masks(args: argparse.Namespace, settings: Settings) -> int:
    from cvserve.models.evaluate import evaluate_eager
    from cvserve.models.export import (
        DEMO_MASK_WEIGHTS,
        DEMO_WEIGHTS,
        build_eager,
        export_detector,
    )
    from cvserve.models.train import train_detector, write_box_parts

    init = DEMO_WEIGHTS if args.init is None else Path(args.init) if args.init else None
    ckpt = train_detector("tiny_maskrcnn", Path(args.checkpoint or DEMO_MASK_WEIGHTS),
                          steps=args.steps, seed=args.seed, lr=args.lr, init=init)
    model, _ = build_eager("tiny_maskrcnn", str(ckpt))
    scores = evaluate_eager(model)
    print(f"held-out box mAP@0.5 {scores['map50']:.3f}, mask mAP@0.5 {scores['mask_map50']:.3f}")
    path = export_detector("tiny_maskrcnn", settings.model_repository, weights=str(ckpt),
                           name=args.as_name)
    print(f"wrote {ckpt} and {path}")
    if args.detector_out:
        boxes = write_box_parts(ckpt, Path(args.detector_out))
        path = export_detector("tiny_fasterrcnn", settings.model_repository,
                               weights=str(boxes), name="demo-detector")
        print(f"wrote {boxes} (its box parts, a tiny_fasterrcnn) and {path}")
    return 0


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from .predict import TASKS, Options, predict

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: the bar says it
    params: dict[str, str | float | bool] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"cvserve predict: --param {item}: expected KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = value
    if args.score_threshold is not None:
        params["score_threshold"] = args.score_threshold
    if args.method:
        params["method"] = args.method
    if args.localize:
        params["localize"] = True
    assert args.task in TASKS
    return predict(Options(paths=args.paths, task=args.task, model=args.model, url=args.url,
                           out=Path(args.out), fmt=args.format, concurrency=args.concurrency,
                           api_key=args.api_key or os.environ.get("CVSERVE_API_KEY"),
                           coco_gt=Path(args.coco_gt) if args.coco_gt else None,
                           params=params))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="api + worker in one process (no Redis needed)")
    api = sub.add_parser("api", help="the HTTP api alone (needs CVSERVE_REDIS_URL)")
    api.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    sub.add_parser("worker", help="a worker alone (needs CVSERVE_REDIS_URL)")
    pr = sub.add_parser("predict", help="send files and folders to a service, with progress; "
                                        "results into --out")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="files and folders (recursive)")
    pr.add_argument("--task", default="auto", choices=("auto", "detect", "segment",
                                                       "classify-video", "explain"),
                    help="auto: detect for images, classify-video for videos (by content)")
    pr.add_argument("--model", default=None, help="default: the task's default model")
    pr.add_argument("--url", default=None,
                    help="a running service; without it the embedded service is started")
    pr.add_argument("--out", default="predictions", help="folder for the results")
    pr.add_argument("--format", default="json", choices=("json", "png", "coco"),
                    help="json: one answer per file; png: the rendering (detect, segment, "
                         "explain); coco: one COCO results file for detection")
    pr.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    pr.add_argument("--score-threshold", type=float, default=None)
    pr.add_argument("--method", default=None, help="explain method (gradcam, occlusion, ...)")
    pr.add_argument("--localize", action="store_true", help="videos: action segments too")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="any other option of the endpoint (repeatable)")
    pr.add_argument("--coco-gt", default=None, metavar="JSON",
                    help="--format coco: take image and category ids from this ground truth "
                         "(matched by file name and category name)")
    pr.add_argument("--api-key", default=None, help="default: $CVSERVE_API_KEY")

    models = sub.add_parser("models", help="the model repository").add_subparsers(
        dest="models_command", required=True)
    models.add_parser("list", help="models in the repository")
    exp = models.add_parser("export", help="export a torchvision detector (Mask and Keypoint "
                                           "R-CNN included), a torchvision semantic "
                                           "segmenter, a torchvision video classifier "
                                           "(Kinetics-400), a single-frame video baseline "
                                           "or an image classifier for /explain "
                                           "(a torchvision ResNet or EfficientNet-Lite0)")
    exp.add_argument("name", help="architecture: a detector (e.g. "
                                  "fasterrcnn_mobilenet_v3_large_320_fpn, "
                                  "maskrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn), a "
                                  "segmenter (fcn_resnet50, deeplabv3_resnet50, "
                                  "deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large), "
                                  "a video classifier (r3d_18, mc3_18, r2plus1d_18, s3d, "
                                  "mvit_v2_s, swin3d_t), an ImageNet classifier run on each "
                                  "frame of a video (resnet18-frames, resnet50-frames, "
                                  "mobilenet_v3_small-frames, mobilenet_v3_large-frames), "
                                  "efficientnet_lite0, an image classifier (resnet18, "
                                  "resnet50, ... the ResNet family), demo-actions (the "
                                  "shipped demo action classifier), demo-classifier (the "
                                  "shipped demo image classifier) or demo-unet (the shipped "
                                  "demo semantic segmenter)")
    exp.add_argument("--weights", default="default",
                     help="default (pretrained, downloaded) | random | PATH to a checkpoint")
    exp.add_argument("--format", default=None, choices=("onnx", "torchscript"),
                     help="default: onnx for image and video classifiers and -frames "
                          "models, torchscript for the others")
    exp.add_argument("--as", dest="as_name", default=None, help="model name (default: NAME)")
    exp.add_argument("--batch-sizes", default="1,2,4",
                     help="detectors, ONNX: one graph per batch size")
    exp.add_argument("--num-classes", type=int, default=None, help="detectors only")
    exp.add_argument("--no-check", action="store_true",
                     help="skip the comparison against the eager model")
    pull = models.add_parser(
        "pull", help="install a real pretrained model (from CVSERVE_MODEL_MIRROR, else its "
                     "official source); sha256-checked")
    pull.add_argument("name", help="a catalog name (yolox-nano, deeplabv3-mobilenetv2-voc, "
                                   "i3d-kinetics400) or 'all'")
    pull.add_argument("--force", action="store_true", help="replace an installed copy")
    demo = models.add_parser("train-demo", help="train the demo detector on synthetic shapes")
    demo.add_argument("--steps", type=int, default=900)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--checkpoint", default=None,
                      help="where to write the weights (default: models/demo/detector.pt)")
    demo.add_argument("--format", default="torchscript", choices=("onnx", "torchscript"))
    demo.add_argument("--as", dest="as_name", default="demo-detector")
    actions = models.add_parser("train-demo-actions",
                                help="train the demo action classifier on synthetic videos")
    actions.add_argument("--steps", type=int, default=300)
    actions.add_argument("--seed", type=int, default=0)
    actions.add_argument("--init", default=None,
                         help="continue from this checkpoint (give another --seed)")
    actions.add_argument("--checkpoint", default=None,
                         help="where to write the weights (default: "
                              "models/demo/actions_c3d.pt)")
    masks = models.add_parser("train-demo-masks",
                              help="train the demo instance segmenter (a small Mask R-CNN) "
                                   "on synthetic shapes, from the demo detector's weights")
    masks.add_argument("--steps", type=int, default=300)
    masks.add_argument("--seed", type=int, default=2,
                       help="scenes seed × 1,000,003 + …: 0 is the detector's, 1 overlaps "
                            "the held-out scenes")
    masks.add_argument("--lr", type=float, default=0.01)
    masks.add_argument("--init", default=None,
                       help="start from this checkpoint (default: the demo detector's, "
                            "models/demo/detector.pt; '' for random weights)")
    masks.add_argument("--checkpoint", default=None,
                       help="where to write the weights (default: models/demo/masks.pt)")
    masks.add_argument("--as", dest="as_name", default="demo-masks")
    masks.add_argument("--detector-out", default=None, metavar="PATH",
                       help="also write its box parts (all but the mask branch) as a "
                            "tiny_fasterrcnn checkpoint here and export them as demo-detector "
                            "(how models/demo/detector.pt is made)")
    shapes = models.add_parser("train-demo-classifier",
                               help="train the demo image classifier (GAP + linear, for "
                                    "/explain) on synthetic shapes")
    shapes.add_argument("--steps", type=int, default=3000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--checkpoint", default=None,
                        help="where to write the weights (default: models/demo/classifier.pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"cvserve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command != "api":  # the api runs no model (its image has no torch)
        # Before anything imports torch: libgomp reads its wait policy when it loads.
        logging.getLogger("cvserve.cli").info("%s", keep_spinning())
    handlers = {"run": cmd_run, "api": cmd_api, "worker": cmd_worker, "predict": cmd_predict}
    if args.command == "models":
        handlers = {"export": cmd_export, "list": cmd_list, "pull": cmd_pull,
                    "train-demo": cmd_train_demo, "train-demo-actions": cmd_train_demo_actions,
                    "train-demo-classifier": cmd_train_demo_classifier,
                    "train-demo-masks": cmd_train_demo_masks}
        return handlers[args.models_command](args, settings)
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
