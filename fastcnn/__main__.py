import sys

from fastcnn.cli import main

sys.exit(main())
