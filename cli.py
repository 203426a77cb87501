"""The ``erf-lab`` command line: parses arguments, calls one library function per
subcommand, prints. No logic of its own (docs/design.md section 1).

Every user error (an :class:`erf_lab.errors.ErfLabError`, or a bad flag value, which argparse
reports) becomes one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
Any other exception is a bug: Python prints its traceback and the exit code is 1. ``compare`` exits
with 3 when some of its models failed and the others' results were written. Flag values are
parsed here (sizes, units, lists); the library takes typed arguments and owns the defaults.
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple, Union

EXIT_USAGE = 2
EXIT_PARTIAL = 3  # compare: some models failed, the others' results were written

Handlers = Dict[str, Callable[[argparse.Namespace], int]]


def _cmd_ops(args: argparse.Namespace) -> int:
    import dk_ops

    info = dk_ops.backend_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from dk_ops import models
    from erf_lab import study_models

    print("architectures (--arch, erf-lab train):")
    for name in models.names():
        print(f"  {name}")
    shipped = study_models.available()
    print(f"shipped study models ({len(shipped)}; --model study:NAME, files in {study_models.SHIPPED_DIR}):")
    for path in shipped:
        info = study_models.study_info(path) or {}
        print(f"  study:{path.stem:26s} test acc {info.get('test_acc', float('nan')):.4f} "
              f"({info.get('test_images', '?')} images), epoch {info.get('best_epoch', '?')}")
    return 0


# ---- section: erf / rf / layers (erf_lab ERF engine) ---------------------------------------
def _or_auto(minimum: int, number: type = int) -> Callable[[str], Union[int, float, str]]:
    """An argparse type: ``auto`` or a ``number`` (int or float) >= ``minimum``."""
    noun = "an integer" if number is int else "a number"

    def parse(text: str) -> Union[int, float, str]:
        if text == "auto":
            return text
        try:
            value = number(text)
        except ValueError:
            value = minimum - 1
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {minimum} or 'auto', got {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _size(text: str) -> Tuple[int, int]:
    """An argparse type: ``N`` or ``N,M`` (also ``NxM``) -> (H, W), positive integers."""
    try:
        parts = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or N,M (positive integers), got {text!r}")
    return (parts[0], parts[-1])


def _sizes(text: str) -> List[Tuple[int, int]]:
    """An argparse type: ``N[,N2...]`` square sizes, each also ``HxW`` -> [(H, W), ...]."""
    sizes = []
    for part in text.split(","):
        try:
            hw = [int(v) for v in part.split("x")]
        except ValueError:
            hw = []
        if len(hw) not in (1, 2) or min(hw) < 1:
            raise argparse.ArgumentTypeError(f"expected N[,N2...] (each N or HxW, positive integers), got {text!r}")
        sizes.append((hw[0], hw[-1]))
    return sizes


def _units(text: str) -> Union[str, Tuple[int, int], List[Tuple[int, int]]]:
    """An argparse type: ``center``, ``Y,X`` or several ``Y,X;Y,X`` (negative counts from the end)."""
    if text == "center":
        return text
    try:
        units = [tuple(int(v) for v in part.split(",")) for part in text.split(";")]
    except ValueError:
        units = []
    if not units or any(len(u) != 2 for u in units):
        raise argparse.ArgumentTypeError(f"expected center or Y,X[;Y,X...] (integers), got {text!r}")
    return units[0] if len(units) == 1 else units  # type: ignore[return-value]


def _names(text: str) -> List[str]:
    """An argparse type: a comma-separated list of names (``class,size``)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> List[int]:
    """An argparse type: a comma-separated list of integers (``0,1,2``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _resize_steps(text: str) -> Union[str, List[List[float]]]:
    """An argparse type: ``auto``, ``off`` or ``UNTIL:SCALE[,UNTIL:SCALE...]`` (``[[until, scale], ...]``)."""
    if text in ("auto", "off", "none"):
        return text
    try:
        steps = [[float(v) for v in part.split(":")] for part in text.split(",")]
    except ValueError:
        steps = []
    if not steps or any(len(step) != 2 for step in steps):
        raise argparse.ArgumentTypeError(f"expected auto, off or UNTIL:SCALE[,UNTIL:SCALE...], got {text!r}")
    return steps


def _add_erf_commands(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers erf, rf and layers (erf_lab.jobs does the work)."""

    def model_flags(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--model", required=required, metavar="PATH",
                       help="checkpoint: erf-lab checkpoint, state_dict (with --arch), TorchScript or .pt2")
        p.add_argument("--arch", metavar="NAME", help="architecture: zoo name, torchvision:NAME or timm:NAME")
        p.add_argument("--image-size", type=_size, metavar="N[,M]", help="input size (default: the checkpoint's, else 224)")
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="allow full unpickling: runs code stored in the file; only for files you trust")

    p = sub.add_parser("erf", help="effective receptive field of a unit of a layer, over images")
    model_flags(p, required=True)
    p.add_argument("--layer", help="module name (see `erf-lab layers`); default: the last spatial layer, marked * by `erf-lab layers`")
    p.add_argument("--unit", type=_units, default="center",
                   help="center (RF centred nearest the image centre) or Y,X[;Y,X...]; negative counts from the end")
    from erf_lab.erf.options import BACKENDS, CENTER_MODES, LAYOUTS, OPTION_CHOICES, PRESETS

    p.add_argument("--preset", default="replknet", choices=list(PRESETS))
    p.add_argument("--data", help="noise, digits-ms, DIR, coco:ANN.json:IMGDIR (default: embedded digits-ms)")
    p.add_argument("--image", metavar="PATH", help="instance ERF of one image, with an overlay")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--sampling", default="random", choices=["random", "stratified"])
    p.add_argument("--batch-size", type=_or_auto(1), default="auto",
                   help="images per backward pass; auto: about 400k pixels of the computed crop on CPU, 32 on GPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/erf", metavar="DIR", help="writes DIR/erf.npz, erf.json, erf.png")
    p.add_argument("--center", default="rf", choices=list(CENTER_MODES),
                   help="centre metrics on the unit's RF centre, or on the array centre (RepLKNet parity)")
    p.add_argument("--no-crop", action="store_true", help="always compute on the full image")
    p.add_argument("--backend", default="engine", choices=list(BACKENDS))
    p.add_argument("--output-index", help="element (index or key) of a tuple/dict layer output")
    p.add_argument("--layout", default="auto", choices=list(LAYOUTS))
    p.add_argument("--prefix-tokens", type=int, help="class/register tokens before the token grid")
    for name, values in OPTION_CHOICES.items():  # one flag per ERFOptions field; "none" is None
        p.add_argument("--" + name.replace("_", "-"), choices=["none" if v is None else v for v in values],
                       help="override the preset's choice")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true")

    handlers["erf"] = _cmd_erf

    p = sub.add_parser("rf", help="theoretical receptive field of every layer (printed, and CSV)")
    model_flags(p, required=False)
    p.add_argument("--out", default="results/rf", metavar="DIR", help="writes DIR/rf.csv")

    handlers["rf"] = _cmd_rf

    p = sub.add_parser("layers", help="list a model's layers with output shapes and RF size")
    model_flags(p, required=False)

    handlers["layers"] = _cmd_layers


