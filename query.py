"""Coarse-to-fine retrieval: the top k database items for every query in database/, or for new images.

    python query.py --bits 48                               # every query: result/query.txt and result/query.json
    python query.py --bits 48 --radius 3 --topk 20
    python query.py --bits 48 --image photo.jpg more_photos/   # new images: result/query_images.txt and .json

For each query, with r = --radius (default: search.py's recommendation for this model, else 2) and k = --topk:
r' is the smallest radius >= r holding at least k database items (all N when N < k); the items within r' are ranked
by fc7 Euclidean distance (equal distances in mAP.py's tie order) and the first k returned. Every database item takes
part, labelled or not.

query.txt has the original's format, one line per query: `queryname:db1, db2, ...` (names as in the names files);
query.json adds each result's Hamming and Euclidean distance and label, and r'.

--image takes files or folders (searched recursively for image files); the images are encoded with the model that
built the database (meta.json names it), which is refused when that file changed since or --model names another:
rebuild the database first. Results go to query_images.txt and query_images.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import MyDataset
import database
import mAP
from net import pick_device
from stage import (UserError, common_args_parser, elapsed, memory_mb, non_negative_int, positive_int, print_args,
                   refuse_json_constant, run_main, threads_int, write_json, write_text)


def get_args_parser():
    parser = argparse.ArgumentParser("query.py", description=__doc__.split("\n")[0], parents=[common_args_parser(data_root=False)],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_retrieval_args(parser)
    parser.add_argument("--image", nargs="+", default=None, metavar="PATH",
                        help="query these image files or folders instead of database/'s queries")
    parser.add_argument("--skip-bad", action="store_true", help="with --image: leave out unreadable images")
    return parser


def add_retrieval_args(parser):
    """The flags query.py and demo.py share."""
    parser.add_argument("--bits", type=positive_int, required=True, help="code length; must match the database")
    parser.add_argument("--database", default="database", help="folder written by database.py (default: %(default)s)")
    parser.add_argument("--result", default="result", help="folder for the results (default: %(default)s)")
    parser.add_argument("--radius", type=non_negative_int, default=None,
                        help="Hamming radius of the candidates (default: result/search_<bits>bits.json's "
                             "recommendation for this model, else 2)")
    parser.add_argument("--topk", type=positive_int, default=10, help="results per query (default: %(default)s)")
    parser.add_argument("--ties", default="shuffle", choices=mAP.TIES, help="order of equal distances (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="with --image: the model that built the database (default: the one meta.json names)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="with --image: images per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=threads_int, default=os.cpu_count() or 1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--memory-mb", type=memory_mb, default=256,
                        help="working memory for chunks of queries (default: %(default)s)")


def default_radius(args, meta):
    """(radius, where it came from): --radius, else search.py's recommendation for this very model, else 2."""
    if args.radius is not None:
        if not 0 <= args.radius <= args.bits:
            raise UserError(f"--radius {args.radius}: give a radius between 0 and --bits {args.bits}")
        return args.radius, "--radius"
    path = Path(args.result) / f"search_{args.bits}bits.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse_json_constant)
            radius = int(found["recommended_radius"])
        except (ValueError, KeyError, TypeError, RecursionError):
            print(f"note: {path} is unreadable; using radius 2 (rerun: python search.py --bits {args.bits})",
                  file=sys.stderr)
            return 2, "default"
        if found.get("model_sha256") == meta.get("model_sha256") and found.get("bits") == args.bits:
            return radius, str(path)
        print(f"note: {path} was measured on another model than {args.database}'s; using radius 2 "
              f"(rerun: python search.py --bits {args.bits})", file=sys.stderr)
    return 2, "default"


def database_ranking(args, db, device):
    if len(db.codes) == 0:
        raise UserError(f"{args.database} holds no database item; build it with: python database.py --bits {args.bits}")
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: give a positive number of results")
    return mAP.Ranking(db.codes, args.bits, db.labels, db.features, None, args.ties, device, args.threads,
                       args.memory_mb)


def open_retrieval(args):
    """Where query.py and demo.py start: (device, db, query, meta, radius, where the radius came from, Ranking)."""
    device = pick_device(args.device)
    db, query, meta = database.load_database(args.database, args.bits, features=True)
    radius, radius_from = default_radius(args, meta)
    return device, db, query, meta, radius, radius_from, database_ranking(args, db, device)


def label_text(meta, index):
    labels = meta.get("labels") or []
    return labels[index] if 0 <= index < len(labels) else None


def write_results(result_dir, stem, names, labels, results, db, meta, info):
    """<stem>.txt in the original's format and <stem>.json with distances, labels and r'."""
    lines = [f"{name}:{', '.join(db.names[row] for row in found['rows'])}\n" for name, found in zip(names, results)]
    queries = [{"query": name, "label": label_text(meta, label), "radius": found["radius"],
                "candidates": found["candidates"],
                "results": [{"name": db.names[row], "index": int(row), "label": label_text(meta, int(db.labels[row])),
                             "hamming": int(h), "euclidean": round(float(e), 4)}
                            for row, h, e in zip(found["rows"], found["hamming"], found["euclidean"])]}
               for name, label, found in zip(names, labels, results)]
    text_path, json_path = Path(result_dir) / f"{stem}.txt", Path(result_dir) / f"{stem}.json"
    write_text(text_path, "".join(lines))
    write_json(json_path, {**info, "queries": queries})
    return text_path, json_path


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    started = time.perf_counter()
    device, db, query, meta, radius, radius_from, ranking = open_retrieval(args)
    if args.image:
        files, codes, features, bad = database.encode_new_images(MyDataset.image_files(args.image), args.database, meta,
                                                                 args.model, device, args.batch_size, args.skip_bad)
        names, labels, stem = [str(path) for path in files], [-1] * len(files), "query_images"
        if bad:
            print(f"skipped {len(bad)} unreadable image(s): " + "; ".join(message for _, message in bad), file=sys.stderr)
    else:
        codes, features, names, labels, stem = query.codes, np.asarray(query.features), query.names, query.labels, "query"
    results = ranking.coarse_to_fine(codes, features, radius, args.topk)
    info = {"bits": args.bits, "radius": radius, "radius_from": radius_from, "topk": args.topk, "ties": args.ties,
            "num_queries": len(results), "num_database": ranking.size, "model": meta.get("model"),
            "model_sha256": meta.get("model_sha256"), "device": str(device), "seconds": elapsed(started),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}
    paths = write_results(args.result, stem, names, labels, results, db, meta, info)
    grown = sum(found["radius"] > radius for found in results)
    print(f"{len(results)} queries, radius {radius} ({radius_from}; grown for {grown} to reach {args.topk}), "
          f"top {args.topk} of {ranking.size}: wrote {paths[0]} and {paths[1]} in {elapsed(started)} s")


if __name__ == "__main__":
    run_main(main)
