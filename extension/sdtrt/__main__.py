import sys

from sdtrt.tools.cli import main

sys.exit(main())
