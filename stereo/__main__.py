import sys

from stereo.cli import main

sys.exit(main())
