"""A static file server for the data benchmark: a directory over HTTP, each connection limited to a
fixed rate, as one stream from an object store is (tens to a few hundred MB/s per connection).

    python benchmarks/http_server.py DIR --mb-per-s 200     # prints the port, serves until killed

Run as its own process so that serving takes no time from the process being measured.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import time


class ThrottledHandler(http.server.SimpleHTTPRequestHandler):
    bytes_per_s = 200e6
    chunk = 1 << 18

    def copyfile(self, source, outputfile):
        sent, t0 = 0, time.perf_counter()
        while data := source.read(self.chunk):
            outputfile.write(data)
            sent += len(data)
            ahead = sent / self.bytes_per_s - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--mb-per-s", type=float, default=200.0, help="per connection (10^6 bytes)")
    args = ap.parse_args()
    ThrottledHandler.bytes_per_s = args.mb_per_s * 1e6
    handler = functools.partial(ThrottledHandler, directory=args.directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
