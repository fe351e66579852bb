"""Coarse-to-fine retrieval: the top k database items for every query in database/, or for new images.

    python query.py --bits 48                               # every query: result/query.txt and result/query.json
    python query.py --bits 48 --radius 3 --topk 20
    python query.py --bits 48 --image photo.jpg more_photos/   # new images: result/query_images.txt and .json
    python query.py --bits 48 --backend exact               # the full scan, though index.py built an index
    python query.py --bits 48 --backend milvus [--uri URI]  # candidates from the collection index.py loaded

For each query, with r = --radius (default: search.py's recommendation for this model, else 2) and k = --topk:
r' is the smallest radius >= r holding at least k database items (all N when N < k); the items within r' are ranked
by fc7 Euclidean distance (equal distances in mAP.py's tie order) and the first k returned. Every database item takes
part, labelled or not.

The candidates within r' come from --backend: the exact scan, or the index that index.py built (faiss or Milvus);
the exact ones (scan, faiss flat, Milvus BIN_FLAT) give the same results, item for item.

query.txt has the original's format, one line per query: `queryname:db1, db2, ...` (names as in the names files);
query.json adds each result's Hamming and Euclidean distance and label, and r'.

--image takes files or folders (searched recursively for image files); the images are encoded with the model that
built the database (meta.json names it), which is refused when that file changed since or --model names another:
rebuild the database first. Results go to query_images.txt and query_images.json.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

import MyDataset
import database
import index
import mAP
from stage import common_args_parser, elapsed, print_args, run_main, write_json, write_text


def get_args_parser():
    parser = argparse.ArgumentParser("query.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(data_root=False),
                                              mAP.retrieval_args_parser(result_help="folder for the results"),
                                              mAP.coarse_to_fine_args_parser()],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_backend_args(parser)
    parser.add_argument("--image", nargs="+", default=None, metavar="PATH",
                        help="query these image files or folders instead of database/'s queries")
    parser.add_argument("--skip-bad", action="store_true", help="with --image: leave out unreadable images")
    return parser


def write_results(result_dir, stem, names, labels, results, db, meta, info):
    """<stem>.txt in the original's format and <stem>.json with distances, labels and r'."""
    lines = [f"{name}:{', '.join(db.names[row] for row in found['rows'])}\n" for name, found in zip(names, results)]
    queries = [database.query_answer(name, label, found, db, meta) for name, label, found in zip(names, labels, results)]
    text_path, json_path = Path(result_dir) / f"{stem}.txt", Path(result_dir) / f"{stem}.json"
    write_text(text_path, "".join(lines))
    write_json(json_path, {**info, "queries": queries})
    return text_path, json_path


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    started = time.perf_counter()
    device, db, query, meta, radius, radius_from, items = mAP.open_retrieval(args)
    backend, engine = index.open_index(args, meta, items.size)
    if args.image:
        files, codes, features, bad = database.encode_new_images(MyDataset.image_files(args.image), args.database, meta,
                                                                 args.model, device, args.batch_size, args.skip_bad)
        names, labels, stem = [str(path) for path in files], [-1] * len(files), "query_images"
        if bad:
            print(f"skipped {len(bad)} unreadable image(s): " + "; ".join(message for _, message in bad), file=sys.stderr)
    else:
        codes, features, names, labels, stem = query.codes, np.asarray(query.features), query.names, query.labels, "query"
    results = index.retrieve(engine, items, codes, features, radius, args.topk)
    info = {"bits": args.bits, "radius": radius, "radius_from": radius_from, "topk": args.topk, "ties": args.ties,
            "backend": backend,
            "num_queries": len(results), "num_database": items.size, "model": meta.get("model"),
            "model_sha256": meta.get("model_sha256"), "device": str(device), "seconds": elapsed(started),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}
    paths = write_results(args.result, stem, names, labels, results, db, meta, info)
    grown = sum(found["radius"] > radius for found in results)
    print(f"{len(results)} queries, radius {radius} ({radius_from}; grown for {grown} to reach {args.topk}), "
          f"top {args.topk} of {items.size} ({backend}): wrote {paths[0]} and {paths[1]} in {elapsed(started)} s")


if __name__ == "__main__":
    run_main(main)