def _cmd_erf(args: argparse.Namespace) -> int:
    from erf_lab.jobs import run_erf

    opts = _option_overrides(args)
    index = args.output_index
    if index is not None and index.lstrip("-").isdigit():
        index = int(index)
    result = run_erf(
        args.model, arch=args.arch, trust=args.trust_checkpoint, layer=args.layer, unit=args.unit,
        preset=args.preset, data=args.data, image=args.image, num_images=args.num_images,
        image_size=args.image_size, batch_size=args.batch_size, device=args.device, seed=args.seed,
        out=args.out, progress=not args.no_progress, sampling=args.sampling, center=args.center,
        crop=not args.no_crop, backend=args.backend, output_index=index, layout=args.layout,
        prefix_tokens=args.prefix_tokens, skip_bad=args.skip_bad, **opts,
    )
    from erf_lab import distributed

    if distributed.is_main():
        results = result if isinstance(result, list) else [result]
        r0 = results[0]
        asked, held = r0.meta.get("num_images_requested"), r0.meta.get("num_images_available")
        if asked is not None and held is not None and asked > held:
            print(f"note: {asked} images asked for, the data holds {held}: used all {held}")
        if r0.meta.get("data_note"):
            print(f"note: {r0.meta['data_note']}", file=sys.stderr)
        if r0.n_skipped:
            print(f"note: {r0.n_skipped} of {r0.n_images + r0.n_skipped} images gave a non-finite map and were "
                  f"left out of the mean")
        for r in results:
            m = r.metrics()
            print(f"unit {tuple(r.meta['unit'])} of {r.meta['layer'] or 'output'}: n_images={r.n_images} "
                  f"skipped={r.n_skipped} rf_center={tuple(round(v, 1) for v in r.meta['rf_center'])} "
                  f"luo_size={m['luo_size']:.1f} sigma_y={m['sigma_y']:.2f} sigma_x={m['sigma_x']:.2f} "
                  f"area_ratio@0.2={m['area_ratio_replknet@0.2']:.4f}")
        print(f"wrote {args.out}")
    return 0


