import sys

from localprop.cli import main

sys.exit(main())
