"""The baseline the transport benchmark compares against: pickle over HTTP, JPEG images.

It mimics the remote reward servers Flow-GRPO uses (inherited from ddpo-pytorch, e.g.
github.com/yifan123/reward-server): the trainer JPEG-encodes each image with PIL (default quality
75), pickles ``{"images": [jpeg bytes], "prompts": [...]}``, and POSTs it to a Flask app, which
unpickles it, decodes the JPEGs to arrays, runs the model and answers with a pickled result.

PICKLE IS BANNED IN THE PRODUCT CODE (reward_server/, the trainer, ...): unpickling untrusted bytes
runs arbitrary code. It appears here ONLY as the thing being measured against, on loopback, between
two processes of this benchmark.

Run as a process: ``python -m bench.pickle_baseline`` prints ``{"port": N}`` and serves on
127.0.0.1 with werkzeug's threaded server (Flask's dev server) until SIGTERM.
"""

from __future__ import annotations

import io
import json
import pickle  # benchmark baseline only (see the module docstring)
import signal
import sys
from typing import Sequence

import numpy as np
from PIL import Image

JPEG_QUALITY = 75  # PIL's default, what `img.save(buf, format="JPEG")` gives


def noop(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
    """The same no-op as reward_server's ``noop`` model: a constant per image."""
    return np.zeros(len(images), dtype=np.float32).tolist()


def create_app():
    from flask import Flask, request

    app = Flask("pickle_baseline")

    @app.route("/", methods=["POST"])
    def inference():
        data = pickle.loads(request.get_data())  # baseline only: never in product code
        images = [np.asarray(Image.open(io.BytesIO(b), formats=["JPEG"]).convert("RGB")) for b in data["images"]]
        rewards = noop(images, data["prompts"])
        return pickle.dumps({"scores": rewards})

    return app


def encode_request(images: Sequence[np.ndarray], prompts: Sequence[str]) -> bytes:
    """Client side: JPEG-encode every uint8 HWC image, pickle the lot."""
    jpegs = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
        jpegs.append(buf.getvalue())
    return pickle.dumps({"images": jpegs, "prompts": list(prompts)})


def decode_response(content: bytes) -> list[float]:
    return pickle.loads(content)["scores"]  # baseline only


def main() -> int:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(json.dumps({"port": server.port}), flush=True)
    # shutdown() from the signal handler would deadlock serve_forever in the same thread; run it
    # in a thread and wait here instead.
    import threading

    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
