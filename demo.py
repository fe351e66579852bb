"""A query image and its top 10 in one figure, retrieved coarse-to-fine as query.py does.

    python demo.py --bits 48 --num 0                # query 0 of database/: result/demo_0.png
    python demo.py --bits 48 --image photo.jpg      # a new image: result/demo_photo.png
    python demo.py --bits 48 --num 7 --show         # and open a window
    python demo.py --bits 48 --backend faiss        # candidates from index.py's faiss index

Each result is titled with its rank, Hamming distance and class (the name prepare_data.py recorded in
--data-root/prepare_data.json, else the label), and framed green where it shares a label with the query, red where
it does not, grey where either is unknown. The images are read from --data-root: image/ for the database,
query/ for the queries, under the names database.py stored. --image is encoded with the model that built the
database (refused when that file changed since, as in query.py).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np

import MyDataset
import database
import index
import mAP
from stage import UserError, atomic_write, common_args_parser, elapsed, non_negative_int, print_args, run_main

RELEVANT, IRRELEVANT, UNKNOWN, QUERY = "#2ca02c", "#d62728", "#999999", "#1f77b4"


def get_args_parser():
    parser = argparse.ArgumentParser("demo.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(), mAP.retrieval_args_parser(result_help="folder for the figure"),
                                              mAP.coarse_to_fine_args_parser()],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_backend_args(parser)
    parser.add_argument("--num", type=non_negative_int, default=0, help="0-based index of the query in database/ (default: %(default)s)")
    parser.add_argument("--image", default=None, metavar="PATH", help="query this image file instead")
    parser.add_argument("--show", action="store_true", help="also open the figure in a window")
    return parser


def load_image(path, args):
    try:
        return MyDataset.read_image(path)
    except MyDataset.BadImage as err:
        raise UserError(f"{err}; demo.py reads the images from --data-root {args.data_root} (image/ for the database, "
                        "query/ for the queries): give the data folder that built the database") from None


def frame_colours(query_label, labels):
    """A frame colour per result: green where mAP.relevance() holds, grey where either side has no label, else red."""
    query_labels, labels = np.asarray([query_label]), np.asarray(labels)
    known = np.zeros(len(labels), dtype=bool)
    if len(mAP.labelled(query_labels)):
        known[mAP.labelled(labels)] = True
    relevant = mAP.relevance(query_labels, labels)[0]
    return [RELEVANT if rel else IRRELEVANT if k else UNKNOWN for rel, k in zip(relevant, known)]


def draw(path, panels, heading, show):
    """panels: (image, title, frame colour), the query first; saved to path, shown in a window with show."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(6, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image, title, colour) in zip(axes.flat, panels):
        axis.axis("on")
        axis.imshow(np.asarray(image), cmap="gray")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        axis.set_title(title, fontsize=9)
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    if show:
        plt.show()
    plt.close(figure)


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    started = time.perf_counter()
    device, db, query, meta, radius, radius_from, items = mAP.open_retrieval(args)
    backend, engine = index.open_index(args, meta, items.size)
    if args.image:
        files = MyDataset.image_files([args.image])
        if len(files) != 1:
            raise UserError(f"--image {args.image}: a folder of {len(files)} images; give one image file "
                            "(query.py --image takes many)")
        _, codes, features, _ = database.encode_new_images(files, args.database, meta, args.model, device,
                                                           args.batch_size)
        no_label = -1 if db.labels.ndim == 1 else np.zeros(db.labels.shape[1], dtype=db.labels.dtype)
        query_label, query_path, name, out = no_label, files[0], str(files[0]), f"demo_{files[0].stem}.png"
    else:
        if not 0 <= args.num < len(query.codes):
            raise UserError(f"--num {args.num}: {args.database} holds {len(query.codes)} queries (0..{len(query.codes) - 1})")
        codes, features = query.codes[args.num:args.num + 1], np.asarray(query.features[args.num:args.num + 1])
        query_label, name, out = query.labels[args.num], query.names[args.num], f"demo_{args.num}.png"
        query_path = Path(args.data_root) / "query" / name
    found = index.retrieve(engine, items, codes, features, radius, args.topk)[0]
    names = database.class_names(args.data_root)
    colours = frame_colours(query_label, db.labels[found["rows"]])
    panels = [(load_image(query_path, args), f"query\n{database.label_text(meta, query_label, names) or '?'}", QUERY)]
    for rank, (row, hamming, colour) in enumerate(zip(found["rows"], found["hamming"], colours), start=1):
        title = f"#{rank}  d={hamming}\n{database.label_text(meta, db.labels[row], names) or '?'}"
        panels.append((load_image(Path(args.data_root) / "image" / db.names[row], args), title, colour))
    path = Path(args.result) / out
    heading = (f"{name}: top {len(found['rows'])} of {items.size} within Hamming radius {found['radius']} "
               f"({args.bits} bits), ranked by fc7 distance")
    draw(path, panels, heading, args.show)
    relevant = colours.count(RELEVANT)
    labelled = len(mAP.labelled(np.asarray([query_label]))) > 0
    summary = f"{relevant}/{len(found['rows'])} share its label" if labelled else "query label unknown"
    print(f"{name}: radius {found['radius']} ({radius_from}), {found['candidates']} candidates ({backend}), {summary}; "
          f"wrote {path} in {elapsed(started)} s")


if __name__ == "__main__":
    run_main(main)
