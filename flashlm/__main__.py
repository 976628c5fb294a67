import sys

from flashlm.runtime.cli import main

sys.exit(main())
