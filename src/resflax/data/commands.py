"""The bodies of ``resflax prepare-data`` and ``resflax make-tiny-imagenet``: each parses its flags, prepares or
writes a TFDS dataset (``data.cifar10``, ``data.imagenet_source``, ``data.tiny_imagenet``) and says where it is."""

from __future__ import annotations

from resflax.args import ArgumentParser
from resflax.data import cifar10, imagenet_source
from resflax.data.tiny_imagenet import write_tiny_dataset
from resflax.errors import BadInput


def cmd_prepare(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax prepare-data",
                        description="prepare a dataset once as TFDS ArrayRecord (needs the prepare extra: TensorFlow)")
    ap.add_argument("--dataset", choices=("cifar10", "imagenet2012"), default="cifar10",
                    help="cifar10 is downloaded; imagenet2012 is built from the manual download's two tars")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: $TFDS_DATA_DIR, ~/tensorflow_datasets)")
    ap.add_argument("--manual_dir", default=None,
                    help="imagenet2012: the folder holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                         "(default: <data_dir>/downloads/manual)")
    args = ap.parse_args(argv)
    if args.dataset == "cifar10":
        if args.manual_dir:
            raise BadInput("--manual_dir applies to --dataset imagenet2012 only")
        print(f"CIFAR-10 ready in {cifar10.prepare(args.data_dir)}")
        return 0
    print(f"imagenet2012 ready in {imagenet_source.prepare(args.data_dir, args.manual_dir)}")
    return 0


def cmd_make_tiny(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax make-tiny-imagenet",
                        description="write a small ImageNet-like TFDS dataset of real photographs (for :tiny)")
    ap.add_argument("--out", required=True, help="TFDS data_dir to write it into (give it as --config.data_dir)")
    ap.add_argument("--name", default="resflax_tiny_jpeg", help="dataset name (give it as --config.dataset)")
    ap.add_argument("--num_classes", type=int, default=4, help="one sample photograph per class (at most 8)")
    ap.add_argument("--train_per_class", type=int, default=16)
    ap.add_argument("--val_per_class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_tiny_dataset(args.out, name=args.name, num_classes=args.num_classes,
                             train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed)
    print(f"{args.name} ready in {out}: {args.num_classes * args.train_per_class} train / "
          f"{args.num_classes * args.val_per_class} validation images")
    return 0


COMMANDS = {"prepare-data": cmd_prepare, "make-tiny-imagenet": cmd_make_tiny}
