import sys

from fastcm.cli import main

sys.exit(main())
