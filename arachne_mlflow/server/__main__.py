"""`python -m arachne_mlflow.server --port 5051`."""

import sys

from arachne_mlflow.server.main import main

sys.exit(main())
