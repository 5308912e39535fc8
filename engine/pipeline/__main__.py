"""`python -m specialize.engine.pipeline` = `specialize run`."""
import sys

from specialize.engine.pipeline import main

sys.exit(main())
