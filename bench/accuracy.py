"""Every task's accuracy through the service's HTTP API, one table (models/accuracy.py).

    python bench/accuracy.py                     # the demo models, in `cvserve run` of its own
    python bench/accuracy.py --url http://127.0.0.1:8000 --n 100 --videos 40
"""

import sys

from cvserve.models.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
