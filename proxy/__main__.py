import sys

from authproxy.cli.main import main

sys.exit(main())