def _cmd_rf(args: argparse.Namespace) -> int:
    import pandas as pd

    from erf_lab.io import write_csv
    from erf_lab.jobs import input_size_for, model_for, output_folder, rf_table

    with output_folder(args.out):
        lm = model_for(args.model, args.arch, args.trust_checkpoint)
        df = rf_table(lm.model, input_size_for(lm, args.image_size))
        path = write_csv(f"{args.out}/rf.csv", df, float_format=None)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(df.drop(columns=["notes"]).to_string(index=False))
    print(f"wrote {path}")
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    import pandas as pd

    from erf_lab.jobs import input_size_for, layers_table, model_for

    lm = model_for(args.model, args.arch, args.trust_checkpoint)
    df = layers_table(lm.model, input_size_for(lm, args.image_size))
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(df.to_string(index=False))
    return 0


def _add_compare_command(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers compare (erf_lab.comparison does the work)."""
    from erf_lab.erf.options import OPTION_CHOICES, PRESETS

    p = sub.add_parser(
        "compare", help="ERFs of several models, layers and image sizes on the same images, with growth curves",
        description="ERFs of every (model, layer, image size) on the same seeded images; writes compare.png, "
                    "growth.png, compare.csv, compare.npz, compare.json and index.html into --out. Exit code 3 "
                    "when some models failed (the others' results are written).")
    p.add_argument("--model", action="append", required=True, metavar="SPEC",
                   help="checkpoint, study:NAME, a quoted glob of epoch checkpoints ('run/epoch_*.pt', ordered by "
                        "the epoch each records), or untrained:SPEC (SPEC's architecture, fresh seeded weights); repeat")
    p.add_argument("--name", action="append", metavar="NAME", help="display name per --model (default: file stem)")
    p.add_argument("--arch", metavar="NAME", help="architecture for plain state_dicts")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling: runs code stored in the file; only for files you trust")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layer", action="append", metavar="NAME", help="a layer (the same name in every model); repeat")
    which.add_argument("--layers", choices=["stages"], help="stages: each stage's output (no names needed)")
    p.add_argument("--image-size", type=_sizes, metavar="N[,N2...]",
                   help="one column per layer and size (each N or HxW; default: the first model's input size)")
    p.add_argument("--data", help="noise, digits-ms, DIR, coco:ANN.json:IMGDIR (default: the first model's data)")
    p.add_argument("--num-images", type=_positive_int, default=50)
    p.add_argument("--preset", default="replknet", choices=list(PRESETS))
    for name, values in OPTION_CHOICES.items():  # one flag per ERFOptions field, as in erf
        p.add_argument("--" + name.replace("_", "-"), choices=["none" if v is None else v for v in values],
                       help="override the preset's choice")
    p.add_argument("--axis", default="auto", choices=["auto", "depth", "epoch"],
                   help="growth curve x axis (auto: epoch for one glob of epoch checkpoints, else depth)")
    p.add_argument("--batch-size", type=_or_auto(1), default="auto")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="draws the images (and untrained: weights)")
    p.add_argument("--out", default="results/compare", metavar="DIR")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true")
    handlers["compare"] = _cmd_compare


def _option_overrides(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    """The ERFOptions flags given on the command line (``none`` is None)."""
    from erf_lab.erf.options import OPTION_NAMES

    values = {name: getattr(args, name) for name in OPTION_NAMES}
    return {name: None if v == "none" else v for name, v in values.items() if v is not None}


def _cmd_compare(args: argparse.Namespace) -> int:
    from erf_lab.comparison import compare

    result = compare(args.model, names=args.name, layers=args.layer or args.layers, image_size=args.image_size,
                     data=args.data, num_images=args.num_images, preset=args.preset, seed=args.seed,
                     device=args.device, batch_size=args.batch_size, arch=args.arch, trust=args.trust_checkpoint,
                     axis=args.axis, skip_bad=args.skip_bad, progress=not args.no_progress, out=args.out,
                     **_option_overrides(args))
    if result.meta.get("data_note"):
        print(f"note: {result.meta['data_note']}", file=sys.stderr)
    print(result.summary())
    for f in result.failures:
        print(f"erf-lab compare: {f['model']} at {f['image_size'][0]}x{f['image_size'][1]} failed: {f['error']}",
              file=sys.stderr)
    print(f"wrote {args.out}")
    return EXIT_PARTIAL if result.failures else 0


# ---- section: train (erf_lab data and training) ---------------------------------------------
def _add_train_command(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers train: one call to :func:`erf_lab.train.train`."""
    p = sub.add_parser(
        "train", help="train a study model on a data set (best checkpoint, .last.pt and .metrics.json)",
        description="Train ARCH with operator OP on a data set; writes OUT (best epoch by validation accuracy, "
                    "loadable by `erf-lab erf --model OUT`), OUT.last.pt (for --resume) and OUT.metrics.json.",
    )
    p.add_argument("--arch", default="study_net", help="zoo model (see `erf-lab models`; default: study_net)")
    from dk_ops.models import OPS

    p.add_argument("--op", default="conv", choices=list(OPS))
    p.add_argument("--data", default="digits-ms", metavar="SPEC",
                   help="digits-ms[:OPTIONS], DIR, coco:ANN.json:IMGDIR (needs labels; default: digits-ms)")
    p.add_argument("--epochs", type=int, help="epochs to train (default 10; with --time-budget, a cap: default 1000)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train for this much wall time (training, validation, checkpoints): the schedule "
                        "runs over the budget and training stops when it is spent")
    p.add_argument("--out", default="results/train/checkpoint.pt", metavar="CKPT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default: cpu)")
    p.add_argument("--resume", action="store_true", help="continue from CKPT's .last.pt up to --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 6e-3 AdamW, 0.1 SGD)")
    p.add_argument("--offset-lr-mult", type=_or_auto(0, float), default="auto",
                   help="learning-rate factor of DK/DCN offset generators (default auto: 0.1 for DK kernel "
                        "offsets, 0.03 for DCN sampling offsets)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=_or_auto(0), default="auto",
                   help="loader worker processes (default auto: none; digits-ms renders a batch in the training process)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random shifts")
    p.add_argument("--size-curriculum-epochs", type=_or_auto(0), default="auto", metavar="E",
                   help="digits-ms: large objects first, the full size range from epoch E+1 "
                        "(default auto: a sixth of the epochs, at most 6, for mobilenet_v2; 0: off)")
    p.add_argument("--progressive-resize", type=_resize_steps, default="auto", metavar="auto|off|UNTIL:SCALE,...",
                   help="train on downscaled images early on: e.g. 0.3:0.5,0.6:0.75 (half size for the first "
                        "30%% of the run, 3/4 until 60%%; default auto: that, for study_net)")
    p.add_argument("--image-size", type=int, help="square side of the images (default: the data set's)")
    p.add_argument("--width-mult", type=float, help="model width multiplier (mobilenet_v2)")
    p.add_argument("--offset-clip", choices=["scope"],
                   help="keep DK kernel samples inside the scope (zoo models; default: unclipped)")
    p.add_argument("--max-train-images", type=int, help="train on a seeded subset (quick runs)")
    p.add_argument("--max-eval-images", type=int, help="validate and test on seeded subsets")
    p.add_argument("--keep-every", type=_positive_int, metavar="K",
                   help="also keep every K-th epoch (and the initial weights, and the last epoch) as epoch_E.pt "
                        "beside CKPT: a trajectory for `erf-lab compare --model 'DIR/epoch_*.pt'`")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true")

    def cmd_train(args: argparse.Namespace) -> int:
        from erf_lab.train import companion_paths, train

        kwargs = {} if args.width_mult is None else {"width_mult": args.width_mult}
        if args.offset_clip is not None:
            kwargs["offset_clip"] = args.offset_clip
        m = train(
            args.arch, args.op, args.data, args.epochs, args.out, seed=args.seed, device=args.device,
            time_budget_s=args.time_budget, progressive_resize=args.progressive_resize,
            resume=args.resume, lr=args.lr, batch_size=args.batch_size, num_workers=args.num_workers,
            offset_lr_mult=args.offset_lr_mult, optimizer=args.optimizer, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
            augment=not args.no_augment, size_curriculum_epochs=args.size_curriculum_epochs, image_size=args.image_size, arch_kwargs=kwargs,
            max_train_images=args.max_train_images, max_eval_images=args.max_eval_images,
            keep_every=args.keep_every, skip_bad=args.skip_bad, progress=not args.no_progress,
        )
        paths = companion_paths(args.out)
        print(f"{args.arch}/{args.op} on {args.data}: best epoch {m['best_epoch']} val acc {m['best_val_acc']:.4f}, "
              f"test acc {m['test_acc']:.4f}, {m['train_seconds']:.0f}s training")
        print(f"wrote {paths['best']}, {paths['last']}, {paths['metrics']}")
        return 0

    handlers["train"] = cmd_train


# ---- section: tsne / report (analyses) ------------------------------------------------------
def _add_tsne_commands(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers tsne and report (analyses.tsne does the work)."""
    p = sub.add_parser("tsne", help="t-SNE of features coloured by class and box size, with clustering scores")
    p.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="checkpoint (repeat to compare models on the same samples)")
    p.add_argument("--name", action="append", metavar="NAME", help="display name per --model (default: file stem)")
    p.add_argument("--arch", metavar="NAME", help="architecture for plain state_dicts: zoo name, torchvision:NAME, timm:NAME")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling: runs code stored in the file; only for files you trust")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="module to read (once for all models, or once per --model); default: the last conv stage")
    p.add_argument("--data", help="noise, digits-ms, DIR, coco:ANN.json:IMGDIR (default: the checkpoint's, else digits-ms)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--image-size", type=_size, metavar="N[,M]", help="input size (default: the checkpoint's, else the data's)")
    p.add_argument("--pooling", default="gap", choices=["gap", "box"],
                   help="global average pool, or bilinear mean inside each object's box")
    p.add_argument("--max-samples", type=int, metavar="N", help="stratified subsample (class x size bin)")
    p.add_argument("--color", type=_names, default="class,size", help="panels: class, size or class,size")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--iterations", type=int, default=1000, help="t-SNE iterations (the first 250 early exaggeration)")
    p.add_argument("--pca-dim", type=int, default=50, help="PCA dimensions before t-SNE")
    p.add_argument("--backend", default="auto", choices=["auto", "sklearn", "opentsne"],
                   help="t-SNE implementation (auto: openTSNE when installed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--jobs", type=int, metavar="N", help="CPU threads for t-SNE and scores (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/tsne", metavar="DIR",
                   help="writes DIR/index.html, scores.csv, embedding_<model>.csv, tsne_<model>.png, report.json")
    p.add_argument("--save-features", action="store_true", help="also write DIR/features_<model>.npz")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable images (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true")

    def cmd_tsne(args: argparse.Namespace) -> int:
        from analyses.tsne import run_tsne

        result = run_tsne(
            args.model, names=args.name, arch=args.arch, trust=args.trust_checkpoint, layer=args.layer,
            data=args.data, split=args.split, image_size=args.image_size, pooling=args.pooling,
            max_samples=args.max_samples, color=args.color, perplexity=args.perplexity, n_iter=args.iterations,
            pca_dim=args.pca_dim, backend=args.backend, batch_size=args.batch_size, device=args.device,
            n_jobs=args.jobs, seed=args.seed, out=args.out, save_features=args.save_features,
            progress=not args.no_progress, skip_bad=args.skip_bad,
        )
        for line in result.summary():
            print(line)
        print(f"wrote {args.out}/index.html")
        return 0

    handlers["tsne"] = cmd_tsne

    p = sub.add_parser("report", help="rebuild the t-SNE HTML report and figures from saved results")
    p.add_argument("dir", metavar="DIR", help="a directory written by `erf-lab tsne`")
    p.add_argument("--color", type=_names, help="panels: class, size or class,size (default: as saved)")

    def cmd_report(args: argparse.Namespace) -> int:
        from analyses.tsne import rebuild_report

        print(f"wrote {rebuild_report(args.dir, color=args.color)}")
        return 0

    handlers["report"] = cmd_report


# ---- section: figures -----------------------------------------------------------------------
def _add_figures_command(sub: "argparse._SubParsersAction", handlers: Handlers) -> None:
    """Registers figures (figures.run_figures does the work)."""
    p = sub.add_parser("figures", help="reproduce the paper's figures and tables end to end",
                       description="Trains (or loads with --models, or reuses from DIR/models) the six operator "
                                   "variants of the study net, then writes every figure (PNG, PDF, CSV/NPZ/JSON), "
                                   "DIR/RESULTS.md and DIR/index.html.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the shipped converged study models, every claim with its confidence interval "
                           "(the default; minutes on 2 CPU cores)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="retrain every model with the shipped recipes, then larger statistics (hours on a CPU)")
    p.add_argument("--retrain", action="store_true",
                   help="train the models anew with the shipped recipes (cached in DIR/models) instead of "
                        "using the shipped ones")
    p.add_argument("--data", help="noise, digits-ms, DIR, coco:ANN.json:IMGDIR (default: embedded digits-ms)")
    p.add_argument("--models", metavar="DIR", help="analyse your checkpoints in DIR: ARCH-OP-sSEED.pt (the shipped "
                                                   "names), or OP.pt / OP-seedS.pt for the study net")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (trained models are cached in DIR/models)")
    p.add_argument("--only", type=_names, metavar="LIST", help="comma-separated subset of: theory,accuracy,erf,tsne,offsets")
    p.add_argument("--epochs", type=int, help="override the mode's training epochs")
    p.add_argument("--seeds", type=_ints, metavar="LIST", help="override the mode's training seeds, e.g. 0,1,2")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="train N models at once on the CPU, each with CPUs/N threads (default 1; on small "
                        "networks N = CPUs is fastest)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(mode="quick")

    def cmd_figures(args: argparse.Namespace) -> int:
        from figures import run_figures

        seeds = None if args.seeds is None else tuple(args.seeds)
        run = run_figures(args.out, mode=args.mode, data=args.data, models_dir=args.models, device=args.device,
                          only=args.only, progress=not args.no_progress, epochs=args.epochs, seeds=seeds,
                          retrain=args.retrain, jobs=args.jobs)
        for r in run["results"]:
            if not r.effects:
                for claim in r.claims:
                    print(f"[{r.name}] {claim}")
            for e in r.effects:
                print(f"[{r.name}] claim {e.claim_id}: {e.claim}: {e.measure} = {e.effect:+.4f}, "
                      f"95% CI {e.ci()}: {e.verdict.upper()}")
        for name, msg in run["failures"].items():
            print(f"[{name}] not produced: {msg}", file=sys.stderr)
        print(f"report: {run['report']} and {run['html']}")
        return 1 if run["failures"] else 0

    handlers["figures"] = cmd_figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erf-lab",
        description="Deformable Kernels and effective receptive fields: what does my network look at?",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: Handlers = {}

    sub.add_parser("ops", help="which operator implementation runs on which device")
    handlers["ops"] = _cmd_ops
    sub.add_parser("models", help="list the model zoo's architectures and the shipped study models")
    handlers["models"] = _cmd_models

    _add_erf_commands(sub, handlers)
    _add_compare_command(sub, handlers)
    _add_train_command(sub, handlers)
    _add_tsne_commands(sub, handlers)
    _add_figures_command(sub, handlers)

    parser.set_defaults(_handlers=handlers)
    return parser


# Options whose value may start with "-" (argparse reads "--unit -1,0" as two options).
_SIGNED_VALUES = ("--unit",)


def _join_signed_values(argv: List[str]) -> List[str]:
    """``--unit -1,0`` -> ``--unit=-1,0``."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _SIGNED_VALUES and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: MemoryError, torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(_join_signed_values(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from erf_lab.io import discard_created, reset_written

    reset_written()
    try:
        code = _run_command(args)
        if code:
            discard_created()
        return code
    except BaseException:
        discard_created()  # a failed command leaves no empty output folders behind
        raise


def _run_command(args: argparse.Namespace) -> int:
    """The subcommand, with every user error as one line and exit 2 (``--debug``: the traceback)."""
    from erf_lab.io import written_files
    from erf_lab.errors import ErfLabError

    try:
        return args._handlers[args.command](args)
    except ErfLabError as exc:
        if args.debug:
            raise
        print(f"erf-lab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:
        if args.debug or not _out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"erf-lab {args.command}: error: out of memory ({first[:160]}): use a smaller --image-size or "
              "--batch-size", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        done = written_files()
        if done:
            print(f"erf-lab {args.command}: interrupted; already written: {', '.join(str(p) for p in done)}",
                  file=sys.stderr)
        else:
            print(f"erf-lab {args.command}: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`erf-lab layers | head`): stop quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
