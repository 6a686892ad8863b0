"""`erw fit-encoder` and `erw fit-evaluator`: the small networks of small datasets (the digits demo).

    erw data digits --out runs/digits
    erw fit-encoder   --images runs/digits --out runs/nets/digits-encoder.safetensors
    erw fit-evaluator --images runs/digits --out runs/nets/digits-evaluator.pt2
    erw warmup --config configs/demo.yaml encoder.name=timm-file encoder.weights=runs/nets/digits-encoder.safetensors
    erw evaluate ... --feature-network runs/nets/digits-evaluator.pt2

The images are read once into memory: these commands are meant for datasets of thousands of
images, where ImageNet encoders and Inception are the wrong tools.
"""

from __future__ import annotations

import argparse


def _fit_arguments(p: argparse.ArgumentParser, seed: int) -> None:
    p.add_argument(
        "--images",
        required=True,
        help="labelled images: an ImageFolder (one sub-folder per class), .tar image shards, erw shards "
        "stored with images, or an .npz with arr_0 images and arr_1 labels; local or s3://",
    )
    p.add_argument(
        "--resolution", type=int, default=32, help="images are centre-cropped to this size (the training resolution)"
    )
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay to 0)")
    p.add_argument("--seed", type=int, default=seed, help="weights, split, batch order and augmentation")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out to report accuracy")
    p.add_argument(
        "--max-shift",
        type=int,
        default=2,
        help="random translations of up to this many pixels (augmentation); 1 at 16px, 2 at 32px",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "fit-encoder",
        help="train a small ViT on labelled images: an alignment target for small datasets",
        description="Train a small timm ViT (patch tokens) supervised on the class labels (a linear classifier on "
        "the mean patch token) and save it for encoder.name=timm-file encoder.weights=OUT.",
    )
    e.add_argument("--out", required=True, help="output .safetensors file, local or s3://")
    e.add_argument(
        "--patch-size",
        type=int,
        default=4,
        help="pixels per token side; 4 gives the 8x8 grid of SiT-S/4 on 32px images",
    )
    e.add_argument("--dim", type=int, default=64, help="token width")
    e.add_argument("--depth", type=int, default=4, help="transformer blocks")
    e.add_argument("--heads", type=int, default=4, help="attention heads")
    _fit_arguments(e, seed=0)
    e.set_defaults(func=_fit_encoder)

    v = sub.add_parser(
        "fit-evaluator",
        help="train a small CNN on labelled images: features for FID and a classifier for small datasets",
        description="Train a small CNN classifier and save it as a torch.export program for `erw evaluate "
        "--feature-network OUT`: its penultimate features give the Fréchet distance, its logits the class "
        "accuracy of generated images. Use another seed than the encoder's, and never align to it.",
    )
    v.add_argument("--out", required=True, help="output .pt2 file, local or s3://")
    v.add_argument("--width", type=int, default=16, help="channels of the first convolution; features are 4x this")
    _fit_arguments(v, seed=1)
    v.set_defaults(func=_fit_evaluator)


def _settings(args: argparse.Namespace):
    from erw.models.small_nets import FitSettings

    return FitSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_shift=args.max_shift,
    )


def _read(args: argparse.Namespace):
    import torch

    from erw.data.image_sets import open_image_set
    from erw.models.small_nets import SmallNetError, check_images

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resolution < 8:
        raise SmallNetError(f"--resolution={args.resolution} is too small: use at least 8 pixels")
    images, labels = zip(*open_image_set(args.images).batches(256, resolution=args.resolution))
    images, labels = torch.cat(images), torch.cat(labels)
    if (labels < 0).any():
        raise SmallNetError(f"{args.images} has images without a class label: these networks train on labelled images")
    check_images(images, labels)
    if images.shape[-2:] != (args.resolution, args.resolution):
        raise SmallNetError(
            f"{args.images} holds {images.shape[-1]}x{images.shape[-2]} images: pass --resolution {images.shape[-1]} "
            "(only image folders and tar shards are cropped to --resolution)"
        )
    print(f"{len(images)} images, {int(labels.max()) + 1} classes, {args.resolution}px from {args.images}")
    return images, labels


def _fit_encoder(args: argparse.Namespace) -> int:
    from erw.models import small_nets

    settings = _settings(args)
    kwargs = small_nets.encoder_kwargs(args.resolution, args.patch_size, args.dim, args.depth, args.heads)
    images, labels = _read(args)
    vit, report = small_nets.fit_encoder(images, labels, settings, kwargs)
    small_nets.save_encoder(vit, kwargs, args.out)
    print(f"encoder {report.describe()}")
    print(f"wrote {args.out}: train with encoder.name=timm-file encoder.weights={args.out}")
    return 0


def _fit_evaluator(args: argparse.Namespace) -> int:
    from erw.evaluation.small_evaluator import fit_evaluator, save_evaluator

    settings = _settings(args)
    images, labels = _read(args)
    net, report = fit_evaluator(images, labels, settings, width=args.width)
    save_evaluator(net, args.out, args.resolution)
    print(f"evaluator {report.describe()}")
    print(f"wrote {args.out}: evaluate with `erw evaluate ... --feature-network {args.out}`")
    return 0
