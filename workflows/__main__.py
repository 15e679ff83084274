import sys

from tessera.workflows.cli import main

sys.exit(main())
