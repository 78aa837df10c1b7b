"""Run a saved model on files: the top classes of images or CSV recordings, or masks.

    python predict.py --model ./output/best_model.pth --input photo.jpg
    python predict.py -m best_model.pth -i ./new_images "shots/*.png" --topk 3 --output results.csv
    python predict.py -m best_model.pth -i ./new_images --output results.json --amp
    python predict.py -m checkpoints/best_model.pth -i image1.jpg image2.jpg -o out1.png out2.png -v
    python predict.py -m behavior_results/cnn/best_model.pth -i recording.csv ./new_recordings -o out.csv

Classes and preprocessing come from the checkpoint, exactly as validate.py prepares images (for
a behaviour model: its channel columns, window length and normalisation; a long recording is
cut into windows and gets each window's classes and their mean).
A U-Net .pth of Pytorch-UNet (a state_dict with mask_values) runs too: its shape is read from the
tensors; pass -s with the scale it was trained at (default 0.5, that trainer's).
--input takes files, folders (searched recursively) and glob patterns. Files that cannot be
read are reported (in the console and in --output) and skipped, for masks as for classes; when
none can be read, the run ends with one error line and exit code 2.
"""
from __future__ import annotations

from collections.abc import Sequence

from common.cli import add_device_args, add_loading_args, check_positive, new_parser, resolve
from common.errors import run_cli
from common.series_args import add_series_args


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("-m", "--model", required=True, metavar="CHECKPOINT", help="checkpoint to run")
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("-o", "--output", nargs="+", metavar="FILE",
                        help="classification: FILE.csv or FILE.json of the predictions; "
                             "segmentation: one mask file per input (default <name>_OUT.png)")
    g = parser.add_argument_group("segmentation checkpoints (U-Net)")
    g.add_argument("-s", "--scale", type=float, default=None, help="image scale (default: the checkpoint's)")
    g.add_argument("-t", "--mask-threshold", type=float, default=0.5,
                   help="probability above which a pixel is foreground, one-class models (0.5)")
    g.add_argument("-v", "--viz", action="store_true", help="also write a coloured overlay beside each mask")
    g.add_argument("-n", "--no-save", action="store_true",
                   help="write no files (neither masks nor --viz overlays); print the results only")
    g.add_argument("-c", "--classes", type=int, default=None, help="accepted, read from the checkpoint")
    g.add_argument("--bilinear", action="store_true", help="accepted, read from the checkpoint")
    add_loading_args(parser, plain_state_dict=True, img_size=None)
    add_device_args(parser)
    add_series_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args, given = resolve(build_parser(), argv)  # --help and a bad flag answer before torch loads
    check_positive(args, "topk", "batch_size")
    from common import classify_predict, segment_predict
    from common.inference import gather_inputs, load_from_args
    from common.session import start_session

    s = start_session(args, None)
    loaded = load_from_args(args.model, args, s.device, log=s.log)
    if loaded.task == "timeseries":
        from common import series_tools

        return series_tools.run_predict(loaded, args, s, classify_predict.results_file(args.output))
    paths = gather_inputs(args.input)
    if loaded.task == "segmentation":
        return segment_predict.run(loaded, paths, args, s, given)
    return classify_predict.run(loaded, paths, args, s)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
