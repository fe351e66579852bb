"""A web page and a JSON API for retrieval: click through the queries or drop in an image, see its top k.

    python serve.py --bits 48                                  # then open http://127.0.0.1:8000/
    python serve.py --bits 48 --port 8080 --data-root data --radius 3 --topk 20
    python serve.py --bits 48 --host 0.0.0.0                   # reachable from other machines: mind who can

The model, the database and index.py's index (when one is built and fresh; --backend as in query.py) are loaded
once, at start; the answers are query.py's, by the same functions (coarse to fine: candidates within r' re-ranked
by fc7 distance). At start the same rules as query.py --image
apply: a database without its model, or whose model file changed since, or another --model, is refused.

The JSON API (the page uses nothing else):
    GET  /api/info                     bits, default radius and k, counts, class names
    GET  /api/queries?offset=0&limit=60     the query set, a page at a time
    GET  /api/query/{i}?topk=10&radius=2&rerank=true   the top k for query i of the database
    POST /api/query?topk=10&radius=2&rerank=true       the top k for an image: the request body is the file
    GET  /data/{path}                  an image under --data-root (nothing outside it)
    GET  /openapi.json                 the API's schema; /docs renders it (Swagger UI comes from a CDN)

    curl -s 'http://127.0.0.1:8000/api/query/0?topk=5'
    curl -s --data-binary @photo.jpg 'http://127.0.0.1:8000/api/query?topk=5'

Each answer is query.json's entry for the query (radius r', candidates, results with name, index, label, hamming,
euclidean) plus, per result, its class name (from data/prepare_data.json where there is one, else the label), its
image URL and whether it shares the query's label (true, false, or null when either is unknown); rerank=false gives the first k by Hamming distance alone (mAP.py's ranking rule), r' and candidates
then null. A bad upload is a 400 with one line in "detail", a body over --max-upload-mb a 413.
"""
import argparse
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np

import MyDataset
import database
import index
import mAP
from net import load_model
from stage import UserError, common_args_parser, int_in, positive_float, print_args, run_main

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_TOPK = 1000  # results per request: enough for any page, and it bounds the work a request can ask for
MAX_PIXELS = 64_000_000  # an upload's width x height: a 64 MP photo decodes to 192 MB; PIL refuses only past 179 MP


