"""serve.py as a real server on 127.0.0.1: its API against query.py's files, a real Chromium, a load test, refusals.

A copy of the session's trained model and database (conftest.trained) serves the module; the server runs as a
subprocess for all the tests.
The browser is Debian's chromium through its chromedriver (apt-get install chromium chromium-driver), driven by
selenium with both binaries given, so nothing is downloaded.
"""
import asyncio
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TRAINED_BITS, class_image, copy_of_trained, run

BITS, TOPK = TRAINED_BITS, 6
# one worker runs the module's server, on a copy of the shared model (tests/run.sh: pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("serve")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root, port, *flags):
    """serve.py in its own process; returns it once /api/info answers (or fails with its output)."""
    log = open(root / f"serve_{port}.log", "w")
    process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--bits", str(BITS), "--device", "cpu",
                                "--port", str(port), "--topk", str(TOPK), *flags], cwd=root, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.monotonic() + 300  # a bound on a hung start, not a timing assertion
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited {process.returncode}:\n{(root / f'serve_{port}.log').read_text()}")
        try:
            if get(port, "/api/info")[0] == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("serve.py did not answer within 300 s")


def request(port, method, path, body=None, headers=None):
    """(status, body bytes) of one request, with the path sent exactly as given (no client-side normalising)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def get(port, path):
    return request(port, "GET", path)


def get_json(port, path):
    status, body = get(port, path)
    assert status == 200, (path, status, body)
    return json.loads(body)


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained):
    """(root, port, server process): the session's 16-bit model and its database (a copy), query.py's answers,
    and serve.py running."""
    root = copy_of_trained(trained, tmp_path_factory.mktemp("serve"))
    run(REPO / "index.py", "--bits", BITS, cwd=root)  # query.py and serve.py both take their candidates from it
    run(REPO / "query.py", "--bits", BITS, "--device", "cpu", "--topk", TOPK, cwd=root)
    # an image of its own, outside the data root, as a user would upload it
    class_image(1, np.random.default_rng(7), 40).save(root / "upload.png")
    run(REPO / "query.py", "--bits", BITS, "--device", "cpu", "--topk", TOPK, "--image", root / "upload.png", cwd=root)
    (root / "secret.png").write_bytes((root / "upload.png").read_bytes())
    (root / "data" / "image" / "escape.png").symlink_to(root / "secret.png")
    port = free_port()
    process = start_server(root, port, "--max-upload-mb", "1")
    yield root, port, process
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def query_lines(root):
    return [line.split(":", 1)[1].split(", ") for line in (root / "result" / "query.txt").read_text().splitlines()]


def hamming_reference(root, query_index, k):
    """The first k database names by Hamming distance, ties in the order of np.random.default_rng(0).permutation(N):
    bit by bit, one item at a time."""
    folder = root / "database"
    db_bits = np.unpackbits(np.load(folder / "db_binary.npy"), axis=1)[:, :BITS]
    query_bits = np.unpackbits(np.load(folder / "query_binary.npy"), axis=1)[query_index, :BITS]
    names = (folder / "db_names.txt").read_text().splitlines()
    tie_place = {int(row): place for place, row in enumerate(np.random.default_rng(0).permutation(len(names)))}
    order = sorted(range(len(names)), key=lambda row: (int((db_bits[row] != query_bits).sum()), tie_place[row]))
    return [names[row] for row in order[:k]]


def test_the_api_answers_as_query_py(served):
    root, port, _ = served
    lines = query_lines(root)
    answers = json.loads((root / "result" / "query.json").read_text())["queries"]
    info = get_json(port, "/api/info")
    assert info["num_queries"] == len(lines) == 15 and info["topk"] == TOPK and info["backend"].startswith("faiss")
    for index, (line, expected) in enumerate(zip(lines, answers)):
        answer = get_json(port, f"/api/query/{index}")
        assert [item["name"] for item in answer["results"]] == line
        assert answer["results"] == [{**item, "class": item["label"], "image": f"/data/image/{item['name']}",
                                      "relevant": item["label"] == expected["label"]} for item in expected["results"]]
        assert (answer["radius"], answer["candidates"], answer["label"]) == (expected["radius"], expected["candidates"],
                                                                            expected["label"])
    page = get_json(port, "/api/queries?offset=10&limit=8")
    assert page["total"] == 15 and [q["index"] for q in page["queries"]] == [10, 11, 12, 13, 14]
    for index in (0, 7):  # re-ranking off: the Hamming ranking with its tie order
        answer = get_json(port, f"/api/query/{index}?rerank=false&topk=9")
        assert [item["name"] for item in answer["results"]] == hamming_reference(root, index, 9)
    assert get(port, "/api/query/15")[0] == 404
    assert get(port, "/api/query/0?radius=17")[0] == 400
    assert get(port, "/api/query/0?topk=0")[0] == 422


def test_an_upload_answers_as_query_py_image(served):
    root, port, _ = served
    expected = json.loads((root / "result" / "query_images.json").read_text())["queries"][0]
    status, body = request(port, "POST", "/api/query", (root / "upload.png").read_bytes())
    assert status == 200, body
    answer = json.loads(body)
    assert [{key: item[key] for key in expected["results"][0]} for item in answer["results"]] == expected["results"]
    assert answer["radius"] == expected["radius"] and answer["candidates"] == expected["candidates"]


def png_bytes(size):
    buffer = io.BytesIO()
    class_image(0, np.random.default_rng(1), size).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width, height):
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb, refused before it is decoded."""
    data = bytearray(png_bytes(1))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_uploads_are_one_line_refusals(served):
    _, port, process = served
    truncated = png_bytes(64)[:200]
    cases = [(b"", 400), (b"just some text, not an image\n", 400), (truncated, 400), (png_claiming(9000, 9000), 400),
             (os.urandom(1_200_000), 413)]  # --max-upload-mb 1
    for body, status in cases:
        got, reply = request(port, "POST", "/api/query", body)
        detail = json.loads(reply)["detail"]
        assert got == status and isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, reply
    # a body sent in chunks, with no length declared, is cut off at the cap as well
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        chunks = (os.urandom(65536) for _ in range(40))
        connection.request("POST", "/api/query", body=chunks, encode_chunked=True)
        assert connection.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the client finished sending: refused as well
    finally:
        connection.close()
    assert process.poll() is None and get(port, "/api/info")[0] == 200


