import sys

from medclipin.cli import main

sys.exit(main())
