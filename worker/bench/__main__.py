"""``python -m worker.bench MODE JOB_JSON``: one helper process of the benchmark (the old
recipe or the bare aiosmtplib sender; see :mod:`worker.bench.helpers`)."""

import sys

from .helpers import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