def get_args_parser():
    parser = argparse.ArgumentParser("serve.py", description=__doc__.split("\n")[0],
                                     parents=[common_args_parser(), mAP.retrieval_args_parser(result_help="where "
                                              "search.py's radius recommendation is read from"),
                                              mAP.coarse_to_fine_args_parser()],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_backend_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens it to the network (default: %(default)s)")
    parser.add_argument("--port", type=int_in(0, 65535), default=8000, help="(default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=20, help="largest image upload accepted (default: %(default)s)")
    return parser


class BadRequest(Exception):
    """A request the server refuses: (HTTP status, one-line message)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Retrieval:
    """The model, the database and its ranking Items, loaded once; answers queries by index and uploaded images."""

    def __init__(self, args):
        self.args = args
        self.device, self.db, self.query, self.meta, self.radius, self.radius_from, self.items = mAP.open_retrieval(args)
        # query.py checks the model only for --image; a server takes images at any time, so it checks at start
        model_path = database.model_for_database(args.database, self.meta, args.model)
        self.network, self.checkpoint = load_model(model_path, args.bits)
        self.backend, self.engine = index.open_index(args, self.meta, self.items.size)  # as query.py: index.py's index
        self.data_root = Path(args.data_root).resolve()
        self.class_names = database.class_names(args.data_root)
        # the ranking sets torch's thread count while it works, and the model runs one batch at a time
        self.lock = threading.Lock()

    def info(self):
        return {"bits": self.args.bits, "radius": self.radius, "radius_from": self.radius_from, "topk": self.args.topk,
                "max_topk": MAX_TOPK, "num_database": self.items.size, "num_queries": len(self.query.names), "backend": self.backend,
                "labels": self.meta.get("labels") or [], "model": self.meta.get("model"),
                "max_upload_bytes": self.max_upload_bytes()}

    def max_upload_bytes(self):
        return int(self.args.max_upload_mb * (1 << 20))

    def queries(self, offset, limit):
        rows = range(offset, min(offset + limit, len(self.query.names)))
        return {"total": len(self.query.names), "offset": offset,
                "queries": [{"index": i, "name": self.query.names[i],
                             "label": database.label_text(self.meta, self.query.labels[i]),
                             "class": database.label_text(self.meta, self.query.labels[i], self.class_names),
                             "image": image_url("query", self.query.names[i])} for i in rows]}

    def for_query(self, index, radius, topk, rerank):
        if not 0 <= index < len(self.query.names):
            raise BadRequest(404, f"no query {index}: the database holds {len(self.query.names)} "
                                  f"(0..{len(self.query.names) - 1})")
        codes, features = self.query.codes[index:index + 1], np.asarray(self.query.features[index:index + 1])
        answer = self.answer(self.query.names[index], self.query.labels[index], codes, features, radius, topk, rerank)
        return {**answer, "index": index, "image": image_url("query", self.query.names[index])}

    def for_upload(self, data, radius, topk, rerank):
        with tempfile.TemporaryDirectory(prefix="serve-upload-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            check_upload(path)
            with self.lock:
                _, codes, features, _ = database.encode_files(self.network, self.checkpoint["model_args"], [path],
                                                            self.device, self.args.batch_size)
        return {**self.answer("upload", None, codes, features, radius, topk, rerank), "index": None, "image": None}

    def answer(self, name, label, codes, features, radius, topk, rerank):
        """query.json's entry for one query (label None: unknown), with class names, image URLs and relevance;
        the retrieval is query.py's."""
        radius = self.radius if radius is None else radius
        topk = self.args.topk if topk is None else topk
        if not 0 <= radius <= self.args.bits:
            raise BadRequest(400, f"radius {radius}: give a radius between 0 and {self.args.bits}")
        with self.lock:
            # query.py's call: candidates from index.py's index when one is built and fresh, else the exact scan
            found = (index.retrieve(self.engine, self.items, codes, features, radius, topk) if rerank
                     else self.hamming_only(codes, features, topk))[0]
        entry = database.query_answer(name, -1 if label is None else label, found, self.db, self.meta)
        item_labels = self.db.labels[found["rows"]]
        known = label is not None and len(mAP.labelled([label])) > 0
        relevant = mAP.relevance(np.asarray([label]), item_labels)[0] if known else [None] * len(item_labels)
        for result, item_label, shares in zip(entry["results"], item_labels, relevant):
            result["class"] = database.label_text(self.meta, item_label, self.class_names)
            result["image"] = image_url("image", result["name"])
            result["relevant"] = None if shares is None or not len(mAP.labelled([item_label])) else bool(shares)
        entry["class"] = None if label is None else database.label_text(self.meta, label, self.class_names)
        return {**entry, "rerank": rerank, "radius_asked": radius, "topk": topk, "num_database": self.items.size}

    def hamming_only(self, codes, features, topk):
        """The first k by Hamming distance (mAP.py's rule, no re-ranking), with their fc7 distances for display."""
        rows, hamming = mAP.topk(self.items, codes, topk)
        squared = mAP.squared_euclidean(features, self.items.features, rows[0])
        return [{"rows": rows[0], "hamming": hamming[0], "euclidean": np.sqrt(squared[0]), "radius": None,
                 "candidates": None}]

    def data_file(self, relative):
        """The image file under the data root that relative names; None when it leads out (.., an absolute path,
        a symlink) or is not an image file."""
        try:
            path = (self.data_root / relative).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not path.is_relative_to(self.data_root) or not path.is_file():
            return None
        return path if path.suffix.lower() in MyDataset.IMAGE_SUFFIXES else None


def image_url(part, name):
    return f"/data/{part}/{quote(name)}"


def check_upload(path):
    """query.py --image's checks (header, then a full decode), plus a pixel cap; BadRequest(400) names the problem."""
    try:
        width, height = MyDataset.image_header(path)
        if width * height > MAX_PIXELS:
            raise BadRequest(400, f"the upload is {width}x{height} pixels; send at most {MAX_PIXELS // 1_000_000} MP")
        MyDataset.read_image(path)
    except MyDataset.BadImage as err:
        raise BadRequest(400, str(err).replace(str(path), "the upload")) from None


async def read_body(request, limit):
    """The request body, refused with a 413 as soon as it passes limit bytes (a declared length is checked first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the upload is {int(declared)} bytes; send at most {limit} (--max-upload-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the upload passes {limit} bytes; send at most {limit} (--max-upload-mb)")
    if not body:
        raise BadRequest(400, "the upload is empty: send the image file as the request body")
    return bytes(body)


def make_app(retrieval):
    """The FastAPI application: the page, the JSON API and the images, over one Retrieval."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse

    app = FastAPI(title="DLBHC retrieval", description="query.py's answers over HTTP; see serve.py's docstring.",
                  redoc_url=None)
    topk_param = Query(None, ge=1, le=MAX_TOPK, description="results (default: serve.py --topk)")
    radius_param = Query(None, ge=0, description="Hamming radius before growing (default: serve.py's radius)")
    rerank_param = Query(True, description="re-rank the candidates by fc7 distance (false: Hamming order alone)")

    @app.exception_handler(BadRequest)
    async def refuse(request, err):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/info")
    def info():
        return retrieval.info()

    @app.get("/api/queries")
    def queries(offset: int = Query(0, ge=0), limit: int = Query(60, ge=1, le=1000)):
        return retrieval.queries(offset, limit)

    @app.get("/api/query/{index}")
    def query_by_index(index: int, topk: int | None = topk_param, radius: int | None = radius_param,
                       rerank: bool = rerank_param):
        return retrieval.for_query(index, radius, topk, rerank)

    image_body = {"requestBody": {"required": True, "description": "the image file's bytes",
                                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/api/query", openapi_extra=image_body)
    async def query_by_upload(request: Request, topk: int | None = topk_param, radius: int | None = radius_param,
                              rerank: bool = rerank_param):
        data = await read_body(request, retrieval.max_upload_bytes())
        return await run_in_threadpool(retrieval.for_upload, data, radius, topk, rerank)

    @app.get("/data/{relative:path}", include_in_schema=False)
    def data_image(relative: str):
        path = retrieval.data_file(relative)
        if path is None:
            raise BadRequest(404, "no such image under the data root")
        return FileResponse(path)

    return app


def check_port(host, port):
    """Refuse a port that is taken before loading anything, with a line that says what to do."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host") from None


def main():
    args = get_args_parser().parse_args()
    print_args(args)
    check_port(args.host, args.port)
    retrieval = Retrieval(args)
    import uvicorn

    print(f"{retrieval.items.size} database items, {len(retrieval.query.names)} queries, radius {retrieval.radius} "
          f"({retrieval.radius_from}), {retrieval.backend}: serving http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(make_app(retrieval), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