def test_images_come_only_from_inside_the_data_root(served):
    root, port, _ = served
    inside = sorted((root / "data" / "image" / "trainlist").glob("*.png"))[0]
    status, body = get(port, "/data/image/trainlist/" + inside.name)
    assert status == 200 and body == inside.read_bytes()
    escapes = ["/data/../secret.png", "/data/image/../../secret.png", "/data/%2e%2e/secret.png",
               "/data/image/%2e%2e/%2e%2e/secret.png", "/data/" + str(root / "secret.png"),
               "/data/%2F" + str(root / "secret.png").lstrip("/"), "/data/image/escape.png", "/data/image/list.txt",
               "/data/image/trainlist/missing.png"]
    for path in escapes:
        assert get(port, path)[0] == 404, path
    assert (root / "secret.png").is_file() and (root / "data" / "image" / "escape.png").is_file()


def test_200_concurrent_queries_are_all_right(served):
    import httpx

    root, port, process = served
    lines = query_lines(root)
    count = 240

    async def ask_all():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300) as client:
            return await asyncio.gather(*(client.get(f"/api/query/{n % len(lines)}") for n in range(count)))

    started = time.perf_counter()
    replies = asyncio.run(ask_all())
    seconds = time.perf_counter() - started
    for n, reply in enumerate(replies):
        assert reply.status_code == 200
        assert [item["name"] for item in reply.json()["results"]] == lines[n % len(lines)]
    print(f"\n{count} concurrent queries in {seconds:.2f} s: {count / seconds:.1f} queries/s")
    assert process.poll() is None and get(port, "/api/info")[0] == 200


def test_start_up_refuses_a_changed_model_and_a_taken_port(served):
    root, port, _ = served
    result = run(REPO / "serve.py", "--bits", BITS, "--port", port, cwd=root, check=False)
    assert result.returncode == 2 and "pick another --port" in result.stderr
    model = next((root / "model").glob("*.pt"))
    saved = model.read_bytes()
    try:
        model.write_bytes(saved + b"changed")
        result = run(REPO / "serve.py", "--bits", BITS, "--port", free_port(), cwd=root, check=False)
        assert result.returncode == 2 and "changed since" in result.stderr
        assert result.stderr.strip().count("\n") == 0 and "python database.py --bits 16" in result.stderr
    finally:
        model.write_bytes(saved)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try to fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,860"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def grid_of_loaded_images(count):
    """A wait condition: the results grid holds `count` images, every one decoded (read in one script, so a grid
    replaced meanwhile by a newer answer is never half-read)."""
    def ready(driver):
        widths = driver.execute_script(
            "return Array.from(document.querySelectorAll('#results .result img')).map(image => image.naturalWidth)")
        return len(widths) == count and all(width > 0 for width in widths)
    return ready


def shown_names(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results .result')).map(card => card.title)")


def test_a_real_browser_clicks_a_query_and_uploads_an_image(served):
    from selenium.webdriver.support.ui import WebDriverWait

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (tests/run.sh installs them as root)")
    root, port, _ = served
    lines = query_lines(root)
    driver = browser()
    try:
        wait = WebDriverWait(driver, 120)  # a bound on a hung page, not a timing assertion
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: len(d.find_elements("css selector", "#queries .query")) == 15)
        driver.find_elements("css selector", "#queries .query")[4].click()
        wait.until(grid_of_loaded_images(TOPK))
        assert shown_names(driver) == lines[4]
        frames = {card.get_attribute("class").split()[-1] for card in driver.find_elements("css selector", ".result")}
        assert frames <= {"relevant", "irrelevant"}
        driver.find_element("id", "file").send_keys(str(root / "upload.png"))
        wait.until(lambda d: d.find_element("id", "status").text.startswith("upload:"))
        wait.until(grid_of_loaded_images(TOPK))
        expected = json.loads((root / "result" / "query_images.json").read_text())["queries"][0]["results"]
        assert shown_names(driver) == [item["name"] for item in expected]
        driver.find_elements("css selector", "#queries .query")[4].click()
        wait.until(lambda d: d.find_element("id", "status").text.startswith("query/"))
        wait.until(grid_of_loaded_images(TOPK))
        screenshot = root / "result" / "serve.png"
        assert driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as image:
            assert image.size[0] >= 1000 and len(np.unique(np.asarray(image.convert("L")))) > 20
        # k and re-ranking from the page's controls: the first 4 by Hamming distance alone
        driver.find_element("id", "topk").clear()
        driver.find_element("id", "topk").send_keys("4")
        driver.find_element("id", "rerank").click()
        wait.until(lambda d: d.find_element("id", "status").text.endswith("ranked by Hamming distance alone"))
        wait.until(grid_of_loaded_images(4))
        assert shown_names(driver) == hamming_reference(root, 4, 4)
    finally:
        driver.quit()
