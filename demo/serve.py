"""Serves the demo page on localhost: `python demo/serve.py`, then open the URL it prints.

The page loads onnxruntime-web from demo/node_modules (`npm ci --prefix demo`), and the model
from model/generator.onnx and model/generator.json: the shipped ones in demo/model/, or, with
`--model FILE.onnx`, that file and the FILE.json that `sample.py --export-onnx` wrote beside it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEMO = Path(__file__).resolve().parent
SHIPPED_MODEL = DEMO / "model" / "generator.onnx"
ORT = DEMO / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.js"
MODEL_URLS = ("/model/generator.onnx", "/model/generator.json")


class Handler(SimpleHTTPRequestHandler):
    """demo/'s files, with the chosen model at MODEL_URLS, never cached (a rebuilt model shows
    on reload), and quiet."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm",
                      ".onnx": "application/octet-stream"}

    def __init__(self, *args, model: Path, **kwargs) -> None:
        self.model = model
        super().__init__(*args, directory=str(DEMO), **kwargs)

    def translate_path(self, path: str) -> str:
        route = path.split("?", 1)[0].split("#", 1)[0]
        if route == MODEL_URLS[0]:
            return str(self.model)
        if route == MODEL_URLS[1]:
            return str(self.model.with_suffix(".json"))
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, metavar="FILE.onnx",
                   help="a generator exported with sample.py --export-onnx, with its .json "
                        "beside it (default: the shipped demo/model/generator.onnx)")
    p.add_argument("--port", type=port, default=8000,
                   help="port on 127.0.0.1 (default: 8000; 0: any free port)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not ORT.is_file():
        print(f"error: {ORT.relative_to(DEMO.parent)} is missing: run npm ci in demo/ "
              "(npm ci --prefix demo)", file=sys.stderr)
        return 1
    model = args.model.resolve()
    for path in (model, model.with_suffix(".json")):
        if not path.is_file():
            print(f"error: {path} not found (python sample.py --ckpt CKPT --export-onnx "
                  "FILE.onnx writes a model and its .json)", file=sys.stderr)
            return 1
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port),
                                     functools.partial(Handler, model=model))
    except OSError as e:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"Digitscape demo at http://127.0.0.1:{server.server_port}/ (model {model}); "
          "Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
