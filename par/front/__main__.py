"""`python -m par.front`."""

import sys

from par.front.main import main

sys.exit(main())
