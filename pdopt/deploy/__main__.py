"""The process of one deployment instance: `python -m pdopt.deploy HOST:PORT INDEX [CORES]` (`instance.main`)."""

import sys

from pdopt.deploy import instance

sys.exit(instance.main(sys.argv))
